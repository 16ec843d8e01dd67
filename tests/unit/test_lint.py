"""`invoke lint` as part of the test run, so CI enforces it: ruff, and hadolint on every Dockerfile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llm2wasm.host.layers import LAYERS

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [layer.dockerfile for layer in LAYERS] + [ROOT / "bench" / "seed-equivalent" / "Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_hadolint_clean(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_ignores_each_have_a_reason():
    lines = (ROOT / ".hadolint.yaml").read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith("- DL") or line.strip().startswith("- SC"):
            assert lines[index - 1].strip().startswith("#"), f"no reason above {line.strip()}"


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff_clean(args):
    result = subprocess.run([sys.executable, "-m", "ruff", *args], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
