"""`invoke batch`'s runner: bad input is refused with exit 2 and nothing written before any container
starts; each item's docker command is the item command with the spec read-only; an item is marked
running before its container starts and failed when the container ends without saying how the item
ended (killed), so an earlier run's "ok" never stands for a killed one."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.host import batchrun, docker
from llm2wasm.image.batch.spec import load_spec, parse_spec
from llm2wasm.image.batch.status import RUN_ID_VARIABLE, mark_running, read_status, run_item
from llm2wasm.image.convert import command
from tests.unit.test_batch_status import make_bundle

SPEC = '[[model]]\npath = "models/llama"\nquantizations = ["q0f32", "q4f32_1"]\n'


@pytest.fixture
def spec_dir(tmp_path, monkeypatch):
    (tmp_path / "ship" / "models" / "llama").mkdir(parents=True)
    (tmp_path / "ship" / "models.toml").write_text(SPEC)
    monkeypatch.setattr(docker, "image_id", lambda ref: "sha256:x" if ref == "llm2wasm:app-hermetic" else None)
    return tmp_path / "ship"


@pytest.mark.parametrize(
    ("kwargs", "output", "message"),
    [
        ({"jobs": 0}, "out", "--jobs 0: run at least one item at a time"),
        ({"image": "llm2wasm:app-never-built"}, "out", "image llm2wasm:app-never-built not found"),
        ({}, "ship/out", "is inside the spec's folder"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(spec_dir, kwargs, output, message):
    out = spec_dir.parent / output
    with pytest.raises(UsageError, match=message) as raised:
        batchrun.run_batch(spec_dir / "models.toml", out, kwargs.pop("image", "llm2wasm:app-hermetic"), **kwargs)
    assert raised.value.exit_code == 2
    assert not out.exists()


def mounted(cmd: list[str], host: Path, container: str, read_only: bool = False) -> bool:
    """Whether `docker run` mounts host at container, written either way docker reads it."""
    volume = f"{host}:{container}" + (":ro" if read_only else "")
    mount = f"type=bind,source={host},target={container}" + (",readonly" if read_only else "")
    return any(
        (flag == "-v" and value == volume) or (flag == "--mount" and value == mount)
        for flag, value in itertools.pairwise(cmd)
    )


def test_an_item_runs_the_item_command_with_the_spec_read_only(spec_dir, tmp_path):
    spec = load_spec(spec_dir / "models.toml")
    cmd = batchrun.item_command(spec, spec.items[1], "llm2wasm:app-hermetic", tmp_path / "out", gpu=False)
    assert mounted(cmd, spec_dir, "/batch", read_only=True) and mounted(cmd, tmp_path / "out", "/output")
    assert not mounted(cmd, tmp_path / "out", "/output", read_only=True)
    assert cmd[cmd.index("--network") + 1] == "none" and "--gpus" not in cmd
    image = cmd.index("llm2wasm:app-hermetic")
    assert cmd[image + 1 :] == [
        "batch", "run", "/batch/models.toml", "--root", "/batch", "--item", "1", "--output", "/output"
    ]  # fmt: skip
    shown = json.loads(cmd[cmd.index("-e") + 1].split("=", 1)[1])
    assert shown == {"/batch": str(spec_dir), "/output": str(tmp_path / "out")}
    assert "--gpus" in batchrun.item_command(spec, spec.items[0], "img", tmp_path, gpu=True)


def test_default_jobs_follow_cores_and_memory(monkeypatch):
    monkeypatch.setattr(batchrun.os, "cpu_count", lambda: 8)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 24 * 2**30 // 4096}
    monkeypatch.setattr(batchrun.os, "sysconf", lambda name: pages[name])
    assert batchrun.default_jobs() == 3  # 24 GiB / 8 GiB per conversion, fewer than 8 cores
    pages["SC_PHYS_PAGES"] = 4 * 2**30 // 4096
    assert batchrun.default_jobs() == 1  # never below one


# --- what a run records when its container ends ------------------------------------------------------


@pytest.fixture
def containers(spec_dir, tmp_path, monkeypatch):
    """`docker run` of each item, played in this process: the item command itself (run_item, with the
    run id the runner passed, converting by writing a bundle), or a container killed (exit 137) before
    or during its conversion. Returns the behaviour per item to set and the items that ran."""
    monkeypatch.setattr(docker, "docker_bin", lambda: "docker")
    in_container = parse_spec(SPEC, Path("/batch/models.toml"), Path("/batch"), check_paths=False)
    out = tmp_path / "out"
    behaviour: dict[int, str] = {}
    ran: list[int] = []

    def fake_run(cmd, **kwargs):
        passed = dict(cmd[i + 1].split("=", 1) for i, arg in enumerate(cmd) if arg == "-e")
        index = int(cmd[cmd.index("--item") + 1])
        ran.append(index)
        item = in_container.items[index]
        what = behaviour.get(index, "convert")
        if what == "killed before it started":
            return subprocess.CompletedProcess(cmd, 137)
        if what == "killed while converting":
            mark_running(out, in_container, item, passed[RUN_ID_VARIABLE])
            return subprocess.CompletedProcess(cmd, 137)
        monkeypatch.setenv(RUN_ID_VARIABLE, passed[RUN_ID_VARIABLE])

        def convert(argv):
            return make_bundle(out, in_container, item, tmp_path / "work") or 0

        monkeypatch.setattr(command, "convert_main", convert)
        return subprocess.CompletedProcess(cmd, run_item(in_container, index, out))

    monkeypatch.setattr(batchrun.subprocess, "run", fake_run)
    return out, behaviour, ran


def run(spec_dir, out, said: list[str]):
    results = batchrun.run_batch(spec_dir / "models.toml", out, "llm2wasm:app-hermetic", jobs=1, gpu=False,
                                 say=said.append)  # fmt: skip
    return [(outcome.item.model_id, outcome.status, outcome.reason) for outcome in results]


@pytest.mark.parametrize("killed", ["killed before it started", "killed while converting"])
def test_a_killed_item_is_failed_though_its_last_run_was_ok_and_the_next_run_converts_it(spec_dir, containers, killed):
    out, behaviour, ran = containers
    said: list[str] = []
    assert run(spec_dir, out, said) == [("llama-q0f32", "ok", None), ("llama-q4f32_1", "ok", None)]
    # the second run: item 0's container is killed (137), its old ok record and complete bundle still there
    behaviour[0] = killed
    assert run(spec_dir, out, said) == [("llama-q0f32", "failed", "interrupted"), ("llama-q4f32_1", "ok", None)]
    assert "!!! [0] llama-q0f32: failed (exit 137; interrupted)" in "\n".join(said)
    record = read_status(out, 0)
    assert record["status"] == "failed" and record["exit_code"] == 137 and record["reason"] == "interrupted"
    assert json.loads((out / "app-config.json").read_text())["model_list"][0]["model_id"] == "llama-q4f32_1"
    # the third run converts it again
    del behaviour[0]
    ran.clear()
    assert run(spec_dir, out, said) == [("llama-q0f32", "ok", None), ("llama-q4f32_1", "ok", None)]
    assert ran == [0, 1]


@pytest.mark.parametrize(
    ("record", "exit_code", "reason"),
    [
        ({"run_id": "this", "status": "ok"}, 0, None),
        ({"run_id": "this", "status": "failed"}, 2, None),  # the item's own account of its failure stands
        ({"run_id": "this", "status": "running"}, 137, "interrupted"),
        ({"run_id": "earlier", "status": "ok"}, 137, "interrupted"),
        ({"run_id": "earlier", "status": "ok"}, 0, "exited 0 without recording an outcome"),
        (None, 125, "interrupted"),  # docker could not start it
        ({}, 1, "interrupted"),  # unreadable
        ({"run_id": "this", "status": "ok"}, 137, "exit 137 after recording ok"),
    ],
)
def test_the_runner_trusts_only_this_runs_own_outcome(record, exit_code, reason):
    assert batchrun.unfinished(record, "this", exit_code) == reason


def test_the_item_is_told_its_run_id(spec_dir, tmp_path):
    spec = load_spec(spec_dir / "models.toml")
    cmd = batchrun.item_command(spec, spec.items[0], "img", tmp_path, gpu=False, run_id="abc")
    assert f"{RUN_ID_VARIABLE}=abc" in cmd[: cmd.index("img")]
    assert cmd[cmd.index(f"{RUN_ID_VARIABLE}=abc") - 1] == "-e"
