"""Find the library folders of the installed NVIDIA CUDA wheels (CUDA runtime, NVRTC, cuBLAS ...).

The MLC CUDA wheels do not bundle these; torch pulls them in. The image's LD_LIBRARY_PATH is
derived from what is actually installed, never from a typed site-packages path. Two layouts exist:
CUDA 12 wheels (nvidia-cuda-runtime-cu12 ...) install into `nvidia/<library>/lib/`, CUDA 13 wheels
(nvidia-cuda-runtime, nvidia-cublas ... of torch's `cuda-toolkit` requirement) share
`nvidia/cu13/lib/` (cuDNN, NCCL keep `nvidia/<library>/lib/`). Only folders of the `nvidia`
package count: other wheels whose names start with nvidia- (flashinfer's nvidia-cutlass-dsl-libs,
`nvidia_cutlass_dsl/cu12/lib/`) carry extension modules of their own, not CUDA libraries.
Runs inside an image (python - < this file) and needs only the standard library.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from pathlib import Path, PurePosixPath


def is_cuda_library(file: PurePosixPath) -> bool:
    """nvidia/<folder>/lib/<name>.so[.N]: a shared library of an NVIDIA CUDA wheel."""
    parts = file.parts
    return len(parts) == 4 and parts[0] == "nvidia" and parts[2] == "lib" and ".so" in parts[3]


def library_dirs(distributions: Iterable[importlib.metadata.Distribution] | None = None) -> list[str]:
    dirs: set[str] = set()
    for dist in distributions if distributions is not None else importlib.metadata.distributions():
        for file in dist.files or []:
            if is_cuda_library(PurePosixPath(str(file))):
                dirs.add(str(Path(dist.locate_file(file)).resolve().parent))
    return sorted(dirs)


if __name__ == "__main__":
    print(":".join(library_dirs()))
