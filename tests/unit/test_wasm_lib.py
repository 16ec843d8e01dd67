import pytest

from llm2wasm.image.convert.wasm_lib import NotAWasmModule, inspect_library


def uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def name(text: str) -> bytes:
    return uleb(len(text)) + text.encode()


def section(section_id: int, body: bytes) -> bytes:
    return bytes([section_id]) + uleb(len(body)) + body


WGSL = b"@compute @workgroup_size(64, 1, 1)\nfn add_kernel(\n  @builtin(workgroup_id) b : vec3<u32>\n) {}\n"


def module() -> bytes:
    types = section(1, uleb(1) + b"\x60\x00\x00")  # one type: () -> ()
    imports = section(
        2,
        uleb(3)
        + name("env")
        + name("TVMFFIWasmSafeCall")
        + b"\x00"
        + uleb(0)
        + name("env")
        + name("memory")
        + b"\x02\x01"
        + uleb(1)
        + uleb(2)  # memory with min and max
        + name("wasi_snapshot_preview1")
        + name("proc_exit")
        + b"\x00"
        + uleb(0),
    )
    functions = section(3, uleb(1) + uleb(0))
    exports = section(
        7, uleb(2) + name("TVMBackendAllocWorkspace") + b"\x00" + uleb(2) + name("mem") + b"\x02" + uleb(0)
    )
    code = section(10, uleb(1) + uleb(2) + b"\x00\x0b")
    data = section(11, uleb(1) + b"\x00\x41\x00\x0b" + uleb(len(WGSL)) + WGSL)
    return b"\0asm\x01\x00\x00\x00" + types + imports + functions + exports + code + data


def test_reads_imports_exports_and_kernels(tmp_path):
    path = tmp_path / "lib.wasm"
    path.write_bytes(module())
    facts = inspect_library(path)
    assert facts.imports == ["env.TVMFFIWasmSafeCall", "env.memory", "wasi_snapshot_preview1.proc_exit"]
    assert facts.ffi_imports == ["env.TVMFFIWasmSafeCall"]
    assert facts.exports == ["TVMBackendAllocWorkspace"]  # functions only
    assert facts.kernels == ["add_kernel"]
    assert facts.size == len(module())


def test_placeholder_module_has_nothing(tmp_path):
    path = tmp_path / "empty.wasm"
    path.write_bytes(b"\0asm\x01\x00\x00\x00")
    facts = inspect_library(path)
    assert facts.imports == [] and facts.kernels == [] and facts.size == 8


def test_not_a_wasm_module(tmp_path):
    path = tmp_path / "lib.wasm"
    path.write_bytes(b"<html>404</html>")
    with pytest.raises(NotAWasmModule, match="no \\\\0asm header"):
        inspect_library(path)
