"""A thin layer over the docker CLI (the toolkit's only way to talk to the engine)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from llm2wasm.errors import UsageError


def docker_bin() -> str:
    path = shutil.which("docker")
    if path is None:
        raise UsageError("docker CLI not found: install Docker (on Debian: `bash .ci/install-docker.sh`)")
    return path


def run(
    args: Sequence[str],
    *,
    check: bool = True,
    capture: bool = True,
    input: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [docker_bin(), *args], check=check, capture_output=capture, text=True, input=input, timeout=timeout
    )


def ensure_engine() -> None:
    result = run(["info", "--format", "{{.ServerVersion}}"], check=False)
    if result.returncode != 0:
        raise UsageError(
            "the Docker engine is not reachable: start dockerd (as root: `bash .ci/install-docker.sh`) "
            f"or check DOCKER_HOST.\n{result.stderr.strip()}"
        )


def image_id(ref: str) -> str | None:
    """The image's ID, None when there is no such image; a UsageError when the engine cannot be
    reached (a stopped daemon is not a missing image: `invoke build` would not help)."""
    result = run(["image", "inspect", "--format", "{{.Id}}", ref], check=False)
    if result.returncode == 0:
        return result.stdout.strip()
    if "no such" not in result.stderr.lower():
        ensure_engine()
    return None


def require_image(ref: str) -> str:
    """The image's ID; a UsageError naming the build that makes it when there is none. An image of
    llm2wasm's own (`REPOSITORY:app-PROFILE`) names its profile: a bare `invoke build` makes the
    stable one, which a machine without a GPU or without internet did not build."""
    found = image_id(ref)
    if found is not None:
        return found
    profile = re.fullmatch(r"[^:]+:app-([A-Za-z0-9_.-]+)", ref)
    build = f"invoke build --profile {profile.group(1)}" if profile else "invoke build"
    raise UsageError(f"image {ref} not found: build it with `{build}`, or pass --profile/--image for one you built")


def tag(source: str, target: str) -> None:
    run(["tag", source, target])


def remove_image(ref: str) -> None:
    run(["image", "rm", "--force", ref], check=False)


def remove_if_unused(image: str) -> None:
    """Remove an image that no tag or container uses any more (Docker refuses otherwise; fine)."""
    run(["image", "rm", image], check=False)


def build(
    *,
    dockerfile: Path,
    context: Path,
    build_args: dict[str, str],
    network: str,
    iidfile: Path,
    on_line: Callable[[str], None],
    no_cache: bool = False,
) -> int:
    """docker build with BuildKit, streaming each output line to on_line. Returns the exit status.

    The image is not tagged here: the builder tags it only after its checks pass.
    """
    cmd = [docker_bin(), "build", "--progress=plain", "--file", str(dockerfile), "--iidfile", str(iidfile)]
    if no_cache:  # e.g. for nightlies: a cached `pip install` never sees a newer wheel
        cmd.append("--no-cache")
    if network and network != "default":
        cmd += ["--network", network]
    for key, value in build_args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    cmd.append(str(context))
    env = dict(os.environ, DOCKER_BUILDKIT="1")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        return proc.wait()


def run_script(image: str, script: str, *, timeout: float = 300) -> str:
    """Run a Python script (on stdin) in a throwaway container of image; return its stdout."""
    result = run(
        ["run", "--rm", "-i", "--network", "none", "--entrypoint", "python", image, "-"],
        input=script,
        check=False,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"script in {image} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout
