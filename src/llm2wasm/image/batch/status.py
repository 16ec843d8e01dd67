"""What became of each item of a batch: its status record, and the outcomes collected from them.

Item N's record is ``OUT/.batch/item-N.json``. It says ``running`` (with a fresh run id, its start
and a digest of the item's settings) before the conversion starts, and ``ok`` or ``failed`` when it
ends, so a run that is killed (a container ending with 137, an evicted pod) leaves ``running``
behind, not the previous run's ``ok``. An item counts as ``ok`` only when its record says so, was
made for the item as the spec describes it now (the digest), and its bundle is complete
(llm2wasm.image.convert.bundle.incomplete); a ``running`` record left behind is ``failed (interrupted)``,
and the next run converts that item again.

Runs in the image (standard library only).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.bundle import APP_CONFIG, incomplete, library_path

if TYPE_CHECKING:
    from llm2wasm.image.batch.spec import BatchSpec, Item

STATUS_DIR = ".batch"
# the run id the host runner gave the item, passed into its container (a pod makes its own)
RUN_ID_VARIABLE = "LLM2WASM_BATCH_RUN_ID"
FINISHED = {"ok", "failed"}
# what an item's settings are, for the digest: not where it sits in the spec, nor what it asks of a scheduler
_NOT_SETTINGS = {"index", "entry", "resources"}
_HUB_FIELDS = ("hub", "adapter_hub")


def status_path(output: Path, index: int) -> Path:
    return output / STATUS_DIR / f"item-{index}.json"


def settings_digest(spec: BatchSpec, item: Item) -> str:
    """What the item's bundle is made from, as written in the spec (paths relative to it, so the host
    and a container that mounts the spec elsewhere agree), and the URL it is served from."""
    settings = {key: value for key, value in asdict(item).items() if key not in _NOT_SETTINGS}
    for key in _HUB_FIELDS:  # a folder item's digest stays what it was before Hub items existed
        if settings.get(key) is None:
            settings.pop(key, None)
    settings["base_url"] = spec.base_url
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def new_run_id() -> str:
    return secrets.token_hex(8)


def _write(output: Path, index: int, record: dict) -> None:
    path = status_path(output, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # the host runner and its container may both write
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def mark_running(output: Path, spec: BatchSpec, item: Item, run_id: str | None = None) -> dict:
    """Record that item's conversion starts now (before anything of it runs); the record to finish."""
    record = {
        **asdict(item),
        "status": "running",
        "run_id": run_id or new_run_id(),
        "started": time.time(),
        "settings": settings_digest(spec, item),
    }
    _write(output, item.index, record)
    return record


def mark_finished(
    output: Path, running: dict, status: str, exit_code: int, seconds: float, reason: str | None = None
) -> dict:
    if status not in FINISHED:
        raise ValueError(f"an item finishes ok or failed, not {status!r}")
    record = {**running, "status": status, "seconds": round(seconds, 1), "exit_code": exit_code}
    if reason:
        record["reason"] = reason
    _write(output, running["index"], record)
    return record


def read_status(output: Path, index: int) -> dict | None:
    """Item N's record; None when there is none; {} when it cannot be read."""
    path = status_path(output, index)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def run_item(
    spec: BatchSpec,
    index: int,
    output: Path,
    fetched_model: Path | None = None,
    fetched_adapter: Path | None = None,
) -> int:
    """Convert one item with `llm2wasm convert`; its outcome goes to OUT/.batch/item-N.json. A Hub
    item's model (adapter) is read from `fetched_model` (`fetched_adapter`): whoever started this
    container fetched it, since the container has no network."""
    from llm2wasm.image.convert.command import convert_main

    item = spec.item(index)
    # before anything is marked: a Hub item without its fetched folder is refused, not recorded as a failure
    argv = item.convert_argv(spec.root, output, spec.base_url, fetched_model, fetched_adapter)
    print(f"llm2wasm batch: item {index} of {len(spec.items)}: {item.model_id}", file=sys.stderr, flush=True)
    running = mark_running(output, spec, item, os.environ.get(RUN_ID_VARIABLE))
    started = time.monotonic()
    try:
        code = convert_main(argv)
    except BaseException as error:  # an argparse exit or a crash: recorded, not left as an interruption
        mark_finished(output, running, "failed", 1, time.monotonic() - started, f"{type(error).__name__}: {error}")
        raise
    problem = incomplete(output / item.model_id, item.model_id) if code == 0 else None
    if problem:  # said done, but left no complete bundle: not ok, whatever the exit status says
        code = 1
    mark_finished(output, running, "ok" if code == 0 else "failed", code, time.monotonic() - started, problem)
    return code


@dataclass
class Outcome:
    item: Item
    status: str  # ok | failed | not run
    seconds: float | None = None
    record: dict | None = None  # the bundle's ModelRecord
    library_bytes: int | None = None
    reason: str | None = None  # why it is not what its record says, or why it failed where that is known

    @property
    def shown(self) -> str:
        return f"{self.status} ({self.reason})" if self.reason else self.status


def outcome_of(spec: BatchSpec, item: Item, output: Path) -> Outcome:
    status = read_status(output, item.index)
    if status is None:
        return Outcome(item, "not run")
    if not status:
        return Outcome(item, "failed", reason=f"{status_path(output, item.index).name} is unreadable")
    if status.get("settings") != settings_digest(spec, item):
        # another spec's item N, or one recorded before the spec changed: its bundle is not this item's
        return Outcome(item, "not run", reason="its record is of other settings")
    seconds = status.get("seconds")
    if status.get("status") == "running":
        # it started and never said how it ended: killed (or, collected early, still running)
        return Outcome(item, "failed", reason="interrupted")
    if status.get("status") == "failed":
        return Outcome(item, "failed", seconds, reason=status.get("reason"))
    if status.get("status") != "ok":
        return Outcome(item, "failed", seconds, reason=f"unknown status {status.get('status')!r}")
    bundle = output / item.model_id
    problem = incomplete(bundle, item.model_id)
    if problem:
        return Outcome(item, "failed", seconds, reason=f"bundle incomplete: {problem}")
    record = json.loads((bundle / APP_CONFIG).read_text())["model_list"][0]
    return Outcome(item, "ok", seconds, record, library_path(bundle, item.model_id).stat().st_size)


def outcomes(spec: BatchSpec, output: Path) -> list[Outcome]:
    return [outcome_of(spec, item, output) for item in spec.items]


def collect(spec: BatchSpec, output: Path) -> tuple[list[Outcome], dict]:
    """One WebLLM AppConfig of every bundle that succeeded (OUT/app-config.json) and OUT/batch-report.json."""
    results = outcomes(spec, output)
    records = [outcome.record for outcome in results if outcome.record is not None]
    ids = [record["model_id"] for record in records]
    duplicates = sorted({name for name in ids if ids.count(name) > 1})
    if duplicates:  # parse_spec makes them unique; a bundle edited by hand might not be
        raise UsageError(f"model_id {', '.join(duplicates)} appears in more than one bundle under {output}")
    app_config = {"model_list": records}
    output.mkdir(parents=True, exist_ok=True)
    report = {
        "spec": str(spec.path),
        "base_url": spec.base_url,
        "items": [
            {
                "item": outcome.item.index,
                "model_id": outcome.item.model_id,
                "model": outcome.item.model,
                "adapter": outcome.item.adapter_named,
                "quantization": outcome.item.quantization,
                "status": outcome.status,
                "reason": outcome.reason,
                "seconds": outcome.seconds,
                "library_bytes": outcome.library_bytes,
                "vram_required_MB": (outcome.record or {}).get("vram_required_MB"),
            }
            for outcome in results
        ],
    }
    for name, content in ((APP_CONFIG, app_config), ("batch-report.json", report)):
        tmp = output / f"{name}.tmp"
        tmp.write_text(json.dumps(content, indent=2) + "\n")
        tmp.replace(output / name)
    return results, app_config


def table(results: list[Outcome]) -> str:
    lines = [
        "| item | model_id | quantization | status | time | library | vram_required_MB |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for outcome in results:
        seconds = f"{outcome.seconds:.0f} s" if outcome.seconds is not None else ""
        library = f"{outcome.library_bytes / 1e6:.1f} MB" if outcome.library_bytes is not None else ""
        vram = (outcome.record or {}).get("vram_required_MB", "")
        lines.append(
            f"| {outcome.item.index} | {outcome.item.model_id} | {outcome.item.quantization} | {outcome.shown} "
            f"| {seconds} | {library} | {vram} |"
        )
    return "\n".join(lines)
