"""Fixtures for the image checks: a throwaway container of the image under test, a testinfra host
for it, the image's metadata (docker exec skips the entrypoint and ENV may differ inside, so both
are checked), and the pins of the profile it was built from."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import testinfra

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llm2wasm.host.checks import BUILT_FROM, env_dict, parse_built_from
from llm2wasm.host.pins import Profile


def pytest_addoption(parser):
    parser.addoption("--image", required=True, help="image ID or tag to check")
    parser.addoption("--layer", required=True, help="the layer the image is")
    parser.addoption("--pins-json", required=True, help="the resolved profile (JSON) the image was built from")


@pytest.fixture(scope="session")
def image(request) -> str:
    return request.config.getoption("--image")


@pytest.fixture(scope="session")
def pins(request) -> Profile:
    return Profile.from_json(json.loads(Path(request.config.getoption("--pins-json")).read_text()))


@pytest.fixture(scope="session")
def image_config(image) -> dict:
    out = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["Config"]


@pytest.fixture(scope="session")
def image_env(image_config) -> dict[str, str]:
    return env_dict(image_config.get("Env"))


@pytest.fixture(scope="session")
def container(image):
    name = f"llm2wasm-verify-{uuid.uuid4().hex[:12]}"
    subprocess.run(
        [
            "docker",
            "run",
            "-d",
            "--rm",
            "--name",
            name,
            "--network",
            "none",
            "--entrypoint",
            "sleep",
            image,
            "infinity",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


@pytest.fixture(scope="session")
def host(container):
    return testinfra.get_host(f"docker://{container}")


class Exec:
    """docker exec with a timeout, stdin and a user (what testinfra's host.run lacks)."""

    def __init__(self, container: str):
        self.container = container

    def __call__(
        self, *cmd: str, stdin: str | None = None, user: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        args = ["docker", "exec", "-i"]
        if user:
            args += ["--user", user]
        return subprocess.run(
            [*args, self.container, *cmd], input=stdin, capture_output=True, text=True, timeout=timeout
        )

    def python(self, source: str, **kwargs) -> subprocess.CompletedProcess:
        return self("python", "-", stdin=source, **kwargs)


@pytest.fixture(scope="session")
def exec_(container) -> Exec:
    return Exec(container)


# One interpreter for the heavy imports (torch, TVM, mlc_llm take seconds each): every probe records
# its own result or error, so each check still passes or fails on its own.
PYTHON_PROBE = r"""
import contextlib, importlib, io, json, runpy, sys, traceback
facts = {}
def probe(name, func):
    try:
        facts[name] = {"ok": True, "value": func()}
    except BaseException:
        facts[name] = {"ok": False, "error": traceback.format_exc(limit=3)}
def ml_libraries():
    import torch, transformers, peft, safetensors
    return {"torch": torch.__version__, "cuda": torch.version.cuda}
def tvm_and_mlc_llm():
    import tvm, mlc_llm
    return tvm.__version__
def mlc_llm_cli_help():
    # `python -m mlc_llm --help`, in this interpreter: mlc_llm is imported already
    out = io.StringIO()
    sys.argv = ["mlc_llm", "--help"]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module("mlc_llm", run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            if exit.code not in (0, None):
                raise
    return out.getvalue()
def libinfo_commit():
    import tvm
    return dict(tvm.support.libinfo()).get("GIT_COMMIT_HASH")
def patched_helper():
    for name in ("tvm.support.emcc", "tvm.contrib.emcc"):
        try:
            module = importlib.import_module(name)
            break
        except ImportError:
            continue
    return [module.llm2wasm_runtime_lib(bc) for bc in ("wasm_runtime.bc", "tvmjs_support.bc", "webgpu_runtime.bc")]
def longrope_rope_kernel():
    # Phi-3.5 mini's rope kernel, as mlc_llm's KV cache has TVM build it (patches/README.md)
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map
    scaling = {"rope_type": "longrope", "original_max_position_embeddings": 4096, "max_position_embeddings": 131072}
    return type(llama_rope_with_position_map(10000.0, 1.0, 96, 32, 32, "float16", scaling, 96)).__name__
for name, func in [("ml_libraries", ml_libraries), ("tvm_and_mlc_llm", tvm_and_mlc_llm),
                   ("mlc_llm_cli_help", mlc_llm_cli_help), ("libinfo_commit", libinfo_commit),
                   ("patched_helper", patched_helper), ("longrope_rope_kernel", longrope_rope_kernel)]:
    probe(name, func)
print(json.dumps(facts))
"""


@pytest.fixture(scope="session")
def python_facts(exec_) -> dict:
    result = exec_.python(PYTHON_PROBE, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def checked_out_ref(host):
    """The ref a clone made with `git clone --branch REF` is at: the exact tag, else the branch."""

    def ref_of(path: str, ref: str) -> str:
        git = f"git -C {path}"
        if host.run(f"{git} rev-parse --verify --quiet refs/tags/{ref}").rc == 0:
            return host.check_output(f"{git} describe --tags --exact-match")
        return host.check_output(f"{git} rev-parse --abbrev-ref HEAD")

    return ref_of


@pytest.fixture(scope="session")
def built_from(host, image_env) -> dict[str, str]:
    """The commits the web runtimes were built from, recorded by the web-runtime layer (its image
    keeps no git checkout of them)."""
    record = host.file(f"{image_env['MLC_LLM_SOURCE_DIR']}/{BUILT_FROM}")
    assert record.is_file, f"{record.path} missing: the web-runtime layer records its sources there"
    return parse_built_from(record.content_string)


@pytest.fixture(scope="session")
def container_env(exec_) -> dict[str, str]:
    out = exec_("env", "-0").stdout
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
