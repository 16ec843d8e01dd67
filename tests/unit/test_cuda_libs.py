import importlib.metadata
from pathlib import Path

from llm2wasm.image.scripts.cuda_libs import library_dirs


def make_dist(root: Path, name: str, files: list[str]) -> importlib.metadata.Distribution:
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in files))
    for path in files:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("")
    return importlib.metadata.PathDistribution(info)


def test_library_dirs_from_installed_nvidia_wheels(tmp_path):
    dists = [
        make_dist(
            tmp_path,
            "nvidia-cuda-runtime-cu12",
            ["nvidia/cuda_runtime/lib/libcudart.so.12", "nvidia/cuda_runtime/__init__.py"],
        ),
        make_dist(
            tmp_path, "nvidia-cublas-cu12", ["nvidia/cublas/lib/libcublas.so.12", "nvidia/cublas/lib/libcublasLt.so.12"]
        ),
        make_dist(tmp_path, "torch", ["torch/lib/libtorch.so"]),
    ]
    assert library_dirs(dists) == [str(tmp_path / "nvidia/cublas/lib"), str(tmp_path / "nvidia/cuda_runtime/lib")]


def test_no_nvidia_wheels_no_dirs(tmp_path):
    assert library_dirs([make_dist(tmp_path, "numpy", ["numpy/core/_multiarray.so"])]) == []


def test_cuda_13_wheels_share_one_folder(tmp_path):
    """The layout of torch 2.13.0's CUDA 13 wheels (their RECORDs): nvidia/cu13/lib for the toolkit,
    nvidia/<library>/lib for cuDNN and NCCL."""
    dists = [
        make_dist(
            tmp_path, "nvidia-cuda-runtime", ["nvidia/cu13/lib/libcudart.so.13", "nvidia/cu13/lib/libcudart_static.a"]
        ),
        make_dist(tmp_path, "nvidia-cuda-nvrtc", ["nvidia/cu13/lib/libnvrtc.so.13"]),
        make_dist(tmp_path, "nvidia-cublas", ["nvidia/cu13/lib/libcublas.so.13", "nvidia/cu13/include/cublas.h"]),
        make_dist(tmp_path, "nvidia-cudnn-cu13", ["nvidia/cudnn/lib/libcudnn.so.9"]),
    ]
    assert library_dirs(dists) == [str(tmp_path / "nvidia/cu13/lib"), str(tmp_path / "nvidia/cudnn/lib")]


def test_flashinfers_cutlass_dsl_is_not_a_cuda_library(tmp_path):
    """mlc-llm's Linux dependency flashinfer-python pulls nvidia-cutlass-dsl-libs-cu12/-cu13, whose
    extension modules live outside the nvidia package: they stay off LD_LIBRARY_PATH (a CPU image
    has none)."""
    dists = [
        make_dist(
            tmp_path,
            "nvidia-cutlass-dsl-libs-cu12",
            [
                "nvidia_cutlass_dsl/cu12/lib/libcute_dsl_runtime.so",
                "nvidia_cutlass_dsl/python_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu12.cpython-312-x86_64-linux-gnu.so",
            ],
        ),
        make_dist(tmp_path, "nvidia-cudnn-frontend", ["cudnn/_compiled_module.cpython-312-x86_64-linux-gnu.so"]),
    ]
    assert library_dirs(dists) == []
