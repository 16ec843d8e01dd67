"""`invoke convert` on the host: run `llm2wasm convert` in the built image.

The model (and adapter) are mounted read-only, OUT read-write; the container runs as the calling
user so the files it writes are theirs; the GPU is passed through when Docker has the NVIDIA
runtime (said either way); a Hugging Face token is handed over at run time only when set, by
name (`-e HF_TOKEN`), so its value is neither on the command line nor in any layer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import docker
from .errors import UsageError
from .hostpaths import HOST_PATHS_VARIABLE

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
CONTAINER_OUTPUT_ROOT = "/output"


@dataclass
class ConvertJob:
    image: str
    model_dir: Path
    output: Path
    quantization: str
    adapter: Path | None = None
    options: list[str] = field(default_factory=list)  # further `llm2wasm convert` options, passed through
    user: str | None = None  # uid:gid; default: the caller's
    gpu: bool | None = None  # None: detect


def docker_has_gpu_runtime() -> bool:
    result = docker.run(["info", "--format", "{{json .Runtimes}}"], check=False)
    return result.returncode == 0 and "nvidia" in json.loads(result.stdout or "{}")


def conversion_container(
    mounts: list[tuple[Path, str, bool]], shown: dict[str, str], gpu: bool, user: str | None = None
) -> list[str]:
    """The start of every `docker run` a conversion runs in (`invoke convert`, each `invoke batch`
    item): as the calling user (uid:gid), so the files it writes are theirs; without network; the
    given (host folder, container path, read-only) mounts; the host paths the container's messages
    show in place of its own (llm2wasm.hostpaths); the GPU when asked."""
    cmd = [docker.docker_bin(), "run", "--rm", "--user", user or f"{os.getuid()}:{os.getgid()}", "--network", "none"]
    for host, container, read_only in mounts:
        cmd += ["-v", f"{host}:{container}:ro" if read_only else f"{host}:{container}"]
    cmd += ["-e", f"{HOST_PATHS_VARIABLE}={json.dumps(shown)}"]
    if gpu:
        cmd += ["--gpus", "all"]
    return cmd


def docker_command(job: ConvertJob) -> tuple[list[str], str]:
    """The docker run command and a sentence on where the conversion runs."""
    model_dir, output = job.model_dir.resolve(), job.output.resolve()
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"model folder {model_dir} has no config.json: pass a Hugging Face checkpoint folder")
    if job.adapter is not None and not (job.adapter / "adapter_config.json").is_file():
        raise UsageError(f"adapter folder {job.adapter} has no adapter_config.json: pass PEFT's save_pretrained folder")
    if docker.image_id(job.image) is None:
        raise UsageError(f"image {job.image} not found: build it with `invoke build` (or pass --image)")
    # OUT is mounted under its own name, so the bundle's default model id, library name and README
    # name the user's folder, not the mount point; the container's messages show host paths.
    container_output = f"{CONTAINER_OUTPUT_ROOT}/{output.name}"
    mounts = [(model_dir, "/input/model", True), (output, container_output, False)]
    shown = {container_output: str(output), "/input/model": str(model_dir)}
    if job.adapter is not None:
        mounts.append((job.adapter.resolve(), "/input/adapter", True))
        shown["/input/adapter"] = str(job.adapter.resolve())
    gpu = docker_has_gpu_runtime() if job.gpu is None else job.gpu
    where = "on the GPU (NVIDIA runtime found)" if gpu else "on the CPU: Docker has no NVIDIA runtime"
    cmd = conversion_container(mounts, shown, gpu, job.user)
    for name in TOKEN_VARIABLES:
        if os.environ.get(name):
            cmd += ["-e", name]  # by name: docker copies the value from our environment
    if sys.stdin.isatty():
        cmd.append("-t")
    cmd += [job.image, "convert", "/input/model", "--quantization", job.quantization, "-o", container_output]
    if job.adapter is not None:
        cmd += ["--adapter", "/input/adapter"]
    cmd += job.options
    return cmd, where


def run_convert_job(job: ConvertJob) -> int:
    cmd, where = docker_command(job)
    created = not job.output.exists()
    job.output.mkdir(parents=True, exist_ok=True)
    print(f"llm2wasm: converting in {job.image} {where}", file=sys.stderr)
    status = subprocess.run(cmd).returncode
    if status == 2 and created:
        # bad input: the container wrote nothing, so leave nothing behind either
        shutil.rmtree(job.output, ignore_errors=True)
    return status


@dataclass
class PreviewJob:
    image: str
    bundle: Path
    port: int = 8000
    host: str = "127.0.0.1"  # where the port is published on this machine
    name: str | None = None  # container name (tests stop it by name)


def preview_command(job: PreviewJob) -> list[str]:
    """`llm2wasm preview` in the image, the bundle read-only, the port published on HOST only."""
    bundle = job.bundle.resolve()
    if not (bundle / "app-config.json").is_file():
        raise UsageError(f"{bundle / 'app-config.json'} not found: {bundle} is not a bundle made by `invoke convert`")
    if docker.image_id(job.image) is None:
        raise UsageError(f"image {job.image} not found: build it with `invoke build` (or pass --image)")
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((job.host, job.port))
        except OSError:
            from .preview.server import port_in_use

            raise port_in_use(job.host, job.port) from None
    return [
        docker.docker_bin(),
        "run",
        "--rm",
        "--init",  # Ctrl-C stops the server
        *(["--name", job.name] if job.name else []),
        "-p",
        f"{job.host}:{job.port}:8000",
        "-v",
        f"{bundle}:/bundle:ro",
        job.image,
        "preview",
        "/bundle",
        "--host",
        "0.0.0.0",  # inside the container; published on job.host only
        "--port",
        "8000",
        "--public-url",
        f"http://{job.host}:{job.port}/",
    ]


def run_preview_job(job: PreviewJob) -> int:
    """Serve until interrupted; the container goes with the command (by name: killing only the
    docker client, as an interrupt of this process alone does, would leave the server running)."""
    if job.name is None:
        job.name = f"llm2wasm-preview-{job.port}"
    command = preview_command(job)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a terminated task stops its server too
    try:
        return subprocess.run(command).returncode
    except KeyboardInterrupt:
        return 130
    finally:
        docker.run(["rm", "-f", job.name], check=False)
