"""A stand-in libcuda.so.1 for containers without the NVIDIA driver, loaded only where the driver is absent.

TVM's CUDA runtime links the driver API directly (apache/tvm cmake/modules/CUDA.cmake appends
CUDA_CUDA_LIBRARY, the toolkit's libcuda stub, to the runtime's link), so the MLC CUDA wheels'
libraries carry ``NEEDED libcuda.so.1`` and ``import tvm`` fails with "libcuda.so.1: cannot open
shared object file" wherever the driver is not mounted: in every ``docker build`` step, in the
image checks, and in CPU/WebGPU conversions run without ``--gpus``. No wheel ships the driver or
its stub (only the CUDA toolkit does), and the driver must never be baked into an image: the
NVIDIA container toolkit mounts the host's own at run time.

So the ml layer runs ``python cuda_driver_stub.py install``:
- it reads the dynamic sections of the installed libraries and collects the driver functions
  (``cu[A-Z]...``) those that need ``libcuda.so.1`` import;
- if there are any, it writes a small ELF shared object with soname ``libcuda.so.1`` defining
  each of them as "return CUDA_ERROR_STUB_LIBRARY" (34, what NVIDIA's own stub returns), in a
  folder that is on no search path;
- and a ``.pth`` start-up hook that, at every interpreter start, tries the real driver first
  and preloads the stub only if that fails. The loader then satisfies ``NEEDED libcuda.so.1``
  with the object already loaded under that soname, so a mounted driver always wins and the stub
  can never shadow it (a stub on LD_LIBRARY_PATH or in ld.so.conf would).

Runs inside an image and needs only the standard library (like cuda_libs.py).
"""

from __future__ import annotations

import mmap
import os
import platform
import re
import struct
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

DRIVER_SONAME = "libcuda.so.1"
STUB_PATH = Path("/opt/llm2wasm/cuda-driver-stub") / DRIVER_SONAME
# CUresult CUDA_ERROR_STUB_LIBRARY: "the CUDA driver is a stub library"
CUDA_ERROR_STUB_LIBRARY = 34
# Driver API entry points: cuInit, cuModuleLoadData, cuGetProcAddress_v2 ... (the runtime API is
# cuda*, cuBLAS cublas*: other libraries)
DRIVER_SYMBOL = re.compile(r"cu[A-Z][A-Za-z0-9_]*")
HOOK_MODULE = "_llm2wasm_cuda_driver_fallback"
# Set to "off" to never preload the stub (e.g. to see the loader's own error).
DISABLE_VARIABLE = "LLM2WASM_CUDA_DRIVER_STUB"


def hook_source(stub_path: Path) -> str:
    """The start-up hook (a module a .pth file imports) that preloads the stub at ``stub_path``."""
    return f'''"""llm2wasm: preload a stub {DRIVER_SONAME} where no NVIDIA driver is mounted (cuda_driver_stub).

The MLC CUDA wheels' libraries need {DRIVER_SONAME} to load at all; without a GPU (docker build,
containers without --gpus, WebGPU conversions) they get this stub, whose every function returns
CUDA_ERROR_STUB_LIBRARY. A mounted driver is always tried first. {DISABLE_VARIABLE}=off turns this off.
"""
import os


def _preload():
    stub = {str(stub_path)!r}
    if os.environ.get({DISABLE_VARIABLE!r}) == "off" or not os.path.exists(stub):
        return
    import ctypes

    try:
        ctypes.CDLL({DRIVER_SONAME!r}, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL(stub, mode=ctypes.RTLD_GLOBAL)


_preload()
'''


# ELF constants (the System V gABI and the x86-64/AArch64 psABIs)
ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB = 2, 1
ET_DYN = 3
SHT_STRTAB, SHT_HASH, SHT_DYNAMIC, SHT_DYNSYM, SHT_PROGBITS = 3, 5, 6, 11, 1
PT_LOAD, PT_DYNAMIC, PT_GNU_STACK = 1, 2, 0x6474E551
PF_X, PF_W, PF_R = 1, 2, 4
DT_NULL, DT_NEEDED, DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT, DT_SONAME = 0, 1, 4, 5, 6, 10, 11, 14
SHN_UNDEF = 0
STB_GLOBAL, STT_FUNC = 1, 2
SHF_ALLOC, SHF_EXECINSTR = 2, 4
# "return 34" in each supported machine's code
RETURN_STUB_ERROR = {
    62: b"\xb8" + struct.pack("<I", CUDA_ERROR_STUB_LIBRARY) + b"\xc3",  # x86-64: mov eax, 34; ret
    183: struct.pack("<II", 0x52800000 | (CUDA_ERROR_STUB_LIBRARY << 5), 0xD65F03C0),  # AArch64: mov w0, 34; ret
}
MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}


class NotElf(ValueError):
    pass


def _c_string(table: bytes, offset: int) -> str:
    return table[offset : table.index(b"\0", offset)].decode()


def read_dynamic(path: Path) -> tuple[int, list[str], str | None, set[str], set[str]]:
    """(machine, NEEDED, SONAME, undefined dynamic symbols, defined ones) of a 64-bit little-endian ELF.

    The file is mapped, not read: a CUDA wheel's libraries run to gigabytes, of which only the
    headers and the dynamic tables are touched."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size < 64:
            raise NotElf(f"{path} is too short for an ELF file")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _read_dynamic(path, data)


def _read_dynamic(path: Path, data) -> tuple[int, list[str], str | None, set[str], set[str]]:
    if data[:4] != ELF_MAGIC or data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise NotElf(f"{path} is not a 64-bit little-endian ELF file")
    machine = struct.unpack_from("<H", data, 18)[0]
    (shoff,) = struct.unpack_from("<Q", data, 40)
    shentsize, shnum = struct.unpack_from("<HH", data, 58)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def section_bytes(index: int) -> bytes:
        _, _, _, _, offset, size, *_ = sections[index]
        return data[offset : offset + size]

    needed: list[str] = []
    soname = None
    undefined: set[str] = set()
    defined: set[str] = set()
    for _, kind, _, _, offset, size, link, _, _, _ in sections:
        if kind == SHT_DYNAMIC:
            strings = section_bytes(link)
            for tag, value in struct.iter_unpack("<qQ", data[offset : offset + size]):
                if tag == DT_NEEDED:
                    needed.append(_c_string(strings, value))
                elif tag == DT_SONAME:
                    soname = _c_string(strings, value)
        elif kind == SHT_DYNSYM:
            strings = section_bytes(link)
            for name, _, _, shndx, _, _ in struct.iter_unpack("<IBBHQQ", data[offset : offset + size]):
                if name:
                    (undefined if shndx == SHN_UNDEF else defined).add(_c_string(strings, name))
    return machine, needed, soname, undefined, defined


def shared_objects(roots: Iterable[Path]) -> Iterable[Path]:
    for root in roots:
        for path in sorted(root.rglob("*.so*")):
            if path.is_file() and not path.is_symlink() and re.search(r"\.so(\.\d+)*$", path.name):
                yield path


def driver_imports(roots: Iterable[Path]) -> dict[Path, set[str]]:
    """Each library that needs libcuda.so.1, with the driver functions it imports."""
    found: dict[Path, set[str]] = {}
    for path in shared_objects(roots):
        try:
            _, needed, _, undefined, _ = read_dynamic(path)
        except (NotElf, struct.error, ValueError, IndexError):
            continue
        if DRIVER_SONAME in needed:
            found[path] = {name for name in undefined if DRIVER_SYMBOL.fullmatch(name)}
    return found


def _elf_hash(name: bytes) -> int:
    h = 0
    for byte in name:
        h = (h << 4) + byte
        high = h & 0xF0000000
        if high:
            h ^= high >> 24
        h &= ~high & 0xFFFFFFFF
    return h


def stub_library(symbols: Iterable[str], machine: int) -> bytes:
    """An ELF shared object, soname libcuda.so.1, whose every symbol is a function returning 34.

    One PT_LOAD (read + execute) maps the file as it is; the dynamic section, a System V hash
    table and the symbols are all the loader needs; section headers are there for readelf/nm.
    """
    code = RETURN_STUB_ERROR[machine]
    names = sorted(set(symbols))
    dynstr = bytearray(b"\0")

    def add_string(text: str) -> int:
        offset = len(dynstr)
        dynstr.extend(text.encode() + b"\0")
        return offset

    soname_offset = add_string(DRIVER_SONAME)
    name_offsets = [add_string(name) for name in names]
    nsyms = len(names) + 1

    ehdr_size, phdr_size, phnum = 64, 56, 3
    text_off = ehdr_size + phnum * phdr_size
    hash_off = (text_off + len(code) + 7) & ~7
    nbucket = max(1, len(names))
    buckets, chains = [0] * nbucket, [0] * nsyms
    for index, name in enumerate(names, start=1):
        bucket = _elf_hash(name.encode()) % nbucket
        chains[index], buckets[bucket] = buckets[bucket], index
    hash_table = struct.pack(f"<II{nbucket}I{nsyms}I", nbucket, nsyms, *buckets, *chains)
    dynsym_off = (hash_off + len(hash_table) + 7) & ~7
    dynsym = bytearray(24)
    for offset in name_offsets:
        dynsym += struct.pack("<IBBHQQ", offset, (STB_GLOBAL << 4) | STT_FUNC, 0, 1, text_off, len(code))
    dynstr_off = dynsym_off + len(dynsym)
    dynamic_off = (dynstr_off + len(dynstr) + 7) & ~7
    dynamic = b"".join(
        struct.pack("<qQ", tag, value)
        for tag, value in (
            (DT_SONAME, soname_offset),
            (DT_HASH, hash_off),
            (DT_STRTAB, dynstr_off),
            (DT_SYMTAB, dynsym_off),
            (DT_STRSZ, len(dynstr)),
            (DT_SYMENT, 24),
            (DT_NULL, 0),
        )
    )
    shstrtab = b"\0.text\0.hash\0.dynsym\0.dynstr\0.dynamic\0.shstrtab\0"
    shstrtab_off = dynamic_off + len(dynamic)
    end = shstrtab_off + len(shstrtab)
    shoff = (end + 7) & ~7

    def name_at(section: str) -> int:
        return shstrtab.index(section.encode() + b"\0")

    # name, type, flags, addr, offset, size, link, info, addralign, entsize
    section_headers = [
        (0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        (name_at(".text"), SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR, text_off, text_off, len(code), 0, 0, 4, 0),
        (name_at(".hash"), SHT_HASH, SHF_ALLOC, hash_off, hash_off, len(hash_table), 3, 0, 8, 4),
        (name_at(".dynsym"), SHT_DYNSYM, SHF_ALLOC, dynsym_off, dynsym_off, len(dynsym), 4, 1, 8, 24),
        (name_at(".dynstr"), SHT_STRTAB, SHF_ALLOC, dynstr_off, dynstr_off, len(dynstr), 0, 0, 1, 0),
        (name_at(".dynamic"), SHT_DYNAMIC, SHF_ALLOC, dynamic_off, dynamic_off, len(dynamic), 4, 0, 8, 16),
        (name_at(".shstrtab"), SHT_STRTAB, 0, 0, shstrtab_off, len(shstrtab), 0, 0, 1, 0),
    ]
    header = ELF_MAGIC + bytes([ELFCLASS64, ELFDATA2LSB, 1, 0]) + bytes(8)
    header += struct.pack(
        "<HHIQQQIHHHHHH",
        ET_DYN,
        machine,
        1,
        0,
        ehdr_size,
        shoff,
        0,
        ehdr_size,
        phdr_size,
        phnum,
        64,
        len(section_headers),
        len(section_headers) - 1,
    )
    program_headers = b"".join(
        struct.pack("<IIQQQQQQ", *fields)
        for fields in (
            (PT_LOAD, PF_R | PF_X, 0, 0, 0, end, end, 0x1000),
            (PT_DYNAMIC, PF_R, dynamic_off, dynamic_off, dynamic_off, len(dynamic), len(dynamic), 8),
            # No executable stack wanted (without this header the loader assumes one is needed)
            (PT_GNU_STACK, PF_R | PF_W, 0, 0, 0, 0, 0, 16),
        )
    )
    image = bytearray(shoff)
    for offset, part in (
        (0, header + program_headers),
        (text_off, code),
        (hash_off, hash_table),
        (dynsym_off, dynsym),
        (dynstr_off, dynstr),
        (dynamic_off, dynamic),
        (shstrtab_off, shstrtab),
    ):
        image[offset : offset + len(part)] = part
    return bytes(image) + b"".join(struct.pack("<IIQQQQIIQQ", *fields) for fields in section_headers)


def site_packages() -> list[Path]:
    return sorted({Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")})


def install(roots: Iterable[Path], stub_path: Path = STUB_PATH, hook_dir: Path | None = None) -> str:
    """Write the stub and the start-up hook if any installed library needs the driver; say what was done."""
    imports = driver_imports(roots)
    if not imports:
        return f"no installed library needs {DRIVER_SONAME}: no stub"
    machine = MACHINES.get(platform.machine().lower())
    if machine is None:
        raise SystemExit(f"cuda_driver_stub: no stub code for machine {platform.machine()}")
    symbols = set().union(*imports.values())
    stub_path.parent.mkdir(parents=True, exist_ok=True)
    stub_path.write_bytes(stub_library(symbols, machine))
    hook_dir = hook_dir or site_packages()[0]
    (hook_dir / f"{HOOK_MODULE}.py").write_text(hook_source(stub_path))
    (hook_dir / f"{HOOK_MODULE}.pth").write_text(f"import {HOOK_MODULE}\n")
    libraries = ", ".join(sorted(str(path) for path in imports))
    return f"{stub_path}: {len(symbols)} driver functions for {libraries}; preloaded only where no driver loads"


def main(argv: list[str]) -> int:
    if argv[:1] != ["install"]:
        print("usage: cuda_driver_stub.py install [FOLDER ...]  (default: site-packages)", file=sys.stderr)
        return 2
    roots = [Path(arg) for arg in argv[1:]] or site_packages()
    print(install(roots))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
