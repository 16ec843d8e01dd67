"""The ml layer's hash locks: each profile's lock matches its pins, hashes every file, and a stale or
edited one is refused with the command that remakes it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from llm2wasm.host.layers import get_layer
from llm2wasm.host.locks import HEADER_PREFIX, LOCKS_DIR, LockHeader, lock_path, lock_problem, locked_versions
from llm2wasm.host.pins import PROJECT_ROOT, profile_names, resolve_profile

LOCKED_PROFILES = ("stable", "nightly", "hermetic")


@pytest.mark.parametrize("name", profile_names())
def test_every_profile_lock_matches_its_pins(name):
    assert lock_problem(PROJECT_ROOT, name, resolve_profile(name).pins) is None


def test_the_profiles_that_can_be_locked_here_are():
    locked = {name for name in profile_names() if lock_path(PROJECT_ROOT, resolve_profile(name).pins)}
    # cpu's torch comes from download.pytorch.org (docs/SECURITY.md says so)
    assert set(LOCKED_PROFILES) <= locked and "cpu" not in locked


@pytest.mark.parametrize("name", LOCKED_PROFILES)
def test_a_lock_holds_each_pin_at_its_version_and_a_hash_for_every_requirement(name):
    pins = resolve_profile(name).pins
    path = lock_path(PROJECT_ROOT, pins)
    versions = locked_versions(path)
    for pin in ("torch_requirement", "transformers_requirement", "peft_requirement", "bitsandbytes_requirement"):
        package, version = str(pins[pin]).split("==")
        assert versions[package] == version, f"{path.name}: {package}"
    blocks = re.split(r"\n(?=[a-z0-9])", path.read_text().split("\n", 2)[2])
    for block in blocks:
        if "==" in block.splitlines()[0]:
            assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), block.splitlines()[0]
    assert len(versions) > 20  # the dependencies too, not only the four pins


def test_the_ml_layer_installs_the_lock_with_require_hashes():
    assert get_layer("ml").build_args["ML_LOCK"] == "ml_lock"
    dockerfile = (PROJECT_ROOT / "images" / "ml" / "Dockerfile").read_text()
    assert '--require-hashes --only-binary :all: -r "/tmp/ml-locks/$ML_LOCK"' in dockerfile
    assert "--mount=type=bind,source=images/ml/locks" in dockerfile  # never copied into a layer


@pytest.fixture
def checkout(tmp_path) -> Path:
    (tmp_path / LOCKS_DIR).mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / LOCKS_DIR / "py3.12-cu130.txt", tmp_path / LOCKS_DIR / "py3.12-cu130.txt")
    return tmp_path


def test_a_lock_made_for_other_pins_is_refused_with_the_command_that_remakes_it(checkout):
    pins = {**resolve_profile("stable").pins, "transformers_requirement": "transformers==5.25.0"}
    problem = lock_problem(checkout, "stable", pins)
    assert "made for torch==2.13.0, transformers==5.24.0" in problem and "transformers==5.25.0" in problem
    assert "invoke lock --profile stable" in problem
    other_python = {**resolve_profile("stable").pins, "python_version": "3.13"}
    assert "on Python 3.13" in lock_problem(checkout, "stable", other_python)


def test_an_edited_missing_or_unhashed_lock_is_refused(checkout):
    pins = resolve_profile("stable").pins
    path = checkout / LOCKS_DIR / "py3.12-cu130.txt"
    text = path.read_text()
    path.write_text(text.split("\n", 1)[1])  # header gone
    assert "no llm2wasm header" in lock_problem(checkout, "stable", pins)
    path.write_text(text + "evil-package==1.0\n")
    assert "without hashes (evil-package==1.0)" in lock_problem(checkout, "stable", pins)
    path.unlink()
    assert "does not exist" in lock_problem(checkout, "stable", pins)


def test_the_header_says_what_the_lock_was_made_from(tmp_path):
    header = LockHeader(("torch==2.13.0", "transformers==5.24.0", "peft==0.21.2", "bitsandbytes==0.50.2"), "3.12")
    path = tmp_path / "lock.txt"
    path.write_text(header.line() + "\nrest\n")
    assert header.line().startswith(HEADER_PREFIX)
    assert LockHeader.read(path) == header
    path.write_text(HEADER_PREFIX + "{not json\n")
    assert LockHeader.read(path) is None


def test_the_verify_check_finds_a_package_moved_or_missing_after_the_lock():
    from llm2wasm.host.checks import lock_mismatches

    locked = {"numpy": "2.4.6", "torch": "2.13.0+cpu", "safetensors": "0.8.0"}
    assert (
        lock_mismatches({"NumPy": "2.4.6", "torch": "2.13.0+cpu", "safetensors": "0.8.0", "extra": "1"}, locked) == []
    )
    assert lock_mismatches({"numpy": "2.5.0", "torch": "2.13.0+cpu"}, locked) == [
        "numpy 2.5.0 is installed, the lock has 2.4.6",
        "safetensors 0.8.0 is locked but not installed",
    ]
