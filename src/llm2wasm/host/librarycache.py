"""The library cache on the host: where it lives, how a conversion's container gets it, its size.

Conversions (`invoke convert`, every `invoke batch` item) mount one host folder at the same path in
their container and name it in $LLM2WASM_LIB_CACHE, where llm2wasm.image.convert.libcache files each
compiled library under a key of what it depends on; so the fine-tunes of one base compile once, across
output folders, batch items and runs. The folder is the user's (made by the host, owned by them, as the
containers run as them). `invoke clean --lib-cache` empties it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.libcache import CACHE_ENVIRONMENT_VARIABLE, LibraryCache

CONTAINER_LIBRARY_CACHE = "/cache/libraries"


def default_library_cache(environ: Mapping[str, str] = os.environ) -> Path:
    """$LLM2WASM_LIB_CACHE on the host, else llm2wasm/libraries in the user's cache folder (XDG)."""
    chosen = environ.get(CACHE_ENVIRONMENT_VARIABLE, "").strip()
    if chosen:
        return Path(chosen).expanduser()
    base = environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base).expanduser() / "llm2wasm" / "libraries"


def library_cache_for(option: str | None, disabled: bool) -> Path | None:
    """The host folder a conversion shares libraries through, from the task's --lib-cache and
    --no-lib-cache; made if missing, so Docker does not make it (as root) for the mount."""
    if disabled:
        return None
    folder = Path(option).expanduser() if option else default_library_cache()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"library cache {folder}: {error.strerror}: pass --lib-cache DIR (a folder you can write to) "
            "or --no-lib-cache"
        ) from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(
            f"library cache {folder} is not a folder you (uid {os.getuid()}) can write to: "
            "pass --lib-cache DIR or --no-lib-cache"
        )
    return folder.resolve()


def container_arguments(folder: Path | None) -> tuple[list[tuple[Path, str, bool]], dict[str, str], list[str]]:
    """The mount, the host path shown for it and the environment that give a container the cache."""
    if folder is None:
        return [], {}, []
    environment = ["-e", f"{CACHE_ENVIRONMENT_VARIABLE}={CONTAINER_LIBRARY_CACHE}"]
    return [(folder, CONTAINER_LIBRARY_CACHE, False)], {CONTAINER_LIBRARY_CACHE: str(folder)}, environment


def describe(folder: Path) -> str:
    """One line: where the cache is and what it holds."""
    if not folder.is_dir():
        return f"library cache {folder}: empty"
    size = LibraryCache(folder).size()
    return f"library cache {folder}: {size / 2**20:.1f} MiB"


def empty(folder: Path) -> str:
    """Remove every entry (the folder stays); what was freed, in a line."""
    before = describe(folder)
    if folder.is_dir():
        LibraryCache(folder).clear()
    return f"{before}; emptied"
