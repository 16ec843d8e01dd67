import importlib.metadata
from pathlib import Path

from llm2wasm.cuda_libs import library_dirs


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
