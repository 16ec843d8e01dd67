"""The stub libcuda.so.1 and its start-up hook, on the host: a stand-in CUDA wheel library built with
gcc (tests/standins/cuda-wheel) loads through the stub where no driver is, and through the driver
where one is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm2wasm.image.scripts import cuda_driver_stub
from llm2wasm.image.scripts.cuda_driver_stub import DRIVER_SONAME, driver_imports, install, read_dynamic

# Loads the stand-in TVM runtime in a fresh interpreter whose site folder holds the hook, as the
# image's site-packages does, and prints what the driver it got says.
LOAD = """
import ctypes, site, sys
site.addsitedir(sys.argv[1])
print(ctypes.CDLL(sys.argv[2]).standin_driver_version())
"""


@pytest.fixture
def installed(tmp_path, cuda_wheel_standin):
    stub, hooks = tmp_path / "stub" / DRIVER_SONAME, tmp_path / "hooks"
    hooks.mkdir()
    message = install([cuda_wheel_standin.site], stub, hooks)
    return stub, hooks, message


def load(hooks: Path, library: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LOAD, str(hooks), str(library)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )


def test_finds_the_libraries_that_need_the_driver_and_the_driver_functions_they_import(cuda_wheel_standin):
    imports = driver_imports([cuda_wheel_standin.site.parent])
    # the driver stand-in itself needs no driver; the wheel library does
    assert imports == {cuda_wheel_standin.library: {"cuInit", "cuDriverGetVersion", "cuModuleLoadData"}}


def test_driver_functions_are_the_driver_api_only():
    for name in ("cuInit", "cuGetProcAddress_v2", "cuMemAlloc_v2"):
        assert cuda_driver_stub.DRIVER_SYMBOL.fullmatch(name)
    for name in ("cudaGetDeviceCount", "cublasCreate_v2", "cufftPlan1d", "cuda"):
        assert not cuda_driver_stub.DRIVER_SYMBOL.fullmatch(name)


def test_the_stub_is_a_shared_object_named_and_defining_what_the_wheel_imports(installed, cuda_wheel_standin):
    stub, _, message = installed
    machine, needed, soname, undefined, defined = read_dynamic(stub)
    assert soname == DRIVER_SONAME and needed == [] and undefined == set()
    assert defined == {"cuInit", "cuDriverGetVersion", "cuModuleLoadData"}
    assert machine == read_dynamic(cuda_wheel_standin.library)[0]
    assert "3 driver functions" in message and str(cuda_wheel_standin.library) in message
    # binutils read it as the loader does
    dynamic = subprocess.run(["readelf", "-d", "--dyn-syms", stub], capture_output=True, text=True, check=True).stdout
    assert "Library soname: [libcuda.so.1]" in dynamic and "FUNC    GLOBAL DEFAULT    1 cuInit" in dynamic


def test_without_a_driver_the_wheel_library_does_not_load(installed, cuda_wheel_standin):
    _, hooks, _ = installed
    result = load(hooks, cuda_wheel_standin.library, LLM2WASM_CUDA_DRIVER_STUB="off")
    assert result.returncode != 0
    assert "libcuda.so.1: cannot open shared object file" in result.stderr


def test_without_a_driver_the_hook_loads_the_stub_and_every_call_says_stub_library(installed, cuda_wheel_standin):
    _, hooks, _ = installed
    result = load(hooks, cuda_wheel_standin.library)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "-34"  # CUDA_ERROR_STUB_LIBRARY from cuInit


def test_a_driver_on_the_search_path_wins_over_the_stub(installed, cuda_wheel_standin):
    _, hooks, _ = installed
    result = load(hooks, cuda_wheel_standin.library, LD_LIBRARY_PATH=str(cuda_wheel_standin.driver))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "13000"


def test_nothing_is_written_where_no_library_needs_the_driver(tmp_path, cuda_wheel_standin):
    stub, hooks = tmp_path / "stub" / DRIVER_SONAME, tmp_path / "hooks"
    hooks.mkdir()
    message = install([cuda_wheel_standin.driver], stub, hooks)
    assert message == "no installed library needs libcuda.so.1: no stub"
    assert not stub.exists() and list(hooks.iterdir()) == []


def test_files_that_are_not_elf_are_skipped(tmp_path):
    (tmp_path / "notes.so").write_text("not a library")
    (tmp_path / "truncated.so.1").write_bytes(b"\x7fELF\x02\x01\x01")
    assert driver_imports([tmp_path]) == {}


def test_aarch64_code_returns_34():
    # mov w0, #34 (MOVZ: imm16 in bits 5..20); ret
    mov, ret = (
        int.from_bytes(cuda_driver_stub.RETURN_STUB_ERROR[183][:4], "little"),
        cuda_driver_stub.RETURN_STUB_ERROR[183][4:],
    )
    assert (mov >> 5) & 0xFFFF == 34 and mov & 0x1F == 0 and ret == bytes.fromhex("c0035fd6")
