"""Where the heavy tensor work of a conversion runs: the PEFT merge and `mlc_llm convert_weight`.

`--device auto` (the default) uses the container's CUDA device when there is one and the CPU
otherwise, and says which; `--device cuda` insists (a clear error when there is none); `--device
cpu` never touches a GPU. A CUDA run that runs out of memory is retried on the CPU, with a message.
`mlc_llm compile` needs no device: it generates code for WebGPU on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llm2wasm.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")
OUT_OF_MEMORY_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "CUDA error: out of memory")
NVIDIA_DEVICE = Path("/dev/nvidiactl")


def cuda_available() -> bool:
    """A CUDA device torch can use. The device node is looked at first: without it (no NVIDIA
    runtime, `--gpus` not given) torch is not even imported."""
    if not NVIDIA_DEVICE.exists():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_device(requested: str, has_cuda: Callable[[], bool] = cuda_available) -> tuple[str, str]:
    """(device, sentence saying why) for the merge and weight conversion."""
    if requested not in DEVICES:
        raise UsageError(f"unknown --device {requested!r}: choose one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return "cpu", "merging and converting weights on the CPU (--device cpu)"
    if has_cuda():
        return "cuda", "merging and converting weights on the GPU (CUDA device found)"
    if requested == "cuda":
        raise UsageError(
            "--device cuda, but this container has no CUDA device: run it with the NVIDIA runtime "
            "(`invoke convert` passes the GPU when Docker has it; by hand: docker run --gpus all), "
            "or use --device cpu"
        )
    return "cpu", "merging and converting weights on the CPU (no CUDA device in this container)"


def is_out_of_memory(text: str) -> bool:
    return any(marker in text for marker in OUT_OF_MEMORY_MARKERS)
