"""The real apache-tvm wheels from PyPI whose emcc.py helper the patch is tested against (cached)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TVM_VERSIONS = ("0.25.0", "0.26.0", "0.27.0.post1")
HELPER = "tvm/support/emcc.py"
POSITION_EMBEDDING = "tvm/relax/frontend/nn/llm/position_embedding.py"


def cache_dir() -> Path:
    path = Path(os.environ.get("LLM2WASM_HERMETIC_CACHE", Path.home() / ".cache" / "llm2wasm-hermetic")) / "tvm-wheels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def download_wheel(version: str, dest: Path) -> Path:
    """pip download of one apache-tvm wheel; tried twice, and pip's own words on failure."""
    output = ""
    for _ in range(2):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                str(dest),
                f"apache-tvm=={version}",
            ],
            capture_output=True,
            text=True,
        )
        output = result.stdout + result.stderr
        wheels = sorted(dest.glob(f"apache_tvm-{version}-*.whl"))
        if result.returncode == 0 and wheels:
            return wheels[0]
    raise RuntimeError(f"pip download apache-tvm=={version} left no wheel in {dest}:\n{output[-3000:]}")


def wheel_file(version: str, path: str, name: str) -> str:
    """`path` from the apache-tvm wheel of that version, downloaded once, cached as `name`."""
    extracted = cache_dir() / f"{name}-{version}.py"
    if not extracted.exists():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            wheel = download_wheel(version, Path(tmp))
            with zipfile.ZipFile(wheel) as archive:
                source = archive.read(path).decode()
        partial = extracted.with_suffix(".tmp")
        partial.write_text(source)
        partial.replace(extracted)
    return extracted.read_text()


def helper_source(version: str) -> str:
    """tvm/support/emcc.py from the apache-tvm wheel of that version."""
    return wheel_file(version, HELPER, "emcc")


def position_embedding_source(version: str) -> str:
    """tvm/relax/frontend/nn/llm/position_embedding.py (the rope kernels) from that wheel."""
    return wheel_file(version, POSITION_EMBEDDING, "position_embedding")


def contrib_layout_from(support_source: str, imports: str = "tvm._ffi") -> str:
    """The older `tvm/contrib/emcc.py` layout (find_lib_path, 2024-03-31 to 2026-05), rebuilt from a
    real 0.25.0 helper by the documented differences: no find_wasm_lib, `tvm._ffi` imports,
    find_lib_path lookups, py_str. Checked by hand against the file in public mlc-ai/relax sources
    (same 3,319 characters); the mlc-ai wheels themselves are not reachable from the test machines."""
    start, end = support_source.index("def find_wasm_lib"), support_source.index("def create_tvmjs_wasm")
    text = support_source[:start] + support_source[end:]
    text = text.replace(
        '"""Util to invoke emscripten compilers in the system."""\n\n#',
        '"""Util to invoke emscripten compilers in the system."""\n#',
    )
    # imports="tvm" gives the helper after apache/tvm 4289efa0 (2025-05-28) removed tvm._ffi
    text = text.replace(
        "from tvm import libinfo\n", f"from {imports}.base import py_str\nfrom {imports}.libinfo import find_lib_path\n"
    )
    for name in ("wasm_runtime", "tvmjs_support", "webgpu_runtime"):
        text = text.replace(f'find_wasm_lib("{name}.bc")', f'find_lib_path("{name}.bc")')
    return text.replace('out.decode("utf-8", errors="replace")', "py_str(out)")
