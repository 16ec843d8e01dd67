"""`invoke convert` on the host: run `llm2wasm convert` in the built image.

The model (and adapter) are mounted read-only, OUT read-write; the container runs as the calling
user so the files it writes are theirs; the GPU is passed through when Docker has the NVIDIA
runtime (said either way). The container has no network and is given no secret: a model folder is
hostile input (docs/SECURITY.md), and a token there could only leak, since nothing in it can use
one. It runs with no capabilities, no privilege escalation and a bound on its processes, under
`--init`, and is stopped when `invoke convert` is interrupted.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.host import docker, librarycache
from llm2wasm.image.convert.outputlock import HOST_PID_VARIABLE
from llm2wasm.image.hostpaths import HOST_PATHS_VARIABLE

CONTAINER_OUTPUT_ROOT = "/output"
# A conversion runs python, emcc (node), a few compilers in threads: far below this; a fork bomb not.
CONVERSION_PIDS_LIMIT = 4096
# What `docker stop` gives the converter to end its steps before it is killed.
STOP_GRACE_SECONDS = 10
# What a conversion's container may not take of the machine's memory: enough for the host to stay
# responsive, so running out kills the conversion (exit 137, said so) and nothing else.
HOST_MEMORY_RESERVE = 2**30
MIN_MEMORY_LIMIT = 2 * 2**30
# A smaller limit, chosen by the user: a CI runner shared with other jobs, or proving that a
# conversion fits a smaller machine (bench/scale.py --memory-limit). Docker's units: 8g is 8 GiB.
MEMORY_LIMIT_VARIABLE = "LLM2WASM_MEMORY_LIMIT"
MEMORY_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory_size(text: str) -> int:
    """Docker's spelling of a size (8g, 512m, 8589934592; binary units, an optional b or ib after
    the letter); UsageError (exit 2) for anything else or for less than 1 GiB."""
    spelled = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = (spelled[:-1], spelled[-1]) if spelled[-1:].isalpha() else (spelled, "")
    try:
        size = int(float(number) * MEMORY_UNITS[unit])
    except (KeyError, ValueError):
        raise UsageError(
            f"{MEMORY_LIMIT_VARIABLE}={text!r} is not a size: give one as Docker does, such as 8g (8 GiB) or 16384m"
        ) from None
    if size < 2**30:
        raise UsageError(f"{MEMORY_LIMIT_VARIABLE}={text!r}: a conversion needs at least 1 GiB; give a larger size")
    return size


def memory_limit_source() -> str:
    if os.environ.get(MEMORY_LIMIT_VARIABLE):
        return MEMORY_LIMIT_VARIABLE
    return "this machine's memory less 1 GiB"


def default_memory_limit() -> int | None:
    """The conversion container's memory limit: $LLM2WASM_MEMORY_LIMIT when set, else the machine's
    memory less a reserve for the host (None where it cannot be read)."""
    chosen = os.environ.get(MEMORY_LIMIT_VARIABLE)
    if chosen:
        return parse_memory_size(chosen)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return max(MIN_MEMORY_LIMIT, total - HOST_MEMORY_RESERVE)


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
    # A model from the Hub cache (llm2wasm.host.hubfetch): file name -> the file itself. Its snapshot
    # folder holds links into the cache's blobs/, which the converter refuses (links out of a model
    # folder); so each file is mounted on its own, as a regular file of /input/model.
    model_files: dict[str, Path] | None = None
    shown_model: str | None = None  # how messages name the model (default: model_dir)
    adapter_files: dict[str, Path] | None = None  # a Hub adapter's files, mounted one by one as the model's
    shown_adapter: str | None = None  # how messages name the adapter (default: its folder)
    # the host folder of the shared library cache (llm2wasm.host.librarycache), or None: always compile
    library_cache: Path | None = None


def folder_mounts(folder: Path, files: dict[str, Path] | None, target: str) -> list[tuple[Path, str, bool]]:
    """A folder, read-only at `target`; or its files one by one (a Hub snapshot)."""
    if files is None:
        return [(folder.resolve(), target, True)]
    mounts = []
    for name, path in sorted(files.items()):
        if "/" in name or name in ("", ".", ".."):
            raise UsageError(f"file name {name!r} of {folder} is not a plain file name")
        mounts.append((path.resolve(strict=True), f"{target}/{name}", True))
    return mounts


def model_mounts(job: ConvertJob) -> list[tuple[Path, str, bool]]:
    """The model folder, read-only at /input/model; or its files one by one (a Hub snapshot)."""
    return folder_mounts(job.model_dir, job.model_files, "/input/model")


def convert_options(**options: object) -> list[str]:
    """`llm2wasm convert`'s options from the task's keywords: a value as `--name value`, True as a
    flag; None and False are left out (the command's own defaults apply)."""
    arguments: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            arguments.append(flag)
        elif value is not None and value is not False:
            arguments += [flag, str(value)]
    return arguments


# the conversion's scratch on a read-only root; its pages count against the container's memory limit
SCRATCH_TMPFS = "/tmp:rw,nosuid,nodev,noexec"


def docker_has_gpu_runtime() -> bool:
    result = docker.run(["info", "--format", "{{json .Runtimes}}"], check=False)
    return result.returncode == 0 and "nvidia" in json.loads(result.stdout or "{}")


def bind_mount(host: Path, container: str, read_only: bool) -> list[str]:
    """`--mount` rather than `-v`: a host path with `:` is a path there, not a volume spec. The
    fields are CSV (Docker reads them so), quoted where the path holds a comma or a quote."""
    fields = ["type=bind", f"source={host}", f"target={container}", *(["readonly"] if read_only else [])]
    if any(ch in str(host) for ch in "\n\r"):
        raise UsageError(f"{host!r}: a path with a line break cannot be mounted; rename the folder")
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(fields)
    return ["--mount", buffer.getvalue()]


def conversion_container(
    mounts: list[tuple[Path, str, bool]],
    shown: dict[str, str],
    gpu: bool,
    user: str | None = None,
    library_cache: Path | None = None,
) -> list[str]:
    """The start of every `docker run` a conversion runs in (`invoke convert`, each `invoke batch`
    item): as the calling user (uid:gid), so the files it writes are theirs; without network and
    without secrets; with the least it needs (no capabilities: it only reads and writes files as
    that user; no setuid escalation; a bound on processes and on memory, short of the machine's);
    under tini (`--init`), so a stop reaches
    the converter and its children; the given (host folder, container path, read-only) mounts; the
    host paths the container's messages show in place of its own (llm2wasm.image.hostpaths); the GPU when
    asked (the NVIDIA runtime adds its devices itself, capabilities or not); the shared library cache,
    read-write, where one is given (llm2wasm.host.librarycache).

    The root file system is read-only, /tmp a tmpfs (no devices, setuid or executables on it): what a
    model folder gets to run cannot change the image under the next conversion, and writes only to
    the output and to scratch that goes with the container (emscripten's cache: llm2wasm.image.convert.
    emcache). Not with the GPU: the NVIDIA runtime's hook writes into the container's root (its
    library cache), which has not been tried against a read-only root here."""
    cmd = [docker.docker_bin(), "run", "--rm", "--init", "--user", user or f"{os.getuid()}:{os.getgid()}"]
    cmd += ["--network", "none", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    cmd += ["--pids-limit", str(CONVERSION_PIDS_LIMIT)]
    if not gpu:
        cmd += ["--read-only", "--tmpfs", SCRATCH_TMPFS]
    memory = default_memory_limit()
    if memory is not None:  # the same as swap: a conversion that does not fit fails, it does not thrash
        cmd += ["--memory", str(memory), "--memory-swap", str(memory)]
    cache_mounts, cache_shown, cache_environment = librarycache.container_arguments(library_cache)
    for host, container, read_only in [*mounts, *cache_mounts]:
        cmd += bind_mount(host, container, read_only)
    shown = {**shown, **cache_shown}
    cmd += ["-e", f"{HOST_PATHS_VARIABLE}={json.dumps(shown)}", "-e", f"{HOST_PID_VARIABLE}={os.getpid()}"]
    cmd += cache_environment
    if gpu:
        cmd += ["--gpus", "all"]
    return cmd


def check_output_folder(output: Path) -> None:
    """OUT as the host sees it, before a container is started for it."""
    if output.is_symlink() and not output.exists():
        raise UsageError(f"output {output} is a symlink to {os.readlink(output)!r}, which does not exist: "
                         "pass a folder (or create the one it points at)")  # fmt: skip
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} is a file: pass a folder for the bundle (it is created if missing)")
    existing = output if output.exists() else next((p for p in output.parents if p.exists()), output.anchor)
    if not Path(existing).is_dir():
        raise UsageError(f"output {output}: {existing} is a file, not a folder: choose another output folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {existing} (as uid {os.getuid()}): choose an output folder you can write to")


def docker_command(job: ConvertJob, name: str | None = None) -> tuple[list[str], str]:
    """The docker run command and a sentence on where the conversion runs."""
    model_dir, output = job.model_dir.resolve(), job.output.resolve()
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"model folder {model_dir} has no config.json: pass a Hugging Face checkpoint folder")
    if job.adapter is not None and not (job.adapter / "adapter_config.json").is_file():
        raise UsageError(f"adapter folder {job.adapter} has no adapter_config.json: pass PEFT's save_pretrained folder")
    check_output_folder(job.output)
    docker.require_image(job.image)
    # OUT is mounted under its own name, so the bundle's default model id, library name and README
    # name the user's folder, not the mount point; the container's messages show host paths.
    container_output = f"{CONTAINER_OUTPUT_ROOT}/{output.name}"
    mounts = [*model_mounts(job), (output, container_output, False)]
    shown = {container_output: str(output), "/input/model": job.shown_model or str(model_dir)}
    if job.adapter is not None:
        mounts += folder_mounts(job.adapter, job.adapter_files, "/input/adapter")
        shown["/input/adapter"] = job.shown_adapter or str(job.adapter.resolve())
    gpu = docker_has_gpu_runtime() if job.gpu is None else job.gpu
    where = "on the GPU (NVIDIA runtime found)" if gpu else "on the CPU: Docker has no NVIDIA runtime"
    cmd = conversion_container(mounts, shown, gpu, job.user, job.library_cache)
    if name:
        cmd += ["--name", name]
    if sys.stdin.isatty():
        cmd.append("-t")
    cmd += [job.image, "convert", "/input/model", "--quantization", job.quantization, "-o", container_output]
    if job.adapter is not None:
        cmd += ["--adapter", "/input/adapter"]
    cmd += job.options
    return cmd, where


def run_stoppable(command: list[str], name: str) -> int:
    """Run a named container's `docker run` until it ends; on Ctrl-C or SIGTERM stop the container
    (the docker client going away does not stop it) and return 130."""

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:
        print(f"llm2wasm: interrupted: stopping the conversion (container {name}) …", file=sys.stderr, flush=True)
        docker.run(["stop", "--time", str(STOP_GRACE_SECONDS), name], check=False)
        try:
            process.wait(timeout=STOP_GRACE_SECONDS + 20)
        except subprocess.TimeoutExpired:
            process.kill()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_convert_job(job: ConvertJob) -> int:
    name = f"llm2wasm-convert-{os.getpid()}-{secrets.token_hex(3)}"
    cmd, where = docker_command(job, name)
    created = not job.output.exists()
    try:
        job.output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create output folder {job.output}: {error.strerror}; choose another") from None
    print(f"llm2wasm: converting in {job.image} {where}", file=sys.stderr)
    status = run_stoppable(cmd, name)
    if status == 137:
        limit = default_memory_limit()
        print(
            "llm2wasm: the conversion was killed (exit 137): out of memory"
            + (f" (its container may use {limit / 2**30:.1f} GiB, {memory_limit_source()})" if limit else "")
            + " or by `docker kill`. Finished steps are kept: re-run to resume, with fewer conversions at once",
            file=sys.stderr,
        )
    elif status == 130:
        print("llm2wasm: stopped; finished steps are kept: re-run the same command to resume", file=sys.stderr)
    elif status == 2 and created:
        # bad input: the container wrote nothing, so leave nothing behind either
        shutil.rmtree(job.output, ignore_errors=True)
    return status


# where a published entry's file is mounted in the preview container (read-only, the file alone)
CONTAINER_RECORD = "/record/webllm-model-record.json"


@dataclass
class PreviewJob:
    image: str
    bundle: Path | None  # None: `record` instead
    port: int = 8000
    host: str = "127.0.0.1"  # where the port is published on this machine
    name: str | None = None  # container name (tests stop it by name)
    # the URL a browser opens (the server answers to its host only); default: this machine's
    # loopback address when published on every address, else HOST
    public_url: str | None = None
    # a published model_list entry (webllm-model-record.json) to run instead of a bundle: the page
    # loads the model from its URLs (llm2wasm.image.preview.record)
    record: Path | None = None

    def url(self) -> str:
        if self.public_url:
            return self.public_url if self.public_url.endswith("/") else self.public_url + "/"
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}/"


def preview_command(job: PreviewJob) -> list[str]:
    """`llm2wasm preview` in the image, the bundle read-only, the port published on HOST only. The
    bundle is hostile input, so the server gets the least it needs: no capabilities, no privilege
    escalation, a bound on processes (a thread per connection), and a read-only root file system
    (it writes nothing: it reads the bundle and answers; /tmp is a tmpfs should anything want one).
    The public URL is what the browser opens; the server answers to that host only. A published
    entry (`job.record`) is checked here first (exit 2 before Docker), then mounted alone, read-only."""
    if job.record is not None:
        from llm2wasm.image.preview.record import read_record

        read_record(job.record)
        served = bind_mount(job.record.resolve(strict=True), CONTAINER_RECORD, read_only=True)
        arguments = ["--record", CONTAINER_RECORD]
    else:
        bundle = job.bundle.resolve()
        if not (bundle / "app-config.json").is_file():
            raise UsageError(
                f"{bundle / 'app-config.json'} not found: {bundle} is not a bundle made by `invoke convert`"
            )
        served, arguments = bind_mount(bundle, "/bundle", read_only=True), ["/bundle"]
    if docker.image_id(job.image) is None:
        raise UsageError(f"image {job.image} not found: build it with `invoke build` (or pass --image)")
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((job.host, job.port))
        except OSError:
            from llm2wasm.image.preview.server import port_in_use

            raise port_in_use(job.host, job.port) from None
    return [
        docker.docker_bin(),
        "run",
        "--rm",
        "--init",  # Ctrl-C stops the server
        *(["--name", job.name] if job.name else []),
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--pids-limit",
        "256",  # a thread per connection, and a browser opens a handful at a time
        "--read-only",
        "--tmpfs",
        "/tmp",
        "-p",
        f"{job.host}:{job.port}:8000",
        *served,
        job.image,
        "preview",
        *arguments,
        "--host",
        "0.0.0.0",  # inside the container; published on job.host only
        "--port",
        "8000",
        "--public-url",
        job.url(),
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
