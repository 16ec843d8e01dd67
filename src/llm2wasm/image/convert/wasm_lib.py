"""What a compiled WebLLM model library holds: read from the .wasm itself, standard library only.

A real library from `mlc_llm compile --device webgpu` is a wasm module of several MB that imports
TVM's FFI callbacks from the JS side (`env.TVMFFIWasm*`), exports the TVM runtime's C API, and
carries the WGSL source of every GPU kernel in its data. This tells such a library apart from a
placeholder and gives the kernels to whoever checks them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

WASM_MAGIC = b"\0asm"
IMPORT_SECTION, EXPORT_SECTION = 2, 7
_KIND = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}
# A WGSL compute entry point as TVM's WebGPU codegen writes it.
_ENTRY = re.compile(rb"@compute @workgroup_size\(([^)]*)\)\s*fn (\w+)\(")


class NotAWasmModule(ValueError):
    pass


@dataclass
class LibraryFacts:
    size: int
    imports: list[str] = field(default_factory=list)  # "module.name"
    exports: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)  # WGSL compute entry points

    @property
    def ffi_imports(self) -> list[str]:
        return sorted(name for name in self.imports if name.split(".", 1)[-1].startswith("TVMFFIWasm"))


def _uleb(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _name(data: bytes, pos: int) -> tuple[str, int]:
    length, pos = _uleb(data, pos)
    return data[pos : pos + length].decode("utf-8", "replace"), pos + length


def _skip_import_desc(data: bytes, kind: int, pos: int) -> int:
    if kind == 0 or kind == 4:  # function / tag: type index (tag: attribute byte first)
        if kind == 4:
            pos += 1
        return _uleb(data, pos)[1]
    if kind == 1:  # table: reftype + limits
        pos += 1
    if kind in (1, 2):  # limits: flag, min[, max]
        flag = data[pos]
        pos = _uleb(data, pos + 1)[1]
        return _uleb(data, pos)[1] if flag & 1 else pos
    if kind == 3:  # global: valtype + mutability
        return pos + 2
    raise NotAWasmModule(f"unknown import kind {kind}")


def read_sections(data: bytes) -> dict[int, list[bytes]]:
    if data[:4] != WASM_MAGIC:
        raise NotAWasmModule("not a wasm module (no \\0asm header)")
    sections: dict[int, list[bytes]] = {}
    pos = 8
    while pos < len(data):
        section_id = data[pos]
        size, pos = _uleb(data, pos + 1)
        sections.setdefault(section_id, []).append(data[pos : pos + size])
        pos += size
    return sections


def inspect_library(path: Path) -> LibraryFacts:
    data = path.read_bytes()
    sections = read_sections(data)
    facts = LibraryFacts(size=len(data))
    for body in sections.get(IMPORT_SECTION, []):
        count, pos = _uleb(body, 0)
        for _ in range(count):
            module, pos = _name(body, pos)
            name, pos = _name(body, pos)
            kind = body[pos]
            pos = _skip_import_desc(body, kind, pos + 1)
            facts.imports.append(f"{module}.{name}")
    for body in sections.get(EXPORT_SECTION, []):
        count, pos = _uleb(body, 0)
        for _ in range(count):
            name, pos = _name(body, pos)
            kind = body[pos]
            _, pos = _uleb(body, pos + 1)
            if _KIND.get(kind) == "func":
                facts.exports.append(name)
    facts.kernels = [match.group(2).decode() for match in _ENTRY.finditer(data)]
    return facts
