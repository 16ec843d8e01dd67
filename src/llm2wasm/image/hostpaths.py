"""Host paths in what the container says.

`invoke convert` mounts the user's folders at container paths (/input/model, /output/NAME) and
names them in LLM2WASM_HOST_PATHS (a JSON object: container path -> host path). Everything the
`llm2wasm` command writes to stderr then shows the host's paths, so "Bundle in ..." and the log
paths of a failed step are paths the user can open.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path, PurePath
from typing import TextIO

HOST_PATHS_VARIABLE = "LLM2WASM_HOST_PATHS"
# how the host names files it fetched from the Hub (llm2wasm.host.hubconvert): org/name@<commit>
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}")


def host_paths() -> dict[str, str]:
    try:
        mapping = json.loads(os.environ.get(HOST_PATHS_VARIABLE) or "{}")
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in mapping.items()} if isinstance(mapping, dict) else {}


def to_host(text: str, mapping: dict[str, str]) -> str:
    """Container paths in `text` replaced by host paths; the longest container path first, so
    /output/foo is not taken for a prefix match of /output."""
    for container in sorted(mapping, key=len, reverse=True):
        text = text.replace(container, mapping[container])
    return text


def shown_name(path: Path) -> str:
    """The name the user knows a mounted folder by: the host folder's, not the mount point's
    (`invoke convert ~/models/llama-ft` runs on /input/model); for files fetched from the Hub, the
    id and commit they came from, whole (`org/name@<commit>`: its last part alone would drop the org)."""
    shown = to_host(str(path), host_paths())
    if shown != str(path) and HUB_ID.fullmatch(shown):  # not a folder of the host's: a Hub id
        return shown
    return PurePath(shown).name or path.name


class HostPathStream:
    """A text stream that writes through to `stream` with container paths shown as host paths."""

    def __init__(self, stream: TextIO, mapping: dict[str, str]):
        self._stream, self._mapping = stream, mapping

    def write(self, text: str) -> int:
        self._stream.write(to_host(text, self._mapping))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def show_host_paths_on_stderr() -> None:
    mapping = host_paths()
    if mapping and not isinstance(sys.stderr, HostPathStream):
        sys.stderr = HostPathStream(sys.stderr, mapping)


def show_as(local: str, shown: str) -> None:
    """From now on show `local` as `shown` on stderr: the converter reads a model through a view
    folder of its own (llm2wasm.image.convert.inputfiles), but its messages name the user's folder."""
    if isinstance(sys.stderr, HostPathStream):
        sys.stderr._mapping = {**sys.stderr._mapping, local: shown}
    else:
        sys.stderr = HostPathStream(sys.stderr, {local: shown})
