"""Build the layer graph; each layer must pass its checks before any layer built on it is built.

For each step: docker build (BuildKit, untagged) -> checks in a container of the new image
(skipped when this image ID already passed the same checks; the parents' checks run again only
when the layer changed something they look at, see llm2wasm.host.layerdiff) -> tag. Layers whose
dependencies are all ready build at the same time (the web toolchain beside the ML wheels; one's
checks overlap the other's build). The first failure stops the build, names the layer and shows
the failing output; nothing that depends on it is built or tagged, nothing new is started, and a
layer of the other branch already under way is finished first.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from llm2wasm.errors import BuildFailed, UsageError
from llm2wasm.host import docker
from llm2wasm.host.pins import Profile
from llm2wasm.host.plan import BuildPlan, Step
from llm2wasm.host.state import STATE_DIR, VerifiedImages, checks_digest
from llm2wasm.host.verify import run_checks, run_selftest, select_checks
from llm2wasm.image.scripts import cuda_libs


@dataclass
class Reporter:
    """Progress lines on stderr; full build output streamed, or when quiet only logged, with a
    heartbeat naming the current Dockerfile step so a long pip install is not mistaken for a hang."""

    quiet: bool = False
    log_dir: Path = STATE_DIR / "logs"
    stream: object = field(default=sys.stderr)
    heartbeat_seconds: float = 30.0
    # per layer: two layers build at once
    _started: dict[str, float] = field(default_factory=dict, init=False)
    _last_beat: dict[str, float] = field(default_factory=dict, init=False)
    _step: dict[str, str] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def say(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream, flush=True)

    def start_layer(self, layer: str) -> None:
        self._started[layer] = self._last_beat[layer] = time.monotonic()
        self._step[layer] = ""

    def build_line(self, layer: str, line: str, log) -> None:
        log.write(line + "\n")
        if not self.quiet:
            self.say(f"  {layer} | {line}")
            return
        # BuildKit's plain progress announces each step as "#N [stage k/n] INSTRUCTION"
        if line.startswith("#") and " [" in line and "]" in line:
            self._step[layer] = line.split(" ", 1)[1][:100]
        now = time.monotonic()
        if now - self._last_beat.get(layer, now) >= self.heartbeat_seconds:
            self._last_beat[layer] = now
            self.say(f"    {layer}: building, {now - self._started[layer]:.0f}s so far: {self._step[layer]}")


@dataclass
class LayerResult:
    layer: str
    tag: str
    image_id: str
    build_seconds: float
    verify_seconds: float
    verified: str  # "passed" | "cached"


def derive_args(step: Step, tags: dict[str, str]) -> dict[str, str]:
    """The layer's derived build args, each read from the built image of the layer the registry names."""
    derived: dict[str, str] = {}
    for arg, source in step.layer.derived_args.items():
        if arg == "CUDA_LIBRARY_PATH":
            script = Path(cuda_libs.__file__).read_text()
            derived[arg] = docker.run_script(tags[source], script).strip()
        else:  # a registry entry names a derived arg nobody knows how to make
            raise AssertionError(f"no rule to derive build arg {arg}")
    return derived


# Layers built at once: the graph has two branches, and BuildKit builds two images side by side.
BUILD_JOBS = 2


def run_graph(steps: list[Step], run_step: Callable[[Step], LayerResult], jobs: int = BUILD_JOBS) -> list[LayerResult]:
    """Run each step once everything it depends on has finished, up to ``jobs`` at once.

    After a failure nothing new starts; steps already running finish (their results stand), then
    the first failure is raised. Results come back in plan order."""
    done: dict[str, LayerResult] = {}
    failure: BaseException | None = None
    pending = list(steps)
    running: dict[Future, Step] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            if failure is None:
                for step in [s for s in pending if all(name in done for name in s.layer.depends_on)]:
                    if len(running) < max(1, jobs):
                        pending.remove(step)
                        running[pool.submit(run_step, step)] = step
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                step = running.pop(future)
                try:
                    done[step.layer.name] = future.result()
                except BaseException as error:  # BuildFailed, or anything else a step raised
                    failure = failure or error
    if failure is not None:
        raise failure
    return [done[step.layer.name] for step in steps]


def build_plan(
    plan: BuildPlan,
    reporter: Reporter | None = None,
    *,
    reverify: bool = False,
    no_cache: bool = False,
    selftest: bool = True,
    jobs: int = BUILD_JOBS,
) -> list[LayerResult]:
    pending = plan.pending_args()
    if pending:  # a placeholder must never reach docker build as a value
        raise ValueError(
            f"build args still wait for the preflight: {', '.join(pending)}; "
            "build plan.with_resolved(the preflight's findings), or with_resolved({}) under --no-preflight"
        )
    reporter = reporter or Reporter()
    docker.ensure_engine()
    state = VerifiedImages(plan.profile.name)
    total = len(plan.steps)
    log_dir = reporter.log_dir / plan.profile.name
    log_dir.mkdir(parents=True, exist_ok=True)
    tags = {step.layer.name: step.tag for step in plan.steps}
    positions = {step.layer.name: f"[{index}/{total}]" for index, step in enumerate(plan.steps, 1)}

    def build_step(step: Step) -> LayerResult:
        name, position = step.layer.name, positions[step.layer.name]
        parent_tag = tags[step.layer.parent] if step.layer.parent else None
        args = dict(step.build_args)
        args.update(derive_args(step, tags))
        reporter.say(f"==> {position} {name}: building {step.tag}")
        log_path = log_dir / f"{name}.log"
        reporter.start_layer(name)
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp, open(log_path, "w") as log:
            iidfile = Path(tmp) / "iid"
            status = docker.build(
                dockerfile=step.dockerfile,
                context=plan.context,
                build_args=args,
                network=step.network,
                iidfile=iidfile,
                on_line=lambda line: reporter.build_line(name, line, log),
                no_cache=no_cache,
            )
            image_id = iidfile.read_text().strip() if iidfile.exists() else ""
        build_seconds = time.monotonic() - started
        if status != 0 or not image_id:
            tail = "\n".join(log_path.read_text().splitlines()[-40:])
            reporter.say(
                f"!!! {position} {name}: docker build failed after {build_seconds:.1f}s (full log: {log_path})\n{tail}"
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
                    f"!!! {position} {name}: checks FAILED ({result.summary}) in "
                    f"{result.seconds:.1f}s; not tagged {step.tag}, the layers built on it not built.\n"
                    f"{result.output}\n"
                    f"The failed image is kept as {kept} (the previous one it replaces is removed); look inside: "
                    f"docker run --rm -it --entrypoint bash {kept}"
                )
                raise BuildFailed(name, f"checks failed: {result.summary}", result.output)
            reporter.say(f"    {name}: checks passed ({result.summary}) in {verify_seconds:.1f}s")
            if step.layer.selftest:
                if selftest:
                    verify_seconds += run_selftest_gate(image_id, name, step.tag, position, reporter, log_dir)
                else:
                    reporter.say(
                        f"    {name}: selftest skipped (--no-selftest): tagged, but not publishable until "
                        "`invoke build` runs it"
                    )
            state.record(name, image_id, digest)
            verified = "passed"
        retag(image_id, step.tag)
        reporter.say(
            f"<== {position} {name}: {step.tag} ready (build {build_seconds:.1f}s, verify {verify_seconds:.1f}s)"
        )
        return LayerResult(name, step.tag, image_id, build_seconds, verify_seconds, verified)

    return run_graph(plan.steps, build_step, jobs)


def run_selftest_gate(image_id: str, name: str, tag: str, position: str, reporter: Reporter, log_dir: Path) -> float:
    """The selftest (llm2wasm.host.verify.run_selftest) as the build's last gate: a failure stops the build
    like failed checks, the image kept for a look and not tagged."""
    reporter.say(f"    {name}: selftest (a real conversion in the image, about a minute)")
    log_path = log_dir / f"{name}-selftest.log"
    result, seconds = run_selftest(image_id, log_path)
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


def build_images(
    profile: Profile,
    *,
    until: str | None = None,
    repository: str = "llm2wasm",
    images_dir: Path | None = None,
    dry_run: bool = False,
    quiet: bool = False,
    reverify: bool = False,
    no_cache: bool = False,
    report: Path | None = None,
    preflight: bool = True,
    selftest: bool = True,
    jobs: int = BUILD_JOBS,
) -> list[LayerResult]:
    """`invoke build`: the preflight, then the plan layer by layer, then the report."""
    from llm2wasm.host.plan import make_plan
    from llm2wasm.host.report import build_report, write_report

    if report is not None and report.suffix not in (".md", ".json"):
        raise UsageError(f"--report {report}: name a .md or .json file")
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: build at least one layer at a time (--jobs 1 builds them one by one)")
    plan = make_plan(
        profile,
        until=until,
        repository=repository,
        images_dir=images_dir,
        # the dry run asks no server: what the preflight resolves is shown as a placeholder
        resolved=None if preflight else {},
    )
    if dry_run:
        print(plan.describe())
        return []
    reporter = Reporter(quiet=quiet)
    if not preflight:
        reporter.say(f"==> {plan.unpinned_note()}")
    else:
        from llm2wasm.host.preflight import preflight_or_stop

        resolved = preflight_or_stop(plan.profile, [step.layer.name for step in plan.steps], reporter.say)
        plan = plan.with_resolved(resolved)
        for line in plan.resolution_lines():
            reporter.say(f"    pinned: {line}")
    results = build_plan(plan, reporter, reverify=reverify, no_cache=no_cache, selftest=selftest, jobs=jobs)
    summary = build_report(plan.profile.name, results)
    print(summary.to_markdown())
    if report is not None:
        write_report(summary, report)
    print(f"built and verified {len(results)} layer(s); final image {results[-1].tag}")
    return results


def remove_images(profile: str | None = None) -> None:
    """`invoke clean`: every layer's image of the profile (of every profile by default), the failed
    layers kept beside them, and the build records (.llm2wasm/)."""
    import shutil

    from llm2wasm.host.layers import LAYERS
    from llm2wasm.host.pins import profile_names

    for name in [profile] if profile else profile_names():
        for layer in LAYERS:
            docker.remove_image(layer.tag(name))
            docker.remove_image(failed_tag(layer.tag(name)))
    shutil.rmtree(STATE_DIR, ignore_errors=True)
