"""Run a layer's testinfra checks (verify/) against an image, in a throwaway container."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.host.layers import ancestors, get_layer
from llm2wasm.host.pins import PROJECT_ROOT, Profile

VERIFY_DIR = PROJECT_ROOT / "verify"
# Images checked at once by `invoke verify`: each check session is mostly one Python process
# importing torch/TVM, so two keep both cores of a small machine busy.
VERIFY_WORKERS = int(os.environ.get("LLM2WASM_VERIFY_WORKERS", "2"))


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
    has_parents: bool = True

    @property
    def parents_carried_over(self) -> bool:
        return self.has_parents and not self.reasons


def select_checks(layer: str, image: str, parent_image: str | None, cache_dir: Path) -> CheckSelection:
    """The layer's own checks, plus its parents' checks when the image changed something they look
    at compared with the parent image it was built on (llm2wasm.host.layerdiff has the rules). The
    parents' checks passed on the parent image, so when nothing they look at changed they carry over."""
    own = check_modules(layer, own_only=True)
    if parent_image is None:
        return CheckSelection(own, [], has_parents=False)
    from llm2wasm.host.layerdiff import parent_check_reasons

    reasons = parent_check_reasons(parent_image, image, cache_dir)
    joins = get_layer(layer).joins
    if joins:
        # the joined branch's files passed their checks in another image, with another environment
        # around them: the comparison with the image this one is built FROM cannot vouch for them
        reasons = [f"it joins {', '.join(joins)}: every branch's checks run on the joined image", *reasons]
    if not reasons:
        return CheckSelection(own, [])
    return CheckSelection(check_modules(layer), reasons)


SELFTEST_TIMEOUT = 1800.0


def selftest_command(image: str, keep: Path | None = None) -> list[str]:
    """The `docker` arguments of the selftest; with `keep`, what it makes (the tiny model, its adapter,
    the bundle, the step logs) stays in keep/run on this host, owned by the invoking user."""
    command = ["run", "--rm", "--network", "none"]
    if keep is not None:
        command += ["--user", f"{os.getuid()}:{os.getgid()}", "-v", f"{keep.resolve()}:/keep"]
    return [*command, image, "selftest", *(["--keep", "/keep/run"] if keep is not None else [])]


def run_selftest(image: str, log_path: Path, keep: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """`llm2wasm selftest` in `image` (a tiny model and LoRA made, merged and converted by the image's
    own mlc_llm, emscripten and WGSL check), without network; its whole output goes to log_path."""
    from llm2wasm.host import docker

    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            raise UsageError(f"--keep folder {keep} is not empty: pass a new or empty folder")
        keep.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = docker.run(selftest_command(image, keep), check=False, timeout=SELFTEST_TIMEOUT)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(result.stdout + result.stderr)
    return result, time.monotonic() - started


def selftest_tag(profile: Profile, repository: str = "llm2wasm") -> str:
    """The tagged image of the layer the registry gates with the selftest (the one users run)."""
    from llm2wasm.host import docker
    from llm2wasm.host.layers import LAYERS

    layer = next(entry for entry in LAYERS if entry.selftest)
    tag = layer.tag(profile.name, repository)
    if docker.image_id(tag) is None:
        where = "" if repository == "llm2wasm" else f" --repository {repository}"
        raise UsageError(f"image {tag} not found: build it first with `invoke build --profile {profile.name}{where}`")
    return tag


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
    from llm2wasm.host import docker
    from llm2wasm.host.layers import LAYERS, get_layer
    from llm2wasm.host.state import STATE_DIR

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
    if own_only or layer or full:
        for entry in entries:
            modules = check_modules(entry.name, own_only=own_only)
            yield run_checks(entry.tag(profile.name, repository), entry.name, profile, modules=modules), None
        return
    # Every layer: the selections first (cheap once the manifests are cached), then the checks of
    # several images side by side (each in its own container and pytest process).
    selections = []
    for entry in entries:
        parent_tag = get_layer(entry.parent).tag(profile.name, repository) if entry.parent else None
        selections.append(select_checks(entry.name, entry.tag(profile.name, repository), parent_tag, cache_dir))
    failed: set[str] = set()
    with ThreadPoolExecutor(max_workers=max(1, min(VERIFY_WORKERS, len(entries)))) as pool:
        futures = [
            pool.submit(run_checks, entry.tag(profile.name, repository), entry.name, profile, modules=selection.modules)
            for entry, selection in zip(entries, selections, strict=True)
        ]
        for entry, selection, future in zip(entries, selections, futures, strict=True):
            result = future.result()
            parents = {step.name for step in ancestors(entry.name)[:-1]}
            if parents & failed and selection.parents_carried_over:
                # the parents' results this layer relied on did not hold: run every check here
                selection = CheckSelection(check_modules(entry.name), ["a parent failed its checks"])
                result = run_checks(entry.tag(profile.name, repository), entry.name, profile, modules=selection.modules)
            if not result.passed:
                failed.add(entry.name)
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


def verify_images(
    profile: Profile,
    layer: str | None = None,
    *,
    repository: str = "llm2wasm",
    own_only: bool = False,
    full: bool = False,
    selftest: bool = False,
    keep: Path | None = None,
) -> list[str]:
    """`invoke verify`: each layer's checks (and with `selftest`, a real conversion, what it made kept
    in `keep`/run when given), a line each; the names of what failed."""
    from llm2wasm.host.state import STATE_DIR

    failed = []
    if keep is not None and not selftest:
        raise UsageError("--keep keeps what the selftest made: add --selftest")
    tag = selftest_tag(profile, repository) if selftest else None  # a missing image stops before any check
    for result, selection in verify_built(profile, layer, repository=repository, own_only=own_only, full=full):
        scope = ""
        if selection is not None and selection.has_parents:
            scope = "  parents' checks carried over" if selection.parents_carried_over else "  with parents' checks"
        verdict = "PASS" if result.passed else "FAIL"
        print(f"{result.layer:12} {verdict}  {result.summary}  ({result.seconds:.1f}s){scope}")
        if not result.passed:
            print(result.output)
            failed.append(result.layer)
    if tag:
        log = STATE_DIR / "logs" / profile.name / "verify-selftest.log"
        outcome, seconds = run_selftest(tag, log, keep)
        passed = outcome.returncode == 0
        verdict = "PASS" if passed else "FAIL"
        kept = f"  kept: {keep / 'run'}" if keep is not None else ""
        print(f"{'selftest':12} {verdict}  a real conversion in {tag}  ({seconds:.1f}s)  log: {log}{kept}")
        if not passed:
            print("\n".join((outcome.stdout + outcome.stderr).splitlines()[-30:]))
            failed.append("selftest")
    return failed
