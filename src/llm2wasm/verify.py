"""Run a layer's testinfra checks (verify/) against an image, in a throwaway container."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .layers import ancestors
from .pins import PROJECT_ROOT, Profile

VERIFY_DIR = PROJECT_ROOT / "verify"


@dataclass(frozen=True)
class CheckResult:
    layer: str
    image: str
    passed: bool
    summary: str
    output: str
    seconds: float


def _summary(output: str) -> str:
    for line in reversed(output.strip().splitlines()):
        if " passed" in line or " failed" in line or " error" in line or "no tests ran" in line:
            return line.strip("= ")
    return "no summary line from pytest"


def check_modules(layer: str, own_only: bool = False) -> list[Path]:
    chain = ancestors(layer)
    return [chain[-1].check_module] if own_only else [step.check_module for step in chain]


def verify_built(
    profile: Profile, layer: str | None = None, *, repository: str = "llm2wasm", own_only: bool = False
) -> Iterator[CheckResult]:
    """Check the tagged images of a profile (one layer, or all in build order), one result each."""
    from . import docker
    from .layers import LAYERS, get_layer

    for entry in [get_layer(layer)] if layer else list(LAYERS):
        tag = entry.tag(profile.name, repository)
        if docker.image_id(tag) is None:
            where = "" if repository == "llm2wasm" else f" --repository {repository}"
            raise UsageError(
                f"image {tag} not found: build it first with "
                f"`invoke build --profile {profile.name} --until {entry.name}{where}`"
            )
        yield run_checks(tag, entry.name, profile, own_only=own_only)


def run_checks(
    image: str,
    layer: str,
    profile: Profile,
    *,
    own_only: bool = False,
    junit_dir: Path | None = None,
    extra_args: list[str] | None = None,
) -> CheckResult:
    """Run the checks of ``layer`` (and its parents', which a child must not break) on ``image``."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(profile.to_json(), handle)
        pins_file = handle.name
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-c",
        str(VERIFY_DIR / "pytest.ini"),
        "--rootdir",
        str(VERIFY_DIR),
        "-q",
        "-rfE",
        "--tb=short",
        "--color=no",
        f"--image={image}",
        f"--layer={layer}",
        f"--pins-json={pins_file}",
    ]
    if junit_dir is not None:
        junit_dir.mkdir(parents=True, exist_ok=True)
        cmd.append(f"--junitxml={junit_dir / (layer + '.xml')}")
    cmd += [str(path) for path in check_modules(layer, own_only)]
    cmd += extra_args or []
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT)
    finally:
        Path(pins_file).unlink(missing_ok=True)
    output = proc.stdout + proc.stderr
    return CheckResult(
        layer=layer,
        image=image,
        passed=proc.returncode == 0,
        summary=_summary(output),
        output=output,
        seconds=time.monotonic() - started,
    )
