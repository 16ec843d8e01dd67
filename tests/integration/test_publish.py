"""Publishing to a real registry (Debian's docker-registry on 127.0.0.1): only verified images,
tagged from what is inside them."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from llm2wasm.host import docker
from tests.conftest import HERMETIC, app_image, build_derived_image, invoke

REGISTRY_PORT = 38473


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("docker-registry is not installed: run `bash .ci/install-docker.sh` as root")
    root = tmp_path_factory.mktemp("registry")
    config = root / "config.yml"
    config.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{REGISTRY_PORT}\n"
    )
    server = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", REGISTRY_PORT)) == 0:
                break
        time.sleep(0.2)
    else:
        server.kill()
        pytest.fail("docker-registry did not start")
    yield f"127.0.0.1:{REGISTRY_PORT}"
    server.terminate()
    server.wait(timeout=10)


def registry_tags(registry: str, name: str) -> list[str]:
    with urllib.request.urlopen(f"http://{registry}/v2/{name}/tags/list", timeout=10) as response:
        return json.loads(response.read())["tags"]


def test_publish_pushes_the_verified_image_with_tags_from_its_contents(hermetic_chain, hermetic_mirror, registry):
    mlc_llm = hermetic_mirror.mlc_llm_requirement()
    result = invoke(
        "publish", "--profile", HERMETIC, "--to", f"{registry}/llm2wasm", "--set", f"mlc_llm_requirement={mlc_llm}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tags = set(registry_tags(registry, "llm2wasm"))
    version = mlc_llm.split("==")[1].replace("+", "-")
    assert {HERMETIC, f"{HERMETIC}-python-3.11", f"{HERMETIC}-emsdk-3.1.6", f"{HERMETIC}-mlc-llm-{version}"} <= tags
    assert any(tag.startswith(f"{HERMETIC}-20") for tag in tags)  # the date
    # what the registry serves is the image that passed its checks
    pushed = docker.image_id(f"{registry}/llm2wasm:{HERMETIC}")
    local = docker.image_id(app_image())
    assert pushed is not None and pushed == local


def test_publish_refuses_an_image_that_did_not_pass_its_checks(hermetic_chain, hermetic_mirror, registry):
    tag = f"llm2wasm-unverified:app-{HERMETIC}"
    build_derived_image(tag, f"FROM {app_image()}\nLABEL io.llm2wasm.test=unverified\n")
    try:
        result = invoke(
            "publish",
            "--profile",
            HERMETIC,
            "--to",
            f"{registry}/unverified",
            "--repository",
            "llm2wasm-unverified",
            "--set",
            f"mlc_llm_requirement={hermetic_mirror.mlc_llm_requirement()}",
        )
        assert result.returncode == 2
        assert "has not passed its checks" in result.stderr and "invoke build --profile hermetic" in result.stderr
        with pytest.raises(urllib.error.HTTPError):
            registry_tags(registry, "unverified")
    finally:
        subprocess.run(["docker", "image", "rm", tag], capture_output=True)
