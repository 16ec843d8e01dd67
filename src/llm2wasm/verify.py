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


@dataclass(frozen=True)
class CheckSelection:
    modules: list[Path]
    # why the parents' checks run again on this image; empty when they carry over
    reasons: list[str]

    @property
    def parents_carried_over(self) -> bool:
        return not self.reasons


def select_checks(layer: str, image: str, parent_image: str | None, cache_dir: Path) -> CheckSelection:
    """The layer's own checks, plus its parents' checks when the image changed something they look
    at compared with the parent image it was built on (llm2wasm.layerdiff has the rules). The
    parents' checks passed on the parent image, so when nothing they look at changed they carry over."""
    own = check_modules(layer, own_only=True)
    if parent_image is None:
        return CheckSelection(own, [])
    from .layerdiff import parent_check_reasons

    reasons = parent_check_reasons(parent_image, image, cache_dir)
    if not reasons:
        return CheckSelection(own, [])
    return CheckSelection(check_modules(layer), reasons)


def verify_built(
    profile: Profile,
    layer: str | None = None,
    *,
    repository: str = "llm2wasm",
    own_only: bool = False,
    full: bool = False,
    cache_dir: Path | None = None,
) -> Iterator[tuple[CheckResult, CheckSelection | None]]:
    """Check the tagged images of a profile, one result each.

    Every layer (top to bottom): its own checks, and its parents' checks again where the layer
    changed what they look at; a parent that fails voids that, so its children run every check.
    One layer (``layer``) or ``full``: the layer's checks and all its parents', on its image.
    """
    from . import docker
    from .layers import LAYERS, get_layer
    from .state import STATE_DIR

    cache_dir = cache_dir or STATE_DIR / "manifests"
    entries = [get_layer(layer)] if layer else list(LAYERS)
    for entry in entries:
        tag = entry.tag(profile.name, repository)
        if docker.image_id(tag) is None:
            where = "" if repository == "llm2wasm" else f" --repository {repository}"
            raise UsageError(
                f"image {tag} not found: build it first with "
                f"`invoke build --profile {profile.name} --until {entry.name}{where}`"
            )
    all_passed = True
    for entry in entries:
        tag = entry.tag(profile.name, repository)
        selection = None
        if own_only:
            modules = check_modules(entry.name, own_only=True)
        elif layer or full or not all_passed:
            modules = check_modules(entry.name)
        else:
            parent_tag = get_layer(entry.parent).tag(profile.name, repository) if entry.parent else None
            selection = select_checks(entry.name, tag, parent_tag, cache_dir)
            modules = selection.modules
        result = run_checks(tag, entry.name, profile, modules=modules)
        all_passed = all_passed and result.passed
        yield result, selection


def run_checks(
    image: str,
    layer: str,
    profile: Profile,
    *,
    own_only: bool = False,
    modules: list[Path] | None = None,
    junit_dir: Path | None = None,
    extra_args: list[str] | None = None,
) -> CheckResult:
    """Run the checks of ``layer`` (and its parents', which a child must not break) on ``image``;
    ``modules`` picks the check modules instead (see select_checks)."""
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
    cmd += [str(path) for path in (modules if modules is not None else check_modules(layer, own_only))]
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
