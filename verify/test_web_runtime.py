"""Checks for the web-runtime layer: both web runtimes built, from the TVM that mlc-llm pins. Whether that
TVM is the installed wheel's is checked where both meet (test_runtime_env.py)."""

import posixpath
import re

import pytest

from llm2wasm.host.checks import MLC_LLM_COMMIT_LABEL, commit_label_check, unexpected_web_runtime_files

# What create_tvmjs_wasm links into every model library. TVM's standalone tvmjs runtime
# (tvmjs_runtime.wasm/.js) is not built: no conversion links it and WebLLM ships its own.
TVM_OUTPUTS = ["wasm_runtime.bc", "tvmjs_support.bc", "webgpu_runtime.bc"]


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


def test_mlc_llm_checkout_is_the_pinned_ref(built_from, pins):
    assert built_from["MLC_LLM_CHECKED_OUT"] == pins["mlc_llm_ref"]


def test_commit_label_is_the_commit_built_from(image_config, built_from):
    """The label records the commit the preflight found mlc_llm_ref at (the build stops when its clone
    is elsewhere); BUILT_FROM the commit read off git in the build. They must be the same."""
    label = (image_config.get("Labels") or {}).get(MLC_LLM_COMMIT_LABEL)
    check = commit_label_check(label, built_from.get("MLC_LLM_COMMIT"), "mlc-llm")
    if check.status == "unrecorded":
        pytest.skip(check.message)
    assert check.status == "match", check.message


def test_tvm_source_is_the_submodule_mlc_llm_pins(built_from):
    pinned, checked_out = built_from["MLC_LLM_PINS_TVM"], built_from["TVM_COMMIT"]
    assert re.fullmatch("[0-9a-f]{40}", pinned), f"no 3rdparty/tvm gitlink recorded: {pinned!r}"
    assert checked_out == pinned, f"TVM built from {checked_out}, mlc-llm pins {pinned}"


def test_only_what_conversions_link_is_kept(host, image_env):
    """The image keeps the runtimes' web/dist/wasm and BUILT_FROM, not the recursive checkout it
    built them in (sources, git histories: several hundred MB upstream)."""
    root = image_env["MLC_LLM_SOURCE_DIR"]
    listing = host.check_output(f"cd {root} && find . -mindepth 1 ! -type d -printf '%P\\n'")
    unexpected = unexpected_web_runtime_files(listing.splitlines())
    assert not unexpected, f"{len(unexpected)} files beyond the runtimes' outputs under {root}: {unexpected[:5]}"
