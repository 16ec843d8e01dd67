"""A conversion's container has a read-only root (llm2wasm.host.run.conversion_container): what a model
folder gets to run cannot change the image, and emscripten still gets a cache it can write to.

Every conversion of the integration suite runs in such a container (`invoke convert`, `invoke batch`);
these tests look at the two edges: a write into the image fails, and a system library emscripten
must build at a link is built into the conversion's scratch (llm2wasm.image.convert.emcache)."""

from __future__ import annotations

import subprocess

import pytest

from llm2wasm.host.run import conversion_container
from tests.conftest import app_image, build_derived_image

pytestmark = pytest.mark.integration

WRITE_INTO_THE_IMAGE = """
import os, sys
for path in ("/opt/venv/injected.pth", "/usr/share/emscripten/injected", "/home/llm2wasm/.bashrc"):
    try:
        open(path, "w").write("x")
        sys.exit(f"wrote {path}")
    except OSError as error:
        assert error.errno in (13, 30), (path, error)  # EACCES or EROFS: not written
open("/tmp/scratch", "w").write("x")  # scratch stays writable
print("root read-only, /tmp writable")
"""


def container(*args: str, image: str, entrypoint: str = "python") -> subprocess.CompletedProcess:
    command = [*conversion_container([], {}, gpu=False), "--entrypoint", entrypoint, image, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_code_in_a_conversion_container_cannot_write_into_the_image(hermetic_chain):
    result = container("-c", WRITE_INTO_THE_IMAGE, image=app_image())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "root read-only, /tmp writable" in result.stdout


MISSING_LIBRARY = "sysroot/lib/wasm32-emscripten/libcompiler_rt.a"
LINK = f"""
import os, subprocess
from llm2wasm.image.convert.emcache import ensure_writable_cache
image_cache = os.environ["EM_CACHE"]
scratch = ensure_writable_cache()
assert scratch is not None, "EM_CACHE was writable on a read-only root"
open("/tmp/hello.c", "w").write("int main(void) {{ return 0; }}")
subprocess.run(["emcc", "/tmp/hello.c", "-o", "/tmp/hello.wasm"], check=True)
assert os.path.isfile(os.path.join(str(scratch), "{MISSING_LIBRARY}")), "not built into scratch"
assert not os.path.exists(os.path.join(image_cache, "{MISSING_LIBRARY}"))
print("linked", os.path.getsize("/tmp/hello.wasm"), "bytes; library built into", scratch)
"""


def test_a_library_emscripten_builds_at_a_link_lands_in_scratch(hermetic_chain):
    """Debian's emscripten ships every library and freezes its cache; an emsdk SDK builds some at a
    first link. Here one is taken out of the image and the freeze lifted, as an SDK has it."""
    tag = "llm2wasm-test:emcache-missing-library"
    build_derived_image(tag, f'FROM {app_image()}\nUSER root\nRUN rm "$EM_CACHE/{MISSING_LIBRARY}"\nUSER 10001:10001\n')
    try:
        command = [*conversion_container([], {}, gpu=False), "-e", "EM_FROZEN_CACHE="]
        result = subprocess.run(
            [*command, "--entrypoint", "python", tag, "-c", LINK], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout + result.stderr[-3000:]
        assert "library built into /tmp/llm2wasm-em-cache" in result.stdout
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)
