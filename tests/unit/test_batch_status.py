"""An item's status record and its outcome: "running" before the conversion starts, "ok" only for a
finished run of the item as the spec says it now with a complete bundle; a run that was killed is
failed (interrupted), however its previous run ended."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.image.batch import status as batch_status
from llm2wasm.image.batch.spec import load_spec, parse_spec
from llm2wasm.image.batch.status import (
    collect,
    mark_finished,
    mark_running,
    outcomes,
    read_status,
    run_item,
    settings_digest,
    status_path,
    table,
)
from llm2wasm.image.cli import build_parser
from llm2wasm.image.cli import main as llm2wasm
from llm2wasm.image.convert import command
from llm2wasm.image.convert.bundle import write_bundle
from tests.unit.test_convert_bundle import bundle_request, fake_work

SPEC = '[[model]]\npath = "models/m"\nquantizations = ["q4f16_1", "q0f32"]\ncontext_window = 2048\n'


@pytest.fixture
def spec_dir(tmp_path) -> Path:
    (tmp_path / "ship" / "models" / "m").mkdir(parents=True)
    (tmp_path / "ship" / "models.toml").write_text(SPEC)
    return tmp_path / "ship"


def make_bundle(out: Path, spec, item, work: Path) -> None:
    """What `llm2wasm convert` leaves for the item: a complete bundle in OUT/<model_id>/."""
    request = bundle_request(out / item.model_id, item.model_id, f"{spec.base_url}{item.model_id}/")
    write_bundle(request, fake_work(work / item.model_id, item.model_id), {"with_4k_kv_cache_mb": 12.5})


def finished(out: Path, spec, item, status: str = "ok", work: Path | None = None) -> dict:
    """An item run to its end: a bundle (when ok) and its record."""
    running = mark_running(out, spec, item)
    if status == "ok":
        make_bundle(out, spec, item, work or out.parent / "work")
    return mark_finished(out, running, status, 0 if status == "ok" else 1, 3.0)


def statuses(spec, out) -> list[tuple[str, str | None]]:
    return [(outcome.status, outcome.reason) for outcome in outcomes(spec, out)]


def test_an_item_is_ok_when_it_finished_ok_with_a_complete_bundle(spec_dir, tmp_path):
    spec, out = load_spec(spec_dir / "models.toml"), tmp_path / "out"
    finished(out, spec, spec.items[0])
    finished(out, spec, spec.items[1], "failed")
    assert statuses(spec, out) == [("ok", None), ("failed", None)]
    record = read_status(out, 0)
    assert record["status"] == "ok" and record["settings"] == settings_digest(spec, spec.items[0])
    assert len(record["run_id"]) == 16 and record["started"] > 0 and record["exit_code"] == 0


def test_a_running_record_left_behind_is_failed_interrupted_whatever_came_before(spec_dir, tmp_path):
    spec, out = load_spec(spec_dir / "models.toml"), tmp_path / "out"
    finished(out, spec, spec.items[0])  # an earlier run: ok, with its complete bundle still there
    mark_running(out, spec, spec.items[0])  # a second run that never ended (its container killed)
    results, app_config = collect(spec, out)
    assert [(o.status, o.reason) for o in results] == [("failed", "interrupted"), ("not run", None)]
    assert app_config["model_list"] == []  # the old bundle is not offered for an item that is being replaced
    assert "| 0 | m-q4f16_1 | q4f16_1 | failed (interrupted) |" in table(results)
    report = json.loads((out / "batch-report.json").read_text())
    assert report["items"][0]["status"] == "failed" and report["items"][0]["reason"] == "interrupted"


def test_ok_needs_a_complete_bundle_of_the_item(spec_dir, tmp_path):
    spec, out = load_spec(spec_dir / "models.toml"), tmp_path / "out"
    finished(out, spec, spec.items[0])
    weights = out / "m-q4f16_1" / "model" / "resolve" / "main"
    (weights / "params_shard_1.bin").unlink()
    assert statuses(spec, out)[0] == (
        "failed",
        "bundle incomplete: model/resolve/main/params_shard_1.bin is missing (tensor-cache.json lists it)",
    )
    shutil.rmtree(out / "m-q4f16_1")
    assert statuses(spec, out)[0] == ("failed", "bundle incomplete: no app-config.json (the conversion did not finish)")
    # a complete bundle, but of another model
    make_bundle(out, spec, spec.items[1], tmp_path / "work")
    shutil.copytree(out / "m-q0f32", out / "m-q4f16_1")
    assert statuses(spec, out)[0] == (
        "failed",
        "bundle incomplete: app-config.json names model 'm-q0f32', not 'm-q4f16_1'",
    )


def test_a_record_of_other_settings_is_not_this_items_run(spec_dir, tmp_path):
    spec, out = load_spec(spec_dir / "models.toml"), tmp_path / "out"
    finished(out, spec, spec.items[0])
    changed = parse_spec(SPEC.replace("2048", "4096"), spec_dir / "models.toml")
    assert statuses(changed, out)[0] == ("not run", "its record is of other settings")
    moved_url = parse_spec('base_url = "https://cdn.example/"\n' + SPEC, spec_dir / "models.toml")
    assert statuses(moved_url, out)[0][0] == "not run"  # the app config names the old URLs
    # the same spec read in a container, its folder mounted elsewhere: the same item
    in_container = parse_spec(SPEC, Path("/batch/models.toml"), Path("/batch"), check_paths=False)
    assert settings_digest(in_container, in_container.items[0]) == settings_digest(spec, spec.items[0])
    # resources only schedule the item; they do not change its bundle
    bigger = parse_spec(SPEC + 'resources = { cpu = "8" }\n', spec_dir / "models.toml")
    assert statuses(bigger, out)[0] == ("ok", None)


def test_an_unreadable_or_unknown_record_is_a_failure_not_a_crash(spec_dir, tmp_path):
    spec, out = load_spec(spec_dir / "models.toml"), tmp_path / "out"
    finished(out, spec, spec.items[0])
    record = read_status(out, 0)
    status_path(out, 1).write_text("{")
    assert statuses(spec, out)[1] == ("failed", "item-1.json is unreadable")
    status_path(out, 0).write_text(json.dumps({**record, "status": "done"}))
    assert statuses(spec, out)[0] == ("failed", "unknown status 'done'")


def test_the_item_command_marks_the_item_running_before_it_converts(spec_dir, tmp_path, monkeypatch):
    spec, out = load_spec(spec_dir / "models.toml"), tmp_path / "out"
    finished(out, spec, spec.items[0])  # an earlier run's ok must not stand while this one runs
    monkeypatch.setenv(batch_status.RUN_ID_VARIABLE, "from-the-host")
    seen = []

    def convert(argv):
        seen.append(read_status(out, 0))
        assert argv[0] == str(spec.root / spec.items[0].path) and "--model-id" in argv
        make_bundle(out, spec, spec.items[0], tmp_path / "work2")
        return 0

    monkeypatch.setattr(command, "convert_main", convert)
    assert run_item(spec, 0, out) == 0
    assert seen[0]["status"] == "running" and seen[0]["run_id"] == "from-the-host"
    assert seen[0]["settings"] == settings_digest(spec, spec.items[0])
    record = read_status(out, 0)
    assert record["status"] == "ok" and record["run_id"] == "from-the-host" and record["exit_code"] == 0
    assert statuses(spec, out)[0] == ("ok", None)


@pytest.mark.parametrize(
    ("convert", "code", "reason"),
    [
        (lambda argv: 2, 2, None),  # convert refused it
        (lambda argv: 0, 1, "no app-config.json (the conversion did not finish)"),  # said done, left no bundle
    ],
)
def test_the_item_command_records_a_failure(spec_dir, tmp_path, monkeypatch, convert, code, reason):
    spec, out = load_spec(spec_dir / "models.toml"), tmp_path / "out"
    monkeypatch.delenv(batch_status.RUN_ID_VARIABLE, raising=False)
    monkeypatch.setattr(command, "convert_main", convert)
    assert run_item(spec, 1, out) == code
    record = read_status(out, 1)
    assert record["status"] == "failed" and record["exit_code"] == code and record.get("reason") == reason
    assert len(record["run_id"]) == 16  # a pod's own run id
    assert outcomes(spec, out)[1].status == "failed"


def test_the_item_command_records_a_crash_and_lets_it_through(spec_dir, tmp_path, monkeypatch):
    spec, out = load_spec(spec_dir / "models.toml"), tmp_path / "out"

    def convert(argv):
        raise RuntimeError("boom")

    monkeypatch.setattr(command, "convert_main", convert)
    with pytest.raises(RuntimeError, match="boom"):
        run_item(spec, 0, out)
    assert read_status(out, 0)["reason"] == "RuntimeError: boom"
    assert statuses(spec, out)[0] == ("failed", "RuntimeError: boom")


@pytest.mark.parametrize(
    ("raised", "code", "said"),
    [
        (UsageError("no such model"), 2, "llm2wasm: error: no such model\n"),
        (KeyboardInterrupt(), 130, "llm2wasm: interrupted; a re-run resumes after the last finished step\n"),
    ],
)
def test_the_item_command_converts_as_llm2wasm_convert_does(monkeypatch, capsys, raised, code, said):
    """run_item converts through convert_main, not llm2wasm.image.cli (which imports this module's callers):
    the same parser, messages and exit status as `llm2wasm convert`."""
    convert_step = next(action for action in build_parser()._actions if action.dest == "command").choices["convert"]
    assert command.convert_parser().format_help() == convert_step.format_help()

    def fail(args):
        raise raised

    monkeypatch.setattr(command, "_run_convert", fail)
    argv = ["models/m", "--quantization", "q4f16_1", "--output", "out"]
    assert command.convert_main(argv) == code
    assert capsys.readouterr().err == said
    assert llm2wasm(["convert", *argv]) == code
    assert capsys.readouterr().err == said


def test_only_ok_or_failed_finish_an_item(spec_dir, tmp_path):
    spec, out = load_spec(spec_dir / "models.toml"), tmp_path / "out"
    running = mark_running(out, spec, spec.items[0])
    with pytest.raises(ValueError, match="not 'running'"):
        mark_finished(out, running, "running", 0, 1.0)
