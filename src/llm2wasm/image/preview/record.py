"""A published WebLLM `model_list` entry (webllm-model-record.json, what `publish-bundle` writes) as
the preview's input: `llm2wasm preview --record FILE` serves the page with an app config holding
that entry alone, and the browser loads the model from the entry's own URLs (the Hub's).

The entry is hostile input, like a bundle: read as a regular file of bounded size (no symlink
followed), then checked field by field against what WebLLM's ModelRecord holds (web-llm
src/config.ts). URLs are http(s) only, without credentials or fragments; anything else, or a field
WebLLM does not read, stops the preview with exit status 2 and the fix. The served config is made
from the checked fields only, never from the file's bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from urllib.parse import urlsplit

from llm2wasm.errors import UsageError

MAX_RECORD_BYTES = 64 * 1024  # a published entry is well under 1 KiB
MAX_URL_CHARS = 2048
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
FEATURE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
OVERRIDE_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
MODEL_TYPES = {0: "LLM", 1: "embedding", 2: "VLM"}  # web-llm's ModelType
REQUIRED = ("model", "model_id", "model_lib")
OPTIONAL = (
    "overrides",
    "vram_required_MB",
    "low_resource_required",
    "buffer_size_required_bytes",
    "required_features",
    "model_type",
)
FIX = "pass the webllm-model-record.json that `invoke publish-bundle` wrote (or the entry it printed)"


def read_record(path: Path) -> dict:
    """The checked entry in the file at `path` (UsageError, exit 2, naming the problem otherwise)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        if os.path.islink(path):
            raise UsageError(f"record {path} is a symbolic link: {FIX}, as a regular file") from None
        raise UsageError(f"record {path}: {error.strerror}; {FIX}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder, a FIFO, a device
            raise UsageError(f"record {path} is not a regular file: {FIX}")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_RECORD_BYTES + 1)
    finally:
        os.close(fd)
    return check_record(data, str(path))


def check_record(data: bytes, shown: str = "the record") -> dict:
    """The entry in `data`, holding only the fields WebLLM reads, each checked."""
    if len(data) > MAX_RECORD_BYTES:
        raise UsageError(f"{shown} is over {MAX_RECORD_BYTES // 1024} KiB, not a model_list entry: {FIX}")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise UsageError(f"{shown} is not JSON ({str(error)[:120]}): {FIX}") from None
    if isinstance(value, dict) and "model_list" in value:
        raise UsageError(f"{shown} is an app config, not one entry: pass one entry of its model_list, as a file")
    if not isinstance(value, dict):
        raise UsageError(f"{shown} is not a JSON object: {FIX}")
    unknown = sorted(set(value) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise UsageError(
            f"{shown} has field(s) WebLLM's ModelRecord does not hold: {', '.join(repr(k[:40]) for k in unknown[:5])}; "
            f"an entry holds {', '.join(REQUIRED + OPTIONAL)}: remove the others"
        )
    missing = [key for key in REQUIRED if key not in value]
    if missing:
        raise UsageError(f"{shown} has no {', '.join(missing)}: {FIX}")
    model_id = value["model_id"]
    if not isinstance(model_id, str) or not MODEL_ID.fullmatch(model_id):
        raise UsageError(f"{shown}: model_id {str(model_id)[:80]!r} is not a model id (letters, digits, . _ -): {FIX}")
    record = {
        "model": checked_url(value["model"], "model", shown, folder=True),
        "model_id": model_id,
        "model_lib": checked_url(value["model_lib"], "model_lib", shown, folder=False),
    }
    for key in OPTIONAL:
        if key in value:
            record[key] = CHECKS[key](value[key], f"{shown}: {key}")
    return record


def checked_url(url: object, key: str, shown: str, *, folder: bool) -> str:
    """An http(s) URL of the entry: a host, no credentials, no fragment, no spaces or controls."""
    problem = None
    if not isinstance(url, str) or not url:
        problem = "is not a URL"
    elif len(url) > MAX_URL_CHARS:
        problem = f"is over {MAX_URL_CHARS} characters"
    elif any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        problem = "holds spaces or control characters"
    else:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (a bad port raises here)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            problem = "is not an http:// or https:// URL with a host"
        elif "@" in parts.netloc:
            problem = "holds credentials (user@): a published entry never does"
        elif parts.fragment or "#" in url:
            problem = "has a fragment (#...)"
        elif folder and parts.query:
            problem = "has a query (?...): WebLLM appends file names to it"
        elif not folder and (parts.path.endswith("/") or not parts.path.strip("/")):
            problem = "names a folder, not the model library's .wasm file"
    if problem:
        raise UsageError(f"{shown}: {key} {str(url)[:120]!r} {problem}: {FIX}")
    return url


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{what} is {str(value)[:40]!r}, not a number of 0 or more: {FIX}")
    return value


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{what} is {str(value)[:40]!r}, not a whole number of 0 or more: {FIX}")
    return value


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{what} is {str(value)[:40]!r}, not true or false: {FIX}")
    return value


def _features(value: object, what: str) -> list[str]:
    if (
        not isinstance(value, list)
        or len(value) > 16
        or not all(isinstance(f, str) and FEATURE.fullmatch(f) for f in value)
    ):
        raise UsageError(f'{what} is not a list of WebGPU feature names (e.g. ["shader-f16"]): {FIX}')
    return list(value)


def _model_type(value: object, what: str) -> int:
    if isinstance(value, bool) or value not in MODEL_TYPES:
        raise UsageError(f"{what} is {str(value)[:40]!r}, not one of WebLLM's model types {MODEL_TYPES}: {FIX}")
    return value


def _overrides(value: object, what: str) -> dict:
    """What the entry overrides of mlc-chat-config.json: names as the chat config's, JSON values."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and OVERRIDE_KEY.fullmatch(k) for k in value):
        raise UsageError(
            f'{what} is not an object of chat config settings (e.g. {{"context_window_size": 4096}}): {FIX}'
        )
    return json.loads(json.dumps(value))


CHECKS = {
    "overrides": _overrides,
    "vram_required_MB": _number,
    "low_resource_required": _flag,
    "buffer_size_required_bytes": _count,
    "required_features": _features,
    "model_type": _model_type,
}


def weights_url(model: str) -> str:
    """Where WebLLM reads the weights of `model` (its cleanModelUrl): the URL itself when it names
    a revision (…/resolve/<rev>/), else …/resolve/main/ under it."""
    base = model if model.endswith("/") else model + "/"
    return base if re.search(r".+/resolve/.+/", base) else base + "resolve/main/"


def record_config(record: dict) -> dict:
    """The app config the page hands WebLLM for a published entry: that entry alone, as checked."""
    return {"model_list": [dict(record)]}
