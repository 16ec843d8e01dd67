"""A writable emscripten cache for a conversion on a read-only root file system.

Conversions run with a read-only root (llm2wasm.host.run: `--read-only`, /tmp a tmpfs), so nothing a
hostile model folder gets to run can change the image for the next conversion. emscripten keeps its
system libraries in one folder, EM_CACHE, in the image; it reads them at every link and builds a
missing one on first use, writing it there (and takes a lock file there either way). Debian's
emscripten ships them all; an emsdk SDK builds some only when a link first needs them. Where
EM_CACHE cannot be written, this makes a folder of symbolic links to it in /tmp and points EM_CACHE
there: the libraries are read where they are, and one built now lands in the scratch folder and is
gone with the container. Files emscripten rewrites in place (its lock, its stamps) are copied, not
linked, so no write ever goes through a link into the image.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

VARIABLE = "EM_CACHE"
FARM_NAME = "llm2wasm-em-cache"
REWRITTEN_IN_PLACE = (".lock", ".stamp")


def link_farm(source: Path, target: Path) -> None:
    """Folders made, files symlinked (the ones emscripten rewrites copied) from source to target."""
    for folder, subfolders, files in os.walk(source):
        relative = Path(folder).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            original = Path(folder) / name
            destination = target / relative / name
            if destination.exists() or destination.is_symlink():
                continue
            if name.endswith(REWRITTEN_IN_PLACE):
                shutil.copyfile(original, destination)
            else:
                destination.symlink_to(original)
        subfolders.sort()


def ensure_writable_cache(scratch: Path | None = None) -> Path | None:
    """Point EM_CACHE at a writable view of itself when it is read-only; the new path, or None when
    nothing had to change (no EM_CACHE, or one this process may write)."""
    cache = os.environ.get(VARIABLE)
    if not cache or not Path(cache).is_dir() or os.access(cache, os.W_OK):
        return None
    farm = (scratch or Path(tempfile.gettempdir())) / FARM_NAME
    link_farm(Path(cache), farm)
    os.environ[VARIABLE] = str(farm)
    return farm
