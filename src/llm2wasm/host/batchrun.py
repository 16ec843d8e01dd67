"""`invoke batch` on the host: the items of a batch spec in the built image, a few at a time.

Each item is one `docker run IMAGE batch run SPEC --item N -o /output` (the same command a GitHub
Actions job or a Kubernetes pod runs), the spec's folder mounted read-only at /batch and OUT at
/output, as the calling user, without network. Its output goes to OUT/.batch/item-N.log; a line
says when each item starts and ends. The item is marked running before its container starts, and
failed if the container ends without recording how the item ended (killed: exit 137), so that an
earlier run's "ok" never stands for this one. Afterwards the outcomes are collected into
OUT/app-config.json and OUT/batch-report.json (llm2wasm.image.batch.status), with a table.

Hub items (`hub = "org/name[@revision]"`, `adapter_hub =`) are fetched here, on the host, before any
item runs: each distinct id once, the way `invoke convert org/name` fetches (llm2wasm.host.hubconvert;
the token is used for that and nowhere else), and a refusal (a missing repository, a revision that
does not exist, no safetensors, a gated repository) stops the batch with exit 2 before any item
starts. The item's container gets the fetched files mounted one by one at /input/model (and
/input/adapter), as `invoke convert` mounts them, and is told so (`batch run --fetched-model`); once
the item succeeds, its bundle records where the model came from (source.json), as `invoke convert`'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.host import docker, hubfetch
from llm2wasm.host.hubconvert import ModelSource, fetch_adapter_source, fetch_model_source, record_source
from llm2wasm.host.run import conversion_container, docker_has_gpu_runtime, folder_mounts
from llm2wasm.image.batch.spec import BatchSpec, Item, load_spec
from llm2wasm.image.batch.status import (
    FINISHED,
    RUN_ID_VARIABLE,
    STATUS_DIR,
    Outcome,
    collect,
    mark_finished,
    mark_running,
    new_run_id,
    read_status,
    table,
)

CONTAINER_SPEC_DIR = "/batch"
CONTAINER_OUTPUT = "/output"
# where a Hub item's fetched files are mounted, as `invoke convert` mounts a Hub model's (llm2wasm.host.run)
CONTAINER_MODEL = "/input/model"
CONTAINER_ADAPTER = "/input/adapter"
# a conversion's peak memory on the CPU (merge and weight conversion of a small model); a default
# that lets a 2-core, 24 GiB machine run two at once and keeps an 8 GiB one to one
MEMORY_PER_JOB_GIB = 8


def default_jobs() -> int:
    """Items at once: one per core, at most one per MEMORY_PER_JOB_GIB of memory."""
    cores = os.cpu_count() or 1
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = MEMORY_PER_JOB_GIB
    return max(1, min(cores, int(memory_gib // MEMORY_PER_JOB_GIB)))


@dataclass(frozen=True)
class HubSources:
    """The spec's Hub models and adapters, fetched: the id as the spec writes it -> its source."""

    models: dict[str, ModelSource] = field(default_factory=dict)
    adapters: dict[str, ModelSource] = field(default_factory=dict)

    def model_of(self, item: Item) -> ModelSource | None:
        return self.models[item.hub] if item.hub else None

    def adapter_of(self, item: Item) -> ModelSource | None:
        return self.adapters[item.adapter_hub] if item.adapter_hub else None


def fetch_hub_sources(spec: BatchSpec, say: Callable[[str], None], *, allow_pickle: bool = False) -> HubSources:
    """Every distinct Hub model and adapter of the spec, fetched once (what the cache holds is not
    downloaded again), before any item runs: a refusal is a UsageError (exit 2) and nothing has run.
    allow_pickle comes from the command line, never from the spec: a spec is input that may come from
    someone else, and fetching pickles is the user's own decision (as `invoke convert --allow-pickle`)."""
    models = sorted({item.hub for item in spec.items if item.hub})
    adapters = sorted({item.adapter_hub for item in spec.items if item.adapter_hub})
    if models or adapters:
        say(f"llm2wasm batch: fetching {len(models) + len(adapters)} Hub model(s) and adapter(s) on this host")
    return HubSources(
        models={text: fetch_model_source(hubfetch.parse_hub_ref(text), allow_pickle=allow_pickle) for text in models},
        adapters={
            text: fetch_adapter_source(hubfetch.parse_hub_ref(text), allow_pickle=allow_pickle) for text in adapters
        },
    )


def item_command(
    spec: BatchSpec,
    item: Item,
    image: str,
    output: Path,
    gpu: bool,
    run_id: str | None = None,
    library_cache: Path | None = None,
    hub: HubSources | None = None,
) -> list[str]:
    """The item's `docker run`: the spec's folder read-only, OUT writable, and a Hub item's fetched
    model (adapter) file by file at /input/model (/input/adapter), shown by its id and commit."""
    hub = hub or HubSources()
    mounts = [(spec.root, CONTAINER_SPEC_DIR, True), (output, CONTAINER_OUTPUT, False)]
    shown = {CONTAINER_SPEC_DIR: str(spec.root), CONTAINER_OUTPUT: str(output)}
    fetched_arguments = []
    for source, target, option in (
        (hub.model_of(item), CONTAINER_MODEL, "--fetched-model"),
        (hub.adapter_of(item), CONTAINER_ADAPTER, "--fetched-adapter"),
    ):
        if source is not None:
            mounts += folder_mounts(source.model_dir, source.model_files, target)
            shown[target] = source.shown_model or str(source.model_dir)
            fetched_arguments += [option, target]
    cmd = conversion_container(mounts, shown, gpu, library_cache=library_cache)
    if run_id is not None:  # the item records it, so the runner can tell this run's outcome from an older one
        cmd += ["-e", f"{RUN_ID_VARIABLE}={run_id}"]
    spec_in_container = f"{CONTAINER_SPEC_DIR}/{spec.path.resolve().relative_to(spec.root)}"
    cmd += [image, "batch", "run", spec_in_container, "--root", CONTAINER_SPEC_DIR]
    cmd += ["--item", str(item.index), "--output", CONTAINER_OUTPUT, *fetched_arguments]
    return cmd


def record_item_source(spec: BatchSpec, item: Item, output: Path, hub: HubSources) -> None:
    """After an item succeeded: where its model came from into its bundle (source.json), as
    `invoke convert` records it; a folder item's bundle loses a source.json an earlier Hub run left."""
    model = hub.model_of(item) or ModelSource(spec.root / str(item.path))
    record_source(
        output / item.model_id, model, adapter_merged=item.adapter_named is not None, adapter=hub.adapter_of(item)
    )


def unfinished(record: dict | None, run_id: str, exit_code: int) -> str | None:
    """Why the item's record after its container ended does not tell this run's outcome, or None when
    it does: the container's own "ok" or "failed", of this run, and no "ok" from a container that
    then failed."""
    if not record or record.get("run_id") != run_id or record.get("status") not in FINISHED:
        return "interrupted" if exit_code else "exited 0 without recording an outcome"
    if record["status"] == "ok" and exit_code != 0:
        return f"exit {exit_code} after recording ok"
    return None


def run_batch(
    spec_path: Path,
    output: Path,
    image: str,
    *,
    jobs: int | None = None,
    gpu: bool | None = None,
    library_cache: Path | None = None,
    allow_pickle: bool = False,
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
) -> list[Outcome]:
    spec = load_spec(spec_path.resolve())  # every problem of the spec, before anything runs
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: run at least one item at a time")
    docker.require_image(image)
    output = output.resolve()
    if output == spec.root or spec.root in output.parents:
        raise UsageError(f"output {output} is inside the spec's folder {spec.root}: write the bundles elsewhere")
    # before anything is written or run: a refusal stops the batch whole
    hub = fetch_hub_sources(spec, say, allow_pickle=allow_pickle)
    (output / STATUS_DIR).mkdir(parents=True, exist_ok=True)
    gpu = docker_has_gpu_runtime() if gpu is None else gpu
    total = len(spec.items)
    say(
        f"llm2wasm batch: {total} item(s) from {spec.path}, {jobs} at a time, in {image} "
        f"{'on the GPU' if gpu else 'on the CPU'}; logs in {output / STATUS_DIR}/"
    )
    lock = threading.Lock()
    done = 0

    def run_one(item: Item) -> None:
        nonlocal done
        log_path = output / STATUS_DIR / f"item-{item.index}.log"
        say(f"==> [{item.index}] {item.model_id}: converting")
        run_id = new_run_id()
        cmd = item_command(spec, item, image, output, gpu, run_id, library_cache, hub)
        # before the container starts: if it is killed, "running" is left, not an earlier run's "ok"
        running = mark_running(output, spec, item, run_id)
        started = time.monotonic()
        with open(log_path, "w") as log:
            status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.monotonic() - started
        reason = unfinished(read_status(output, item.index), running["run_id"], status)
        if reason:
            mark_finished(output, running, "failed", status, seconds, reason)
        elif status == 0:
            record_item_source(spec, item, output, hub)
        with lock:
            done += 1
            progress = f"{done}/{total}"
        if status == 0 and not reason:
            say(f"<== [{item.index}] {item.model_id}: done in {seconds:.0f}s ({progress})")
        else:
            tail = "\n".join(f"      {line}" for line in log_path.read_text().splitlines()[-8:])
            why = f"exit {status}" + (f"; {reason}" if reason else "")
            say(
                f"!!! [{item.index}] {item.model_id}: failed ({why}) in {seconds:.0f}s ({progress}); "
                f"log: {log_path}\n{tail}"
            )

    with ThreadPoolExecutor(max_workers=min(jobs, total)) as pool:
        list(pool.map(run_one, spec.items))
    results, _ = collect(spec, output)
    return results


def batch_command(
    spec: Path,
    output: Path | None,
    image: str,
    *,
    jobs: int | None = None,
    gpu: bool | None = None,
    matrix: bool = False,
    k8s: bool = False,
    claim: str = "llm2wasm-batch",
    parallelism: int = 2,
    library_cache: Path | None = None,
    allow_pickle: bool = False,
) -> int:
    """`invoke batch`: the GitHub matrix or the Kubernetes Job of a spec (printed), or every item run
    here, a table of outcomes printed; the number of items that failed."""
    if matrix or k8s:
        from llm2wasm.image.batch import github
        from llm2wasm.image.batch import k8s as kubernetes

        loaded = load_spec(spec, check_paths=False)
        if matrix:
            print(json.dumps(github.matrix(loaded)))
        else:
            documents = kubernetes.kubernetes_manifests(
                loaded, spec.read_text(), image=image, claim=claim, parallelism=parallelism
            )
            print(kubernetes.to_yaml(documents), end="")
        return 0
    if output is None:
        raise UsageError("batch needs --output (-o): invoke batch models.toml -o OUT")
    results = run_batch(spec, output, image, jobs=jobs, gpu=gpu, library_cache=library_cache, allow_pickle=allow_pickle)
    print(table(results))
    succeeded = [outcome for outcome in results if outcome.status == "ok"]
    print(f"{len(succeeded)} of {len(results)} bundle(s) in {output / 'app-config.json'}", file=sys.stderr)
    return len(results) - len(succeeded)
