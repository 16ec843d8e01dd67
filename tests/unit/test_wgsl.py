"""Reading, repairing and (where the validator is installed) validating the WGSL in a library."""

import struct

import pytest

from llm2wasm.image.convert import wgsl
from llm2wasm.image.convert.webllm_types import interface_fields

KERNEL = """@group(0) @binding(0) var<storage, read_write> A : array<f32>;
@group(0) @binding(1) var<storage, read_write> B : array<f32>;
@group(0) @binding(2) var<storage, read_write> C : array<f32>;
@compute @workgroup_size(64, 1, 1)
fn add_kernel(@builtin(global_invocation_id) i : vec3<u32>) {
  C[i.x] = (A[i.x] + B[i.x]);
}
"""


def s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def blob(kernels: dict[str, str], tags: dict[str, list[str]]) -> bytes:
    fmap = struct.pack("<Q", len(kernels))
    for name in kernels:
        fmap += s(name) + s(name) + struct.pack("<Q", 1) + b"\x02\x20\x01\x00"  # one arg type (float32)
        fmap += struct.pack("<Q", len(tags[name])) + b"".join(s(t) for t in tags[name])
        fmap += struct.pack("<Q", 0)
    smap = struct.pack("<Q", len(kernels)) + b"".join(s(n) + s(src) for n, src in kernels.items())
    payload = fmap + smap
    return wgsl.BLOB_KEY + struct.pack("<Q", len(payload)) + payload


def library() -> bytearray:
    tags = {"add_kernel": ["blockIdx.x", "threadIdx.x", "paramWriteAccess:[1,1,1]"]}
    return bytearray(b"\0asm\x01\0\0\0" + b"padding" + blob({"add_kernel": KERNEL}, tags) + b"tail")


def test_reads_kernels_and_their_write_access_tags():
    (kernel,) = wgsl.read_kernels(bytes(library()))
    assert kernel.name == "add_kernel" and kernel.source == KERNEL
    assert kernel.write_access_tag == "paramWriteAccess:[1,1,1]"


def test_never_written_buffers_become_read_only_in_place():
    data = library()
    before = len(data)
    kernels = wgsl.read_kernels(bytes(data))
    (repaired,) = wgsl.repair(data, kernels, {"add_kernel"})
    assert repaired.read_only == ["A", "B"]
    assert len(data) == before  # nothing else in the wasm moves
    (kernel,) = wgsl.read_kernels(bytes(data))
    assert "var<storage, read>       A : array<f32>;" in kernel.source
    assert "var<storage, read_write> C" in kernel.source
    assert kernel.write_access_tag == "paramWriteAccess:[0,0,1]"


def test_written_buffers_found_by_store_or_address():
    source = "  out[i] = 1.0;\n  let x = atomicAdd(&counter[0], 1);\n  y = inp[i] == 2;\n"
    assert wgsl.written_buffers(source, ["out", "counter", "inp"]) == {"out", "counter"}


def test_tag_and_declarations_must_agree():
    with pytest.raises(wgsl.LibraryFormatError, match="lists 2 buffers"):
        wgsl.repaired_tag("paramWriteAccess:[1,1]", {0: False, 1: True, 2: True})


def test_truncated_blob_is_a_clear_error():
    data = bytes(library())
    cut = data[: data.find(b"add_kernel", data.find(wgsl.BLOB_KEY) + 20) + 30]
    with pytest.raises(wgsl.LibraryFormatError, match="cannot read the WebGPU module"):
        wgsl.read_kernels(cut)


def test_read_write_defect_is_recognised_by_its_message():
    defect = wgsl.Problem(
        "k",
        [
            "line 3:5: 'workgroupBarrier' must only be called from uniform control flow",
            "line 1:2: reading from read_write storage buffer 'a' may result in a non-uniform value",
        ],
    )
    assert wgsl.is_read_write_defect(defect)
    assert not wgsl.is_read_write_defect(wgsl.Problem("k", ["line 1:1: unresolved identifier 'x'"]))


def test_real_validator_when_installed():
    pytest.importorskip("wgpudawn", reason="the WGSL validator ships in the image (verify/test_app.py runs it there)")
    assert wgsl.self_check() == []


def test_webllm_interface_fields():
    declarations = """
    /** a record */
    export interface ModelRecord {
        model: string;
        overrides?: ChatOptions; // comment: ignored
        nested?: {
            inner: number;
        };
    }
    export interface Other extends Base { x: number; }
    """
    assert interface_fields(declarations, "ModelRecord") == {"model", "overrides", "nested"}
    with pytest.raises(ValueError, match="interface Missing not found"):
        interface_fields(declarations, "Missing")
