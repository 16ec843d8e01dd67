"""The driver stub in the real ml image, with a stand-in CUDA wheel library (tests/standins/cuda-wheel):
the MLC CUDA wheels cannot be installed here, and no GPU or NVIDIA driver exists here.

What is real: the hermetic ml image and its checks, the image's loader, Python and `import tvm`, the
stub generator as the ml Dockerfile runs it. What stands in: the wheel's library that needs
libcuda.so.1, and the driver the NVIDIA container toolkit would mount.
"""

from __future__ import annotations

import platform
import subprocess

import pytest

from llm2wasm.host.pins import resolve_profile
from llm2wasm.host.verify import run_checks
from tests.conftest import HERMETIC, build_derived_image

ML_IMAGE = f"llm2wasm:ml-{HERMETIC}"
CHECK = "test_cuda_driver_stub_covers_every_library_that_needs_the_driver"
# Where the NVIDIA container toolkit mounts the host's driver on Debian and Ubuntu images
MOUNTED_DRIVER = f"/usr/lib/{platform.machine()}-linux-gnu/libcuda.so.1"
LOAD = (
    "import ctypes, sysconfig; "
    "print(ctypes.CDLL(sysconfig.get_paths()['platlib'] + '/tvm_cuda_standin/libtvm_runtime.so')"
    ".standin_driver_version())"
)


# What a CUDA wheel's library looks like after `pip install`: in site-packages, after the ml
# layer's stub step (the stub then lacks what it imports), or in an image without any stub
ADD_LIBRARY = (
    f"FROM {ML_IMAGE}\n"
    "COPY tvm/libtvm_runtime.so /tmp/libtvm_runtime.so\n"
    'RUN folder="$(python -c "import sysconfig; print(sysconfig.get_paths()[\'platlib\'])")/tvm_cuda_standin" '
    '&& mkdir "$folder" && mv /tmp/libtvm_runtime.so "$folder/"\n'
)
IMAGES = {
    "stale-stub": ADD_LIBRARY,
    "no-stub": ADD_LIBRARY + 'RUN rm -r /opt/llm2wasm/cuda-driver-stub "$(python -c "import sysconfig; '
    "print(sysconfig.get_paths()['platlib'])\")\"/_llm2wasm_cuda_driver_fallback.*\n",
    "stub": ADD_LIBRARY + "RUN python /opt/llm2wasm/cuda_driver_stub.py install\n",
}


@pytest.fixture(scope="module")
def standin_images(hermetic_chain, cuda_wheel_standin):
    tags = {kind: f"llm2wasm-standin:cuda-wheel-{kind}" for kind in IMAGES}
    for kind, dockerfile in IMAGES.items():
        build_derived_image(tags[kind], dockerfile, cuda_wheel_standin.site)
    yield tags
    for tag in tags.values():
        subprocess.run(["docker", "image", "rm", tag], capture_output=True)


def run_python(image: str, *docker_args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "none", *docker_args, image, "python", "-c", LOAD],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def pins(hermetic_mirror):
    return resolve_profile(HERMETIC, [f"mlc_llm_requirement={hermetic_mirror.mlc_llm_requirement()}"])


def test_the_real_tvm_wheels_cuda_runtime_needs_the_driver_and_gets_the_stub(hermetic_chain, pins):
    # apache-tvm 0.26.0 from the Python registry is a CUDA build of TVM: its CUDA runtime,
    # tvm/lib/libtvm_runtime_cuda.so, needs libcuda.so.1 (and libcudart.so.13)
    facts = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            ML_IMAGE,
            "python",
            "-c",
            "import sys; sys.path.insert(0, '/opt/llm2wasm'); import cuda_driver_stub as s; "
            "print(*sorted(str(p) for p in s.driver_imports(s.site_packages())))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [path for path in facts if path.endswith("/tvm/lib/libtvm_runtime_cuda.so")], facts
    result = run_checks(ML_IMAGE, "ml", pins, own_only=True, extra_args=["-k", CHECK])
    assert result.passed and result.summary.startswith("1 passed"), result.output


@pytest.mark.parametrize(
    ("kind", "load_error", "check_error"),
    [
        ("no-stub", "libcuda.so.1: cannot open shared object file", "need libcuda.so.1, but no driver stub"),
        ("stale-stub", "undefined symbol: cu", "the driver stub lacks cuDriverGetVersion, cuInit, which"),
    ],
)
def test_a_library_that_needs_the_driver_without_a_stub_for_it_is_caught(
    standin_images, pins, kind, load_error, check_error
):
    loaded = run_python(standin_images[kind])
    assert loaded.returncode != 0 and load_error in loaded.stderr, loaded.stderr
    result = run_checks(standin_images[kind], "ml", pins, own_only=True, extra_args=["-k", CHECK])
    assert not result.passed
    assert f"FAILED verify/test_ml.py::{CHECK}" in result.output and check_error in result.output


def test_with_the_stub_the_library_loads_and_the_ml_checks_pass(standin_images, pins):
    loaded = run_python(standin_images["stub"])
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "-34"  # CUDA_ERROR_STUB_LIBRARY: no GPU here, and it says so
    # every ml check, TVM and mlc_llm imports among them, with the start-up hook in every interpreter
    result = run_checks(standin_images["stub"], "ml", pins, own_only=True)
    assert result.passed, result.output


def test_a_mounted_driver_wins_over_the_stub(standin_images, cuda_wheel_standin):
    # as `docker run --gpus` does: the toolkit mounts the host's libcuda.so.1 into the library folder
    mount = f"{cuda_wheel_standin.driver / 'libcuda.so.1'}:{MOUNTED_DRIVER}:ro"
    loaded = run_python(standin_images["stub"], "-v", mount)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "13000"
