"""Checks for the runtime-env layer, where the ML wheels join the web toolchain: the web runtime built from
the installed TVM's commit, CUDA libraries found, emcc.py patched, the longrope kernel builds, unprivileged use
works."""

import posixpath
from pathlib import Path

import pytest

import llm2wasm.image.scripts.cuda_libs
from llm2wasm.host.checks import tag_commit, tvm_commit_check

RUNTIME_BC = ["wasm_runtime.bc", "tvmjs_support.bc", "webgpu_runtime.bc"]


def test_ld_library_path_is_the_installed_nvidia_libraries(exec_, host, image_env, pins):
    script = Path(llm2wasm.image.scripts.cuda_libs.__file__).read_text()
    derived = exec_.python(script).stdout.strip()
    value = image_env.get("LD_LIBRARY_PATH", "")
    assert value == derived, f"LD_LIBRARY_PATH={value!r}, installed nvidia libraries: {derived!r}"
    if pins.cuda:
        # what the MLC CUDA wheels load and do not bundle, for the CUDA major they are built for
        major = pins.cuda_major
        for needed in (f"libcudart.so.{major}", f"libnvrtc.so.{major}", f"libcublas.so.{major}"):
            found = [d for d in value.split(":") if d and host.file(posixpath.join(d, needed)).exists]
            assert found, f"{needed} (CUDA {major}, variant {pins['variant']}) is in no LD_LIBRARY_PATH folder: {value}"
    else:
        assert value == "", "a CPU variant has no CUDA libraries to point at"


def test_runtime_dir_holds_the_bitcode(host, image_env):
    directory = image_env["LLM2WASM_WASM_RUNTIME_DIR"]
    for name in RUNTIME_BC:
        assert host.file(posixpath.join(directory, name)).is_file, name


def test_patched_helper_links_the_prebuilt_runtime_objects(python_facts, image_env):
    # the web-runtime layer compiled each bitcode file to a wasm object once; the helper links those
    helper = python_facts["patched_helper"]
    assert helper["ok"], helper["error"]
    directory = image_env["LLM2WASM_WASM_RUNTIME_DIR"]
    assert helper["value"] == [posixpath.join(directory, name.replace(".bc", ".o")) for name in RUNTIME_BC]


def test_tvm_builds_the_longrope_rope_kernel(python_facts):
    # Phi-3, Phi-3.5, Phi-4 mini: the installed TVM fails on its own longrope kernel unless fixed
    # (patches/tvm-longrope-ext-factors.patch), and `mlc_llm compile` of those models with it
    kernel = python_facts["longrope_rope_kernel"]
    assert kernel["ok"], kernel["error"]
    assert kernel["value"] == "PrimFunc"


@pytest.mark.parametrize("name", RUNTIME_BC)
def test_prebuilt_runtime_objects_are_wasm_objects_of_the_bitcode(exec_, image_env, name):
    bitcode = posixpath.join(image_env["LLM2WASM_WASM_RUNTIME_DIR"], name)
    obj = bitcode.replace(".bc", ".o")
    # a wasm object (magic \0asm), made after the bitcode it was compiled from
    script = f"head -c 4 {obj} | od -An -tx1 | tr -d ' \\n'; echo; test {obj} -nt {bitcode} -o ! {bitcode} -nt {obj}"
    result = exec_("sh", "-c", script)
    assert result.returncode == 0 and result.stdout.strip() == "0061736d", (
        f"{obj} is not a wasm object compiled from {bitcode}: {result.stdout}{result.stderr}"
    )


def test_mlc_llm_command(host):
    assert "gen_config" in host.check_output("mlc_llm --help")


def test_emscripten_cache_writable_unprivileged(exec_, image_env, pins):
    if pins["emscripten_source"] != "emsdk":
        pytest.skip("Debian's emscripten cache is prebuilt and frozen: nothing writes to it")
    cache = image_env["EM_CACHE"]
    result = exec_("sh", "-c", f"touch {cache}/.llm2wasm-probe && rm {cache}/.llm2wasm-probe", user="65534:65534")
    assert result.returncode == 0, result.stderr


def test_emcc_links_wasm_unprivileged(exec_):
    """What a conversion does last (TVM's create_tvmjs_wasm runs emcc), as an unprivileged user."""
    script = (
        "set -e; d=$(mktemp -d); cd $d; printf 'int answer(void){return 42;}\\n' > a.c; "
        "emcc -O1 --no-entry -s STANDALONE_WASM=1 -s EXPORTED_FUNCTIONS=_answer a.c -o a.wasm; "
        "head -c 4 a.wasm | od -An -c | tr -d ' '; rm -rf $d"
    )
    result = exec_("sh", "-c", script, user="65534:65534", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("\\0asm"), result.stdout


def test_conversion_user_and_workdir(image_config, host):
    """Set here, not in the app layer, so the app layer (rebuilt on each change under src/) adds
    files only and its parents' checks carry over (docs/VERIFY.md)."""
    assert image_config["User"] == "10001:10001"
    assert image_config["WorkingDir"] == "/work"
    assert host.check_output("id -u") == "10001"
    assert host.file("/work").uid == 10001


def test_web_runtime_tvm_is_the_installed_tvms_commit(python_facts, built_from):
    libinfo = python_facts["libinfo_commit"]
    built = libinfo["value"] if libinfo["ok"] else None  # no libinfo at all (apache/tvm since 2026-04-30)
    version = python_facts["tvm_and_mlc_llm"]["value"]
    public = version.split("+", 1)[0]
    tagged = tag_commit(built_from, f"v{public}")
    check = tvm_commit_check(built, built_from["TVM_COMMIT"], version, tagged)
    if check.status == "unknown":
        pytest.skip(check.message)
    assert check.status == "match", check.message
