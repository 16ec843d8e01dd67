"""Checks for the runtime-env layer: CUDA libraries found, emcc.py patched, unprivileged use works."""

import posixpath
from pathlib import Path

import llm2wasm.cuda_libs

RUNTIME_BC = ["wasm_runtime.bc", "tvmjs_support.bc", "webgpu_runtime.bc"]


def test_ld_library_path_is_the_installed_nvidia_libraries(exec_, image_env, pins):
    script = Path(llm2wasm.cuda_libs.__file__).read_text()
    derived = exec_.python(script).stdout.strip()
    value = image_env.get("LD_LIBRARY_PATH", "")
    assert value == derived, f"LD_LIBRARY_PATH={value!r}, installed nvidia libraries: {derived!r}"
    if pins.cuda:
        for needed in ("cuda_runtime", "cuda_nvrtc", "cublas"):
            assert f"/nvidia/{needed}/" in value + "/", f"{needed} missing from LD_LIBRARY_PATH"
    else:
        assert value == "", "a CPU variant has no CUDA libraries to point at"


def test_runtime_dir_holds_the_bitcode(host, image_env):
    directory = image_env["LLM2WASM_WASM_RUNTIME_DIR"]
    for name in RUNTIME_BC:
        assert host.file(posixpath.join(directory, name)).is_file, name


def test_patched_helper_resolves_the_bitcode(python_facts, image_env):
    helper = python_facts["patched_helper"]
    assert helper["ok"], helper["error"]
    directory = image_env["LLM2WASM_WASM_RUNTIME_DIR"]
    assert helper["value"] == [posixpath.join(directory, name) for name in RUNTIME_BC]


def test_mlc_llm_command(host):
    assert "gen_config" in host.check_output("mlc_llm --help")


def test_emscripten_cache_writable_unprivileged(exec_, image_env):
    cache = posixpath.join(image_env["EMSDK"], "upstream/emscripten/cache")
    result = exec_("sh", "-c", f"touch {cache}/.llm2wasm-probe && rm {cache}/.llm2wasm-probe", user="65534:65534")
    assert result.returncode == 0, result.stderr
