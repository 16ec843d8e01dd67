"""Files of the upstream source archives in shared/upstream (the ones the hermetic mirror serves),
read without unpacking the whole archive: unit tests check llm2wasm's readings of upstream code
against the real files."""

from __future__ import annotations

import ast
import os
import tarfile
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLC_LLM_ARCHIVE = "mlc-llm-79d603f0.tar.xz"


def upstream_dir() -> Path:
    return Path(os.environ.get("LLM2WASM_UPSTREAM_DIR", ROOT.parent / "shared" / "upstream"))


@cache
def _members(archive: str) -> dict[str, bytes]:
    wanted = ("python/mlc_llm/model/",)
    files = {}
    with tarfile.open(upstream_dir() / archive) as tar:
        for member in tar:
            if member.isfile() and member.name.startswith(wanted) and member.name.endswith(".py"):
                files[member.name] = tar.extractfile(member).read()
    return files


def mlc_llm_file(path: str) -> str:
    return _members(MLC_LLM_ARCHIVE)[path].decode()


def class_source(module_source: str, name: str) -> str:
    tree = ast.parse(module_source)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    return ast.get_source_segment(module_source, node)
