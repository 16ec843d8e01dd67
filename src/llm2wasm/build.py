"""Build the layer chain; each layer must pass its checks before the next is built.

For each step: docker build (BuildKit, untagged) -> checks in a container of the new image
(skipped when this image ID already passed the same checks; the parents' checks run again only
when the layer changed something they look at, see llm2wasm.layerdiff) -> tag. The first failure stops the
build, names the layer and shows the failing output; nothing after it is built or tagged.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import cuda_libs, docker
from .errors import BuildFailed
from .plan import BuildPlan, Step
from .state import STATE_DIR, VerifiedImages, checks_digest
from .verify import run_checks, select_checks


@dataclass
class Reporter:
    """Progress lines on stderr; full build output streamed, or when quiet only logged, with a
    heartbeat naming the current Dockerfile step so a long pip install is not mistaken for a hang."""

    quiet: bool = False
    log_dir: Path = STATE_DIR / "logs"
    stream: object = field(default=sys.stderr)
    heartbeat_seconds: float = 30.0
    _started: float = field(default=0.0, init=False)
    _last_beat: float = field(default=0.0, init=False)
    _step: str = field(default="", init=False)

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start_layer(self) -> None:
        self._started = self._last_beat = time.monotonic()
        self._step = ""

    def build_line(self, layer: str, line: str, log) -> None:
        log.write(line + "\n")
        if not self.quiet:
            print(f"  {layer} | {line}", file=self.stream, flush=True)
            return
        # BuildKit's plain progress announces each step as "#N [stage k/n] INSTRUCTION"
        if line.startswith("#") and " [" in line and "]" in line:
            self._step = line.split(" ", 1)[1][:100]
        now = time.monotonic()
        if now - self._last_beat >= self.heartbeat_seconds:
            self._last_beat = now
            self.say(f"    {layer}: building, {now - self._started:.0f}s so far: {self._step}")


@dataclass
class LayerResult:
    layer: str
    tag: str
    image_id: str
    build_seconds: float
    verify_seconds: float
    verified: str  # "passed" | "cached"


def derive_args(step: Step, parent_tag: str | None) -> dict[str, str]:
    derived: dict[str, str] = {}
    for arg in step.layer.derived_args:
        if arg == "CUDA_LIBRARY_PATH":
            script = Path(cuda_libs.__file__).read_text()
            derived[arg] = docker.run_script(parent_tag, script).strip() if parent_tag else ""
        else:  # a registry entry names a derived arg nobody knows how to make
            raise AssertionError(f"no rule to derive build arg {arg}")
    return derived


def build_plan(
    plan: BuildPlan,
    reporter: Reporter | None = None,
    *,
    reverify: bool = False,
    no_cache: bool = False,
    selftest: bool = True,
) -> list[LayerResult]:
    reporter = reporter or Reporter()
    docker.ensure_engine()
    state = VerifiedImages(plan.profile.name)
    results: list[LayerResult] = []
    total = len(plan.steps)
    log_dir = reporter.log_dir / plan.profile.name
    log_dir.mkdir(parents=True, exist_ok=True)
    for index, step in enumerate(plan.steps, 1):
        name = step.layer.name
        parent_tag = plan.steps[index - 2].tag if index > 1 else None
        args = dict(step.build_args)
        args.update(derive_args(step, parent_tag))
        reporter.say(f"==> [{index}/{total}] {name}: building {step.tag}")
        log_path = log_dir / f"{name}.log"
        reporter.start_layer()
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp, open(log_path, "w") as log:
            iidfile = Path(tmp) / "iid"
            status = docker.build(
                dockerfile=step.dockerfile,
                context=plan.context,
                build_args=args,
                network=step.network,
                iidfile=iidfile,
                on_line=lambda line, name=name, log=log: reporter.build_line(name, line, log),
                no_cache=no_cache,
            )
            image_id = iidfile.read_text().strip() if iidfile.exists() else ""
        build_seconds = time.monotonic() - started
        if status != 0 or not image_id:
            tail = "\n".join(log_path.read_text().splitlines()[-40:])
            reporter.say(
                f"!!! [{index}/{total}] {name}: docker build failed after {build_seconds:.1f}s "
                f"(full log: {log_path})\n{tail}"
            )
            raise BuildFailed(name, f"docker build failed (exit {status}); log: {log_path}", tail)
        reporter.say(f"    {name}: built {image_id[:19]} in {build_seconds:.1f}s")

        digest = checks_digest(name, plan.profile, selftest)
        if not reverify and state.is_verified(name, image_id, digest):
            reporter.say(f"    {name}: unchanged image already passed these checks; not verified again")
            verified, verify_seconds = "cached", 0.0
        else:
            verify_started = time.monotonic()
            selection = select_checks(name, image_id, parent_tag, STATE_DIR / "manifests")
            if not selection.has_parents:
                scope = "its checks"
            elif selection.parents_carried_over:
                scope = "its own checks; it changed nothing its parents' checks look at, so theirs carry over"
            else:
                scope = f"its checks and its parents' again ({'; '.join(selection.reasons)})"
            reporter.say(f"    {name}: verifying (testinfra: {scope})")
            result = run_checks(
                image_id,
                name,
                plan.profile,
                modules=selection.modules,
                junit_dir=STATE_DIR / "reports" / plan.profile.name,
            )
            # the comparison with the parent image counts as verification time too
            verify_seconds = time.monotonic() - verify_started
            if not result.passed:
                state.forget(name, image_id)
                kept = keep_failed_image(image_id, step.tag)
                reporter.say(
                    f"!!! [{index}/{total}] {name}: checks FAILED ({result.summary}) in "
                    f"{result.seconds:.1f}s; not tagged {step.tag}, later layers not built.\n{result.output}\n"
                    f"The failed image is kept as {kept} (the previous one it replaces is removed); look inside: "
                    f"docker run --rm -it --entrypoint bash {kept}"
                )
                raise BuildFailed(name, f"checks failed: {result.summary}", result.output)
            reporter.say(f"    {name}: checks passed ({result.summary}) in {verify_seconds:.1f}s")
            if step.layer.selftest:
                if selftest:
                    verify_seconds += run_selftest_gate(
                        image_id, name, step.tag, f"[{index}/{total}]", reporter, log_dir
                    )
                else:
                    reporter.say(
                        f"    {name}: selftest skipped (--no-selftest): tagged, but not publishable until "
                        "`invoke build` runs it"
                    )
            state.record(name, image_id, digest)
            verified = "passed"
        retag(image_id, step.tag)
        results.append(LayerResult(name, step.tag, image_id, build_seconds, verify_seconds, verified))
        reporter.say(
            f"<== [{index}/{total}] {name}: {step.tag} ready (build {build_seconds:.1f}s, verify {verify_seconds:.1f}s)"
        )
    return results


SELFTEST_TIMEOUT = 1800.0


def run_selftest_gate(image_id: str, name: str, tag: str, position: str, reporter: Reporter, log_dir: Path) -> float:
    """`llm2wasm selftest` in the image (a tiny model and LoRA made, merged and converted by the
    image's own mlc_llm, emscripten and WGSL check). A failure stops the build like failed checks."""
    reporter.say(f"    {name}: selftest (a real conversion in the image, about 2 minutes)")
    log_path = log_dir / f"{name}-selftest.log"
    started = time.monotonic()
    result = docker.run(
        ["run", "--rm", "--network", "none", image_id, "selftest"], check=False, timeout=SELFTEST_TIMEOUT
    )
    seconds = time.monotonic() - started
    log_path.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        kept = keep_failed_image(image_id, tag)
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        reporter.say(
            f"!!! {position} {name}: selftest FAILED (exit {result.returncode}) in {seconds:.1f}s; not tagged {tag}.\n"
            f"{tail}\nFull log: {log_path}. The failed image is kept as {kept}."
        )
        raise BuildFailed(name, f"selftest failed (exit {result.returncode}); log: {log_path}", tail)
    reporter.say(f"    {name}: selftest passed (a real conversion) in {seconds:.1f}s")
    return seconds


def retag(image_id: str, tag: str) -> None:
    """Point the layer's tag at the new image and remove the image it pointed at before, unless
    something else (another tag, a container) still uses it: rebuilds do not pile up untagged images."""
    previous = docker.image_id(tag)
    docker.tag(image_id, tag)
    if previous and previous != image_id:
        docker.remove_if_unused(previous)


def failed_tag(tag: str) -> str:
    """llm2wasm:emsdk-stable -> llm2wasm-failed:emsdk-stable: one inspectable image per layer and profile."""
    repository, _, name = tag.rpartition(":")
    return f"{repository}-failed:{name}"


def keep_failed_image(image_id: str, tag: str) -> str:
    """Tag a layer image that failed its checks for inspection, replacing (and removing) the image
    the same layer failed with before, so failed builds do not pile up untagged images."""
    kept = failed_tag(tag)
    retag(image_id, kept)
    return kept
