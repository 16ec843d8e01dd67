"""`invoke batch`'s runner before any container starts: bad input is refused with exit 2 and nothing
written, and each item's docker command is the item command with the spec read-only."""

from __future__ import annotations

import json

import pytest

from llm2wasm import batchrun, docker
from llm2wasm.batch import load_spec
from llm2wasm.errors import UsageError

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


def test_an_item_runs_the_item_command_with_the_spec_read_only(spec_dir, tmp_path):
    spec = load_spec(spec_dir / "models.toml")
    cmd = batchrun.item_command(spec, spec.items[1], "llm2wasm:app-hermetic", tmp_path / "out", gpu=False)
    assert f"{spec_dir}:/batch:ro" in cmd and f"{tmp_path / 'out'}:/output" in cmd
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
