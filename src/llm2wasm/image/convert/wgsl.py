"""The WGSL kernels inside a compiled model library: read, validated with Chrome's rules, repaired.

Why: a library whose WGSL a browser rejects still loads in WebLLM, and WebLLM still answers, with
wrong text. tvmjs submits a step as one command buffer; one invalid pipeline drops the whole step
and only the console says so. apache-tvm 0.26.0's WebGPU codegen declares every storage buffer
`read_write` (apache/tvm #20079, fixed after v0.26.0 by #20113 "Preserve read-only buffer access
modes"), and Tint, Chrome's WGSL compiler, then rejects the paged-KV attention kernels: reading a
read_write buffer "may result in a non-uniform value" before a workgroupBarrier.

So every library `llm2wasm convert` makes is validated by Tint (Dawn, the `wgpudawn` package, on
Dawn's Null backend: the full WGSL front end, uniformity analysis included, without a GPU). Where
validation finds that defect, the buffers a kernel never writes are declared `read`, and the
kernel's `paramWriteAccess` tag (which tvmjs uses to choose read-only storage bindings) is changed
to match. Both edits keep every byte count the same, so nothing else in the wasm moves.

Layout of TVM's serialised WebGPU module (tvm/runtime/... webgpu module SaveToBytes; little-endian,
`str` = u64 length + bytes), found after the key `str "webgpu"` in the wasm's data:
    u64 payload size
    u64 n, n x { str key, FunctionInfo { str name, u64 k, k x DLDataType(4 bytes),
                                          u64 t, t x str launch_param_tag, u64 e, e x i32 } }
    u64 n, n x { str kernel name, str WGSL source }
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field

BLOB_KEY = struct.pack("<Q", 6) + b"webgpu"
WRITE_ACCESS_TAG = "paramWriteAccess:"
_DECLARATION = re.compile(r"@binding\((\d+)\) var<storage, read_write> (\w+)")
_UNIFORMITY = "must only be called from uniform control flow"


class LibraryFormatError(ValueError):
    pass


@dataclass
class Kernel:
    name: str
    source: str
    source_offset: int  # where the source bytes sit in the wasm
    write_access_tag: str | None = None  # e.g. "paramWriteAccess:[1,1,1]"
    tag_offset: int | None = None


@dataclass
class Problem:
    kernel: str
    messages: list[str]

    def __str__(self) -> str:
        return f"{self.kernel}: " + "; ".join(self.messages)


@dataclass
class Repair:
    kernel: str
    read_only: list[str] = field(default_factory=list)


def _u64(data: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", data, pos)[0], pos + 8


def _str(data: bytes, pos: int) -> tuple[int, int, int]:
    """(start, end, next position) of a length-prefixed string."""
    length, pos = _u64(data, pos)
    return pos, pos + length, pos + length


def read_kernels(data: bytes) -> list[Kernel]:
    """Every WGSL kernel of every WebGPU module blob in the wasm."""
    kernels: list[Kernel] = []
    pos = 0
    while (found := data.find(BLOB_KEY, pos)) >= 0:
        try:
            kernels += _read_blob(data, found + len(BLOB_KEY))
        except (struct.error, UnicodeDecodeError, LibraryFormatError) as exc:
            raise LibraryFormatError(f"cannot read the WebGPU module at byte {found}: {exc}") from None
        pos = found + len(BLOB_KEY)
    return kernels


def _read_blob(data: bytes, pos: int) -> list[Kernel]:
    size, pos = _u64(data, pos)
    end = pos + size
    if end > len(data):
        raise LibraryFormatError("payload runs past the end of the file")
    tags: dict[str, tuple[str, int]] = {}
    count, pos = _u64(data, pos)
    for _ in range(count):
        start, stop, pos = _str(data, pos)
        key = data[start:stop].decode()
        _, _, pos = _str(data, pos)  # FunctionInfo.name
        arg_types, pos = _u64(data, pos)
        pos += 4 * arg_types
        tag_count, pos = _u64(data, pos)
        for _ in range(tag_count):
            start, stop, pos = _str(data, pos)
            tag = data[start:stop].decode()
            if tag.startswith(WRITE_ACCESS_TAG):
                tags[key] = (tag, start)
        extra, pos = _u64(data, pos)
        pos += 4 * extra
    kernels = []
    count, pos = _u64(data, pos)
    for _ in range(count):
        start, stop, pos = _str(data, pos)
        name = data[start:stop].decode()
        start, stop, pos = _str(data, pos)
        tag, tag_offset = tags.get(name, (None, None))
        kernels.append(Kernel(name, data[start:stop].decode(), start, tag, tag_offset))
    if pos != end:
        raise LibraryFormatError(f"payload ends at {pos}, header says {end}")
    return kernels


class Validator:
    """Tint through Dawn's Null backend: WGSL checked as Chrome checks it, no GPU needed."""

    def __init__(self):
        os.environ.setdefault("WGPU_BACKEND_TYPE", "Null")
        try:
            import wgpudawn
        except ImportError as exc:
            raise RuntimeError(
                "the WGSL validator (Python package wgpudawn) is not installed: it ships in the llm2wasm image"
            ) from exc
        adapter = wgpudawn.gpu.request_adapter_sync()
        if adapter is None:
            raise RuntimeError("the WGSL validator found no Dawn adapter (WGPU_BACKEND_TYPE=Null expected)")
        # every feature the adapter has (shader-f16 among them), so f16 kernels validate too
        self.device = adapter.request_device_sync(
            required_features=list(adapter.features), required_limits=dict(adapter.limits)
        )

    def errors(self, kernel: Kernel) -> list[str]:
        self.device.push_error_scope("validation")
        module = self.device.create_shader_module(label=kernel.name, code=kernel.source)
        messages = module.get_compilation_info_sync().messages
        scope_error = self.device.pop_error_scope_async().sync_wait()
        errors = [f"line {m.line_num}:{m.line_pos}: {m.message}" for m in messages if m.type == "error"]
        notes = [f"line {m.line_num}:{m.line_pos}: {m.message}" for m in messages if m.type != "error"]
        if scope_error is not None and not errors:
            errors.append(str(getattr(scope_error, "message", scope_error)))
        return errors + notes if errors else []


def validate(kernels: list[Kernel], validator: Validator | None = None) -> list[Problem]:
    validator = validator or Validator()
    return [Problem(k.name, errors) for k in kernels if (errors := validator.errors(k))]


def is_read_write_defect(problem: Problem) -> bool:
    """The known apache-tvm 0.26 defect: uniformity broken by reading a read_write buffer."""
    text = " ".join(problem.messages)
    return _UNIFORMITY in text and "read_write storage buffer" in text


def written_buffers(source: str, names: list[str]) -> set[str]:
    """Buffers the kernel stores into: TVM writes `name[index] = value;` (atomics take `&name[...]`)."""
    written = set()
    for name in names:
        store = re.search(rf"(?m)^\s*{re.escape(name)}\[[^;]*?\]\s*=(?!=)", source)
        if store or re.search(rf"&\s*{re.escape(name)}\b", source):
            written.add(name)
    return written


def read_only_source(source: str) -> tuple[str, dict[int, bool], list[str]]:
    """The source with never-written storage buffers declared `read` (padded to the same length),
    binding -> written for every storage buffer, and the names made read-only."""
    declared = [(int(binding), name) for binding, name in _DECLARATION.findall(source)]
    written = written_buffers(source, [name for _, name in declared])
    read_only = [name for _, name in declared if name not in written]
    for name in read_only:
        pattern = re.compile(rf"var<storage, read_write> {re.escape(name)}\b")
        # "read_write" -> "read" is 6 characters shorter: the spaces keep every offset in place
        source = pattern.sub(f"var<storage, read>{' ' * 7}{name}", source, count=1)
    return source, {binding: name in written for binding, name in declared}, read_only


def repaired_tag(tag: str, access: dict[int, bool]) -> str:
    """paramWriteAccess:[1,1,1] with 0 for every buffer now read-only (same length)."""
    values = tag[len(WRITE_ACCESS_TAG) :].strip("[]").split(",")
    if len(values) != len(access):
        raise LibraryFormatError(f"{tag} lists {len(values)} buffers, the WGSL declares {len(access)}")
    new = [value if access[index] else "0" for index, value in enumerate(values)]
    return f"{WRITE_ACCESS_TAG}[{','.join(new)}]"


def repair(data: bytearray, kernels: list[Kernel], names: set[str]) -> list[Repair]:
    """Declare never-written buffers read-only in the named kernels, in place in `data`."""
    repairs = []
    for kernel in kernels:
        if kernel.name not in names:
            continue
        source, access, read_only = read_only_source(kernel.source)
        encoded = source.encode()
        if len(encoded) != len(kernel.source.encode()):
            raise LibraryFormatError(f"{kernel.name}: repaired source changed length")
        data[kernel.source_offset : kernel.source_offset + len(encoded)] = encoded
        if kernel.write_access_tag is not None and kernel.tag_offset is not None:
            tag = repaired_tag(kernel.write_access_tag, access).encode()
            data[kernel.tag_offset : kernel.tag_offset + len(tag)] = tag
        kernel.source = source
        repairs.append(Repair(kernel.name, read_only))
    return repairs


@dataclass
class CheckResult:
    kernels: int
    repairs: list[Repair]
    problems: list[Problem]  # what is still wrong after any repair


def check_and_repair(data: bytearray, allow_repair: bool = True, validator: Validator | None = None) -> CheckResult:
    """Validate every kernel; repair the known read_write defect where found; validate again."""
    kernels = read_kernels(bytes(data))
    validator = validator or Validator()
    problems = validate(kernels, validator)
    repairs: list[Repair] = []
    fixable = {p.kernel for p in problems if is_read_write_defect(p)}
    if allow_repair and fixable:
        repairs = repair(data, kernels, fixable)
        problems = validate(kernels, validator)
    return CheckResult(len(kernels), repairs, problems)


# A kernel Tint must reject (the apache-tvm 0.26 defect in miniature) and its repaired twin: the
# image's layer check runs both, so a validator that accepts everything cannot pass unnoticed.
SELF_CHECK_KERNEL = """@group(0) @binding(0) var<storage, read_write> indptr : array<i32>;
@group(0) @binding(1) var<storage, read_write> out : array<f32>;
var<workgroup> shared_value : f32;
@compute @workgroup_size(64, 1, 1)
fn demo_kernel(@builtin(local_invocation_id) tid : vec3<u32>) {
  if (indptr[0] > 0) {
    shared_value = 1.0;
    workgroupBarrier();
  }
  out[tid.x] = shared_value;
}
"""


def self_check(validator: Validator | None = None) -> list[str]:
    """Problems with the validator itself; empty when it rejects the bad kernel and accepts the repair."""
    validator = validator or Validator()
    bad = Kernel("demo_kernel", SELF_CHECK_KERNEL, 0)
    found = validate([bad], validator)
    failures = []
    if not found or not is_read_write_defect(found[0]):
        failures.append(f"the validator did not report the read_write uniformity defect: {found}")
    fixed, access, _ = read_only_source(SELF_CHECK_KERNEL)
    if access != {0: False, 1: True}:
        failures.append(f"write analysis wrong: {access}")
    if rest := validate([Kernel("demo_kernel", fixed, 0)], validator):
        failures.append(f"the repaired kernel does not validate: {rest}")
    return failures


def main(argv: list[str] | None = None) -> int:
    """python -m llm2wasm.image.convert.wgsl LIBRARY.wasm [--no-repair] [--report FILE] | --self-check"""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m llm2wasm.image.convert.wgsl", description=main.__doc__)
    parser.add_argument("library", nargs="?", type=Path)
    parser.add_argument("--no-repair", action="store_true", help="report the defect instead of repairing it")
    parser.add_argument("--report", type=Path, help="write the result as JSON")
    parser.add_argument("--self-check", action="store_true", help="check the validator itself")
    args = parser.parse_args(argv)
    if args.self_check:
        failures = self_check()
        print("\n".join(failures) or "WGSL validator self-check passed")
        return 1 if failures else 0
    if args.library is None:
        parser.error("LIBRARY.wasm is required")
    data = bytearray(args.library.read_bytes())
    result = check_and_repair(data, allow_repair=not args.no_repair)
    if result.repairs:
        args.library.write_bytes(data)
    print(f"WGSL check (Tint, Chrome's rules): {result.kernels} kernels")
    for fixed in result.repairs:
        print(f"  repaired {fixed.kernel}: never-written buffers declared read-only: {', '.join(fixed.read_only)}")
    for problem in result.problems:
        print(f"  INVALID {problem}")
    if args.report:
        args.report.write_text(
            json.dumps(
                {
                    "kernels": result.kernels,
                    "repaired": [fixed.kernel for fixed in result.repairs],
                    "invalid": [str(problem) for problem in result.problems],
                }
            )
        )
    if result.problems:
        print(f"{len(result.problems)} kernel(s) would fail in the browser: the library is not usable")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
