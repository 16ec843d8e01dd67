"""The patched helper of each real apache-tvm wheel, imported with the real TVM of the hermetic image;
and a drifted helper stopping the runtime-env build with the clear message."""

from __future__ import annotations

import base64
import subprocess
import tempfile
from pathlib import Path

import pytest

from llm2wasm.host import docker
from llm2wasm.host.pins import resolve_profile
from llm2wasm.host.plan import make_plan
from llm2wasm.image.scripts.tvm_patches import EMCC_FIX, apply, load_patches
from tests.conftest import HERMETIC, ROOT, build_derived_image
from tests.tvm_wheels import TVM_VERSIONS, helper_source

RUNTIME_IMAGE = f"llm2wasm:runtime-env-{HERMETIC}"

PROBE = r"""
import base64, importlib.util, os, sys, tempfile
path = os.path.join(tempfile.mkdtemp(), "patched_emcc.py")
open(path, "w").write(base64.b64decode(sys.argv[1]).decode())
spec = importlib.util.spec_from_file_location("patched_emcc", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # imports the real installed TVM (`from tvm import libinfo`)
names = ["wasm_runtime.bc", "tvmjs_support.bc", "webgpu_runtime.bc"]
print("configured", *[module.llm2wasm_runtime_lib(n) for n in names])
obj = os.path.join(tempfile.mkdtemp(), "model.bc"); open(obj, "w").write("object")
out = os.path.join(tempfile.mkdtemp(), "lib.wasm")
# A compiler that records the command line the helper builds: the real emcc link (tens of seconds
# of LTO over the runtime) runs in every conversion test; here only the files handed to it matter.
cc = os.path.join(tempfile.mkdtemp(), "record-cc")
open(cc, "w").write("#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$0.args\"\n")
os.chmod(cc, 0o755)
module.create_tvmjs_wasm(out, [obj], cc=cc)
args = open(cc + ".args").read().split()
runtime = [a for a in args if os.path.basename(a) in [n[:-3] + ".o" for n in names]]
print("linked", args[args.index("-o") + 1] == out, obj in args, *[os.path.exists(a) for a in runtime], len(runtime))
os.environ["LLM2WASM_WASM_RUNTIME_DIR"] = tempfile.mkdtemp()
try:
    module.llm2wasm_runtime_lib("wasm_runtime.bc")
except RuntimeError as error:
    print("missing", str(error).replace("\n", " "))
del os.environ["LLM2WASM_WASM_RUNTIME_DIR"]
print("unset", module.llm2wasm_runtime_lib("tvmjs_support.bc"))
"""


def patched_source(version: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "tvm" / "support" / "emcc.py"
        target.parent.mkdir(parents=True)
        target.write_text(helper_source(version))
        apply(Path(tmp) / "tvm", load_patches(ROOT / "patches", fixes=EMCC_FIX), log=lambda _: None)
        return target.read_text()


@pytest.mark.parametrize("version", TVM_VERSIONS)
def test_patched_helper_resolves_bitcode_with_real_tvm(hermetic_chain, version):
    encoded = base64.b64encode(patched_source(version).encode()).decode()
    result = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "-i",
            "--network",
            "none",
            "--entrypoint",
            "python",
            RUNTIME_IMAGE,
            "-c",
            PROBE,
            encoded,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in result.stdout.splitlines()}
    directory = "/opt/mlc-llm/3rdparty/tvm/web/dist/wasm"
    # the wasm objects the web-runtime layer compiled from the bitcode, linked instead of it
    assert lines["configured"].split() == [
        f"{directory}/{n}" for n in ("wasm_runtime.o", "tvmjs_support.o", "webgpu_runtime.o")
    ]
    # the link gets the output, the model object and all three runtime objects, which exist
    assert lines["linked"] == "True True True True True 3"
    assert "Cannot find wasm_runtime.bc in LLM2WASM_WASM_RUNTIME_DIR=/tmp/" in lines["missing"]
    assert "build the TVM web runtime there" in lines["missing"]
    # unset: upstream's own lookup ($TVM_HOME/web/dist/wasm), unchanged
    assert lines["unset"] == f"{directory}/tvmjs_support.bc"


def test_drifted_helper_stops_the_runtime_env_build(hermetic_chain):
    drifted = "llm2wasm-broken:emcc-drifted"
    dockerfile = (
        # the installed TVM comes from the ML branch, which the runtime-env layer joins
        f"FROM llm2wasm:ml-{HERMETIC}\n"
        "RUN sed -i 's/all_libs = \\[\\]/all_libs = list()/' "
        "/opt/venv/lib/python3.11/site-packages/tvm/support/emcc.py\n"
    )
    build_derived_image(drifted, dockerfile)
    step = next(s for s in make_plan(resolve_profile(HERMETIC)).steps if s.layer.name == "runtime-env")
    lines: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            status = docker.build(
                dockerfile=step.dockerfile,
                context=ROOT,
                build_args={**step.build_args, "ML_IMAGE": drifted, "CUDA_LIBRARY_PATH": ""},
                network="host",
                iidfile=Path(tmp) / "iid",
                on_line=lines.append,
            )
    finally:
        subprocess.run(["docker", "image", "rm", drifted], capture_output=True)
    output = "\n".join(lines)
    assert status != 0, output
    assert "TVM's emcc.py changed upstream; no llm2wasm patch applies" in output
    assert "file: /opt/venv/lib/python3.11/site-packages/tvm/support/emcc.py" in output
    assert f"installed TVM: {resolve_profile(HERMETIC)['mlc_ai_requirement'].replace('==', ' ')}" in output
    assert "patches tried:" in output and "tvm-emcc-support-find_wasm_lib.patch" in output
