"""Shared fixtures: the Docker engine, the hermetic mirror, the hermetic image chain."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from llm2wasm.host import docker

ROOT = Path(__file__).resolve().parents[1]
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
HERMETIC = "hermetic"


_MODULE_TIMES: dict[str, list[float]] = {}  # test file -> [first start, last finish] (wall clock)


def pytest_runtest_logstart(nodeid, location):
    _MODULE_TIMES.setdefault(location[0], [time.monotonic(), time.monotonic()])


def pytest_runtest_logfinish(nodeid, location):
    _MODULE_TIMES[location[0]][1] = time.monotonic()


def pytest_terminal_summary(terminalreporter):
    """Where a run's time goes, a line per test file (its module fixtures included: a shared
    session fixture, such as the hermetic chain's build, counts in the first file that uses it)."""
    if not _MODULE_TIMES:
        return
    terminalreporter.section("time per test file")
    unit = sum(end - start for path, (start, end) in _MODULE_TIMES.items() if "integration" not in path)
    terminalreporter.write_line(f"{unit:8.1f}s  unit tests together")
    for path, (start, end) in _MODULE_TIMES.items():
        if "integration" in path:
            terminalreporter.write_line(f"{end - start:8.1f}s  {path}")


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


@functools.cache
def shared_library_cache() -> Path:
    """One library cache for the conversions of this test session that opt into it: the matrix rows
    and batch items whose base another test compiled reuse its library, as users' fine-tunes do."""
    return Path(tempfile.mkdtemp(prefix="llm2wasm-test-libraries-"))


def invoke(*args: str, env: dict | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    """Run a task the way a user does; output captured as text. A conversion it runs gets an empty
    library cache of its own (not the user's, nor another test's) unless `env` names one."""
    own_cache = {"LLM2WASM_LIB_CACHE": tempfile.mkdtemp(prefix="llm2wasm-test-libraries-")}
    return subprocess.run(
        [*INVOKE, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, **own_cache, **(env or {})},
    )


@pytest.fixture(scope="session")
def docker_engine():
    result = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(
            "the integration tests need a running Docker engine: run `bash .ci/setup.sh` as root "
            f"(or `invoke test --unit` for the unit tests only)\n{result.stderr}"
        )
    return result.stdout.strip()


@pytest.fixture(scope="session")
def hermetic_mirror(docker_engine):
    sys.path.insert(0, str(ROOT / "tests" / "hermetic"))
    import mirror

    started = mirror.up()
    yield mirror
    if started:
        mirror.stop_servers()


@pytest.fixture(scope="session")
def hermetic_chain(hermetic_mirror):
    """Every layer of the hermetic profile, built and verified with `invoke build`. In CI (CI=true) the
    build ignores Docker's cache, so the chain is proven from nothing even on a machine that built it before."""
    fresh = ["--no-cache"] if os.environ.get("CI") else []
    result = invoke("build", *hermetic_build_args(hermetic_mirror), *fresh)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@dataclass(frozen=True)
class SelftestRun:
    """`invoke verify --selftest --keep`, once per session: its result, the selftest's output and
    what it made (keep/run: tiny-llama, tiny-lora, the bundle)."""

    result: subprocess.CompletedProcess
    log: str
    run: Path


@pytest.fixture(scope="session")
def selftest_on_demand(hermetic_chain, tmp_path_factory) -> SelftestRun:
    """The build's last gate run again on demand, keeping what it made: the verify test checks the
    task, and the conversion tests (tests/integration/test_convert.py) start from its tiny model,
    adapter and bundle, so a session pays for one selftest beside the build's own."""
    keep = tmp_path_factory.mktemp("selftest")
    result = invoke("verify", "--profile", HERMETIC, "--layer", "app", "--own-only", "--selftest", "--keep", str(keep))
    log = ROOT / ".llm2wasm" / "logs" / HERMETIC / "verify-selftest.log"
    return SelftestRun(result, log.read_text() if log.is_file() else "", keep / "run")


def hermetic_build_args(mirror) -> list[str]:
    return ["--profile", HERMETIC, "--quiet", "--set", f"mlc_llm_requirement={mirror.mlc_llm_requirement()}"]


def build_derived_image(tag: str, dockerfile: str, context: Path | None = None) -> None:
    """A small image FROM a built layer, from a Dockerfile given as text (no context unless given)."""
    subprocess.run(
        ["docker", "build", "-q", "-t", tag, *(["-f", "-", str(context)] if context else ["-"])],
        input=dockerfile,
        text=True,
        check=True,
        capture_output=True,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )


CUDA_WHEEL_STANDIN = ROOT / "tests" / "standins" / "cuda-wheel"


@dataclass(frozen=True)
class CudaWheelStandin:
    site: Path  # where a wheel would be installed: tvm/libtvm_runtime.so, which needs libcuda.so.1
    driver: Path  # a folder holding the stand-in NVIDIA driver, libcuda.so.1

    @property
    def library(self) -> Path:
        return self.site / "tvm" / "libtvm_runtime.so"


@pytest.fixture(scope="session")
def cuda_wheel_standin(tmp_path_factory) -> CudaWheelStandin:
    """tests/standins/cuda-wheel compiled with the host's gcc (x86-64 and AArch64 hosts alike)."""
    root = tmp_path_factory.mktemp("cuda-wheel")
    standin = CudaWheelStandin(root / "site-packages", root / "driver")
    standin.library.parent.mkdir(parents=True)
    standin.driver.mkdir()
    gcc = ["gcc", "-shared", "-fPIC", "-O1"]
    link_driver = ["-L", standin.driver, "-l:libcuda.so.1"]
    subprocess.run(
        [
            *gcc,
            "-Wl,-soname,libcuda.so.1",
            "-o",
            standin.driver / "libcuda.so.1",
            CUDA_WHEEL_STANDIN / "nvidia_driver.c",
        ],
        check=True,
    )
    subprocess.run(
        [*gcc, "-Wl,-z,now", "-o", standin.library, CUDA_WHEEL_STANDIN / "tvm_runtime.c", *link_driver],
        check=True,
    )
    return standin


def image_exists(ref: str) -> bool:
    return docker.image_id(ref) is not None


def app_image() -> str:
    return f"llm2wasm:app-{HERMETIC}"


def run_app(
    *args: str,
    mounts: dict[Path, str] | None = None,
    env: dict[str, str] | None = None,
    detach: bool = False,
    timeout: float = 900,
    entrypoint: str | None = None,
    library_cache: Path | None = None,
    memory: str | None = None,
) -> subprocess.CompletedProcess:
    """`docker run` of the hermetic app image as the invoking user, without network: `llm2wasm ARGS`,
    or `ENTRYPOINT ARGS` (e.g. `python -c SCRIPT` to make a test model with the image's own libraries).
    With `library_cache`, a conversion shares libraries through that folder (as `invoke convert` mounts it)."""
    cmd = ["docker", "run", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}"]
    cmd += ["--memory", memory] if memory else []  # a container memory limit (cgroup), as a CI job may set
    if library_cache is not None:
        cmd += ["-v", f"{library_cache}:/cache/libraries", "-e", "LLM2WASM_LIB_CACHE=/cache/libraries"]
    cmd += ["-d"] if detach else ["--rm"]
    cmd += ["--entrypoint", entrypoint] if entrypoint else []
    for host_path, spec in (mounts or {}).items():
        cmd += ["-v", f"{host_path}:{spec}"]
    for key, value in (env or {}).items():
        cmd += ["-e", f"{key}={value}"]
    return subprocess.run([*cmd, app_image(), *args], capture_output=True, text=True, timeout=timeout)
