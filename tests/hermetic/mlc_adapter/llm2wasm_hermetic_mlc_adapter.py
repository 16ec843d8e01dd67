"""Import-time adapter that lets the real mlc_llm Python package run without its compiled library.

HERMETIC PROFILE ONLY. The stable, nightly and cpu images install the MLC wheels, which ship
libmlc_llm and need none of this. The hermetic image has the real mlc_llm Python sources (from
the mlc-llm checkout the mirror serves) on the real apache-tvm wheel from PyPI, but no compiled
libmlc_llm (the MLC wheel index is unreachable from the test machines). Three things that
library would provide are supplied here, when `mlc_llm` is first imported:

1. SKIP_LOADING_MLCLLM_SO=1: mlc_llm.base then does not dlopen libmlc_llm.
2. tvm_ffi.registry._SKIP_UNKNOWN_OBJECTS: mlc_llm registers Python classes for FFI object types
   that only the C++ library defines (e.g. mlc.serve.Data); without it the import fails with
   "Cannot find object type index".
3. The global function mlc.tokenizers.DetectTokenizerInfo, which `gen_config` calls: a Python
   port of the detection in mlc-llm cpp/tokenizers/tokenizers.cc (Tokenizer::DetectTokenizerInfo).

It is loaded from a .pth file, so it reaches every Python process of the image's venv, including
the `python -m mlc_llm.cli.check_device` subprocesses that convert_weight spawns. It does nothing
until something imports mlc_llm.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
from pathlib import Path

DETECT_TOKENIZER_INFO = "mlc.tokenizers.DetectTokenizerInfo"
SPIECE_UNDERLINE = "\u2581"


def _decoder_method(decoder: object) -> str | None:
    if isinstance(decoder, dict):
        kind = decoder.get("type")
        if kind == "ByteLevel":
            return "byte_level"
        if kind == "ByteFallback":
            return "byte_fallback"
    return None


def _has_prepend(normalizer: dict) -> bool:
    return normalizer.get("type") == "Prepend" and normalizer.get("prepend") == SPIECE_UNDERLINE


def _has_strip(decoder: dict) -> bool:
    return decoder.get("type") == "Strip" and decoder.get("content") == " " and decoder.get("start", 0) > 0


def detect_tokenizer_info(path: str) -> str:
    """TokenizerInfo as JSON, detected from tokenizer.json like the C++ original."""
    location = Path(path)
    if not location.exists():
        raise ValueError(f"Cannot find tokenizer via path: {path}")
    if not location.is_dir():
        location = location.parent
    info = {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": False, "strip_space_in_decode": False}
    tokenizer_json = location / "tokenizer.json"
    if not tokenizer_json.exists():
        return json.dumps(info)
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    decoder = data.get("decoder")
    if isinstance(decoder, dict):
        parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
        methods = [m for m in (_decoder_method(part) for part in parts) if m]
        if methods:
            info["token_postproc_method"] = methods[-1]
        info["strip_space_in_decode"] = any(isinstance(p, dict) and _has_strip(p) for p in parts)
    normalizer = data.get("normalizer")
    if isinstance(normalizer, dict):
        parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
        info["prepend_space_in_encode"] = any(isinstance(p, dict) and _has_prepend(p) for p in parts)
    return json.dumps(info)


def prepare() -> None:
    os.environ.setdefault("SKIP_LOADING_MLCLLM_SO", "1")
    import tvm_ffi
    import tvm_ffi.registry

    tvm_ffi.registry._SKIP_UNKNOWN_OBJECTS = True
    if tvm_ffi.get_global_func(DETECT_TOKENIZER_INFO, allow_missing=True) is None:
        tvm_ffi.register_global_func(DETECT_TOKENIZER_INFO, detect_tokenizer_info)


class _BeforeMlcLlm(importlib.abc.MetaPathFinder):
    """Runs prepare() once, just before the first `import mlc_llm`, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mlc_llm":
            sys.meta_path.remove(self)
            prepare()
        return None


def install() -> None:
    if not any(isinstance(finder, _BeforeMlcLlm) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeMlcLlm())
