"""Checks for the web-runtime layer: both web runtimes built, from the TVM that mlc-llm pins."""

import posixpath

import pytest

from llm2wasm.checks import tvm_commit_check

TVM_OUTPUTS = [
    "wasm_runtime.bc",
    "tvmjs_support.bc",
    "webgpu_runtime.bc",
    "tvmjs_runtime.wasm",
    "tvmjs_runtime.js",
    "tvmjs_runtime.wasi.js",
]


def test_source_variables(host, image_env):
    mlc = image_env["MLC_LLM_SOURCE_DIR"]
    assert image_env["TVM_SOURCE_DIR"] == posixpath.join(mlc, "3rdparty/tvm")
    assert image_env["TVM_HOME"] == image_env["TVM_SOURCE_DIR"]
    for name in ("MLC_LLM_SOURCE_DIR", "TVM_SOURCE_DIR"):
        assert host.file(image_env[name]).is_directory, name


def test_mlc_wasm_runtime_built(host, image_env):
    bc = host.file(posixpath.join(image_env["MLC_LLM_SOURCE_DIR"], "web/dist/wasm/mlc_wasm_runtime.bc"))
    assert bc.is_file and bc.size > 0


@pytest.mark.parametrize("name", TVM_OUTPUTS)
def test_tvm_web_runtime_built(host, image_env, name):
    path = host.file(posixpath.join(image_env["TVM_SOURCE_DIR"], "web/dist/wasm", name))
    assert path.is_file and path.size > 0, f"{path.path} missing or empty"


def test_mlc_llm_checkout_is_the_pinned_ref(checked_out_ref, image_env, pins):
    assert checked_out_ref(image_env["MLC_LLM_SOURCE_DIR"], pins["mlc_llm_ref"]) == pins["mlc_llm_ref"]


def test_tvm_source_is_the_submodule_mlc_llm_pins(host, image_env):
    pinned = host.check_output(f"git -C {image_env['MLC_LLM_SOURCE_DIR']} ls-tree HEAD 3rdparty/tvm").split()[2]
    checked_out = host.check_output(f"git -C {image_env['TVM_SOURCE_DIR']} rev-parse HEAD")
    assert checked_out == pinned


def test_web_runtime_tvm_is_the_installed_tvms_commit(host, python_facts, image_env):
    libinfo = python_facts["libinfo_commit"]
    built = libinfo["value"] if libinfo["ok"] else None  # no libinfo at all (apache/tvm since 2026-04-30)
    version = python_facts["tvm_and_mlc_llm"]["value"]
    git = f"git -C {image_env['TVM_SOURCE_DIR']}"
    source = host.check_output(f"{git} rev-parse HEAD")
    public = version.split("+", 1)[0]
    tagged = host.run(f"{git} rev-parse --quiet --verify 'refs/tags/v{public}^{{commit}}'")
    check = tvm_commit_check(built, source, version, tagged.stdout.strip() if tagged.rc == 0 else None)
    if check.status == "unknown":
        pytest.skip(check.message)
    assert check.status == "match", check.message
