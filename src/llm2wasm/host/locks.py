"""Hash-locked requirements of the ml layer: every PyPI file it installs, named by its SHA-256.

The ml layer's pins (torch, transformers, peft, bitsandbytes) say which versions; their dependencies
(numpy, safetensors, the nvidia-* CUDA wheels ...) would otherwise be whatever the index holds on
the day of the build, and nothing checks that a file is the one the pins meant. A lock
(``images/ml/locks/<name>.txt``, named by the profile's pin ``ml_lock``) lists all of them with their
hashes; the ml layer installs it with ``pip install --require-hashes``, so a changed file on an index
or a mirror stops the build. ``invoke lock --profile P`` writes it with uv; its first line records
what it was made from (the pins, Python and platform), and a lock that no longer matches its pins
stops the build before anything is built (``lock_problem``) instead of installing other versions
than the pins say.

What is not locked: the MLC wheels (their own index, unreachable from where the locks are made
here) and the packages they add; the ``cpu`` profile's torch from download.pytorch.org. Both are
said in docs/SECURITY.md.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.host.checks import normalize

LOCKS_DIR = Path("images") / "ml" / "locks"
HEADER_PREFIX = "# llm2wasm ml lock: "
# The pins a lock is made from: the ml layer's first pip install (images/ml/Dockerfile).
LOCKED_PINS = ("torch_requirement", "transformers_requirement", "peft_requirement", "bitsandbytes_requirement")
# Every image is linux/amd64 on glibc (Ubuntu 24.04, Debian bookworm): manylinux_2_28 covers both.
PLATFORM = "x86_64-manylinux_2_28"
_REQUIREMENT_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


@dataclass(frozen=True)
class LockHeader:
    """What a lock was made from; a lock is current when this equals what its profile pins now."""

    requirements: tuple[str, ...]
    python_version: str
    platform: str = PLATFORM

    def line(self) -> str:
        record = {"requirements": list(self.requirements), "python": self.python_version, "platform": self.platform}
        return HEADER_PREFIX + json.dumps(record, sort_keys=True)

    @classmethod
    def of_pins(cls, pins: Mapping[str, object]) -> LockHeader:
        return cls(tuple(str(pins[name]) for name in LOCKED_PINS), str(pins["python_version"]))

    @classmethod
    def read(cls, path: Path) -> LockHeader | None:
        """The header of a lock file, or None when its first line is not one (an edited or foreign file)."""
        first = path.read_text().split("\n", 1)[0]
        if not first.startswith(HEADER_PREFIX):
            return None
        try:
            record = json.loads(first.removeprefix(HEADER_PREFIX))
            return cls(tuple(record["requirements"]), str(record["python"]), str(record["platform"]))
        except (ValueError, KeyError, TypeError):
            return None


def lock_path(root: Path, pins: Mapping[str, object]) -> Path | None:
    name = str(pins.get("ml_lock") or "")
    return root / LOCKS_DIR / name if name else None


def locked_versions(path: Path) -> dict[str, str]:
    """package (normalized name) -> version, for every requirement of a lock."""
    versions = {}
    for line in path.read_text().splitlines():
        match = _REQUIREMENT_LINE.match(line)
        if match:
            versions[normalize(match.group(1))] = match.group(2)
    return versions


def lock_problem(root: Path, profile_name: str, pins: Mapping[str, object]) -> str | None:
    """Why the profile's lock cannot be built from (None when it can, or when the profile has none)."""
    path = lock_path(root, pins)
    if path is None:
        return None
    fix = f"run `invoke lock --profile {profile_name}` and commit the result"
    if not path.is_file():
        return f"the ml lock {path.relative_to(root)} (pin ml_lock) does not exist: {fix}"
    header = LockHeader.read(path)
    wanted = LockHeader.of_pins(pins)
    if header is None:
        return f"{path.relative_to(root)} has no llm2wasm header (edited by hand?): {fix}"
    if header != wanted:
        made_for = f"{', '.join(header.requirements)} on Python {header.python_version}"
        pinned = f"{', '.join(wanted.requirements)} on Python {wanted.python_version}"
        return f"{path.relative_to(root)} was made for {made_for}, but the profile pins {pinned}: {fix}"
    unhashed = [line for line in path.read_text().splitlines() if _REQUIREMENT_LINE.match(line) and "\\" not in line]
    if unhashed:
        return f"{path.relative_to(root)} has requirements without hashes ({unhashed[0]}): {fix}"
    return None


def compile_lock(pins: Mapping[str, object], target: Path, *, find_links: Path | None = None) -> None:
    """Write the lock of `pins` to `target` with uv (resolved for the image's Python and platform)."""
    uv = shutil.which("uv")
    if uv is None:
        raise UsageError("`invoke lock` needs uv: .venv/bin/pip install uv")
    header = LockHeader.of_pins(pins)
    with tempfile.TemporaryDirectory() as scratch:
        wanted = Path(scratch) / "ml.in"
        wanted.write_text("\n".join(header.requirements) + "\n")
        command = [uv, "pip", "compile", str(wanted), "--generate-hashes", "--no-header", "--quiet"]
        command += ["--python-version", header.python_version, "--python-platform", header.platform]
        if find_links is not None:
            command += ["--find-links", str(find_links)]
        command += ["--output-file", str(Path(scratch) / "lock.txt")]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise UsageError(f"uv could not resolve {', '.join(header.requirements)}:\n{result.stderr.strip()[-2000:]}")
        body = (Path(scratch) / "lock.txt").read_text().replace(str(wanted), "ml.in")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"{header.line()}\n# written by `invoke lock`; installed with pip --require-hashes\n{body}")
