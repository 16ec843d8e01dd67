"""Find the library folders of the installed nvidia-* wheels (CUDA runtime, NVRTC, cuBLAS ...).

The MLC CUDA wheels do not bundle these; torch pulls them in as nvidia-* packages. The image's
LD_LIBRARY_PATH is derived from what is actually installed, never from a typed site-packages path.
Runs inside an image (python - < this file) and needs only the standard library.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from pathlib import Path


def library_dirs(distributions: Iterable[importlib.metadata.Distribution] | None = None) -> list[str]:
    dirs: set[str] = set()
    for dist in distributions if distributions is not None else importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if not name.startswith("nvidia-"):
            continue
        for file in dist.files or []:
            if ".so" in file.name:
                dirs.add(str(Path(dist.locate_file(file)).resolve().parent))
    return sorted(dirs)


if __name__ == "__main__":
    print(":".join(library_dirs()))
