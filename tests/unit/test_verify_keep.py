"""`invoke verify --selftest --keep DIR`: what the selftest makes stays on the host, owned by the user."""

from __future__ import annotations

import os
import subprocess

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.host import docker, verify
from llm2wasm.host.pins import resolve_profile


def test_without_keep_the_selftest_runs_as_the_build_gate_runs_it():
    assert verify.selftest_command("llm2wasm:app-cpu") == [
        "run", "--rm", "--network", "none", "llm2wasm:app-cpu", "selftest",
    ]  # fmt: skip


def test_keep_mounts_the_folder_and_runs_as_the_invoking_user(tmp_path):
    command = verify.selftest_command("llm2wasm:app-cpu", tmp_path / "kept")
    assert command[command.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    assert command[command.index("-v") + 1] == f"{(tmp_path / 'kept').resolve()}:/keep"
    assert command[-4:] == ["llm2wasm:app-cpu", "selftest", "--keep", "/keep/run"]
    assert "--network" in command and command[command.index("--network") + 1] == "none"


def test_a_folder_that_holds_something_is_refused_before_docker_runs(tmp_path, monkeypatch):
    (tmp_path / "earlier.txt").write_text("mine")
    monkeypatch.setattr(docker, "run", lambda *a, **k: pytest.fail("docker ran"))
    with pytest.raises(UsageError, match="is not empty: pass a new or empty folder"):
        verify.run_selftest("llm2wasm:app-cpu", tmp_path / "log", keep=tmp_path)


def test_keep_is_made_and_passed_on(tmp_path, monkeypatch):
    seen = []

    def fake_run(args, **_):
        seen.append(args)
        return subprocess.CompletedProcess(args, 0, "", "selftest passed\n")

    monkeypatch.setattr(docker, "run", fake_run)
    result, _ = verify.run_selftest("llm2wasm:app-cpu", tmp_path / "logs" / "s.log", keep=tmp_path / "new")
    assert result.returncode == 0 and (tmp_path / "new").is_dir()
    assert seen[0][-2:] == ["--keep", "/keep/run"]
    assert (tmp_path / "logs" / "s.log").read_text() == "selftest passed\n"


def test_keep_without_selftest_names_the_missing_flag(tmp_path):
    with pytest.raises(UsageError, match="add --selftest"):
        verify.verify_images(resolve_profile("hermetic"), "app", keep=tmp_path)
