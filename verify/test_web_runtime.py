"""Checks for the web-runtime layer: both web runtimes built, from the TVM that mlc-llm pins. Whether that
TVM is the installed wheel's is checked where both meet (test_runtime_env.py)."""

import posixpath

import pytest

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
