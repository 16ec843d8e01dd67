"""Preflight: check in seconds that every remote pin of a profile resolves, before a half-hour build.

A build of the image chain fails late, and with an upstream message, when a pin names something that does
not exist. Preflight asks each source directly and, on failure, names the pin, what it asked for, and the
nearest things that do exist:

- ``base_image``: the registry's v2 API (with an anonymous bearer token when the registry asks for one):
  the tag or digest exists and, for a multi-platform image, has this host's linux platform;
- ``mlc_ai_requirement`` / ``mlc_llm_requirement`` on the flat find-links page ``mlc_wheel_index``, and the
  other requirements on the indexes ``pip_options`` names (PyPI by default): a release matches the specifier
  and has a file the image's Python (``python_version``) can install on linux for this host's architecture;
- ``emsdk_ref`` (only when ``emscripten_source`` is "emsdk") and ``mlc_llm_ref``: a tag or branch of the
  repository, via ``git ls-remote``;
- ``webllm_version`` / ``webllm_integrity``: the npm registry knows the version and its ``dist.integrity``
  is the pinned one.

What a passing check resolved a pin to (the commit of each git ref, the base image's manifest digest) comes
back with its result (``PreflightResult.resolved``; ``resolved_pins``), and the build pins itself to it: the
layers get ``BASE_IMAGE=NAME:TAG@sha256:...``, ``EMSDK_COMMIT`` and ``MLC_LLM_COMMIT`` (llm2wasm.host.plan).

Each URL is fetched once per run, the checks run concurrently, and an unreachable source is one
"cannot reach" result rather than a traceback.

One module per source asked: ``registry`` (the base image), ``wheels`` (wheel indexes and find-links
pages; ``indexes`` reads them, ``pipinstall`` says where pip looks and for which Python and platform),
``torchcuda`` (the CUDA major of torch's wheel), ``git`` (``git ls-remote``) and ``npm``; ``fetching``
holds what they share (the result type, fetching each URL once, the nearest alternatives). This
module runs them and reports.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import requests

from llm2wasm.host.findings import report_lines
from llm2wasm.host.locks import lock_problem
from llm2wasm.host.pins import PROJECT_ROOT, Profile
from llm2wasm.host.preflight.fetching import (
    HTTP_TIMEOUT,
    Fetcher,
    PreflightResult,
    SourceFailed,
    make_session,
    nearest_versions,
)
from llm2wasm.host.preflight.git import GIT_TIMEOUT, check_git_ref
from llm2wasm.host.preflight.npm import check_webllm
from llm2wasm.host.preflight.pipinstall import (
    PYPI_SIMPLE,
    PipSources,
    Target,
    parse_pip_options,
    parse_python_version,
)
from llm2wasm.host.preflight.registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    check_base_image,
    manifest_digest,
    parse_image_reference,
    pinned_by_digest,
    wheel_arch,
)
from llm2wasm.host.preflight.torchcuda import check_cuda_major
from llm2wasm.host.preflight.wheels import MLC_WHEEL_PINS, PIP_PINS, check_requirement

__all__ = [
    "DOCKER_MANIFEST",
    "OCI_INDEX",
    "PYPI_SIMPLE",
    "PreflightResult",
    "for_layers",
    "format_results",
    "manifest_digest",
    "nearest_versions",
    "parse_image_reference",
    "parse_pip_options",
    "pinned_by_digest",
    "preflight_or_stop",
    "resolved_pins",
    "run_preflight",
]

WORKERS = 16  # enough for every check of a profile at once: they wait on the network, not the CPU


# --- running ---------------------------------------------------------------------------------------


def _guarded(pins: tuple[str, ...], check: Callable[[], list[PreflightResult]]) -> list[PreflightResult]:
    try:
        return check()
    except SourceFailed as failure:
        return [failure.result(pins)]
    except Exception as exc:  # one odd answer must not hide the other checks' results
        return [PreflightResult(pins, False, f"{', '.join(pins)}: could not check: {type(exc).__name__}: {exc}")]


def _merge_same_failures(results: list[PreflightResult]) -> list[PreflightResult]:
    """One result per failed source: pins that fail with the same message share it."""
    merged: list[PreflightResult] = []
    index_of: dict[tuple[str, str], int] = {}
    for result in results:
        key = (result.message, result.source)
        if result.ok or key not in index_of:
            if not result.ok:
                index_of[key] = len(merged)
            merged.append(result)
            continue
        earlier = merged[index_of[key]]
        pins = tuple(dict.fromkeys((*earlier.pins, *result.pins)))
        merged[index_of[key]] = PreflightResult(pins, False, earlier.message, earlier.fix, earlier.source)
    return merged


def run_preflight(
    profile: Profile,
    *,
    session: requests.Session | None = None,
    git: str = "git",
    timeout: float | tuple[float, float] = HTTP_TIMEOUT,
    git_timeout: float = GIT_TIMEOUT,
    machine: str | None = None,
) -> list[PreflightResult]:
    """Check every remote pin of profile; results in a fixed order (image, wheels, git, npm)."""
    machine = machine or platform.machine()
    own_session = session is None
    http = session or make_session()
    fetcher = Fetcher(http, timeout)
    tasks: list[tuple[tuple[str, ...], Callable[[], list[PreflightResult]]]] = []
    early: list[PreflightResult] = []

    tasks.append((("base_image",), lambda: check_base_image(fetcher, profile, machine)))

    try:
        target = Target(parse_python_version(str(profile.get("python_version", ""))), wheel_arch(machine))
    except ValueError as exc:
        early.append(PreflightResult(("python_version",), False, str(exc), "--set python_version=3.12"))
        target = None
    try:
        pip_sources = parse_pip_options(str(profile.get("pip_options") or ""))
    except ValueError as exc:
        early.append(PreflightResult(("pip_options",), False, f"pip_options: {exc}"))
        pip_sources = None
    mlc_index = str(profile.get("mlc_wheel_index") or "").strip()
    if not mlc_index:
        early.append(
            PreflightResult(("mlc_wheel_index",), False, "mlc_wheel_index is empty", "--set mlc_wheel_index=URL")
        )
    # the lock is a file of this checkout, not a remote pin, but a stale one would install other
    # versions than the pins say: caught here, before anything is built
    stale_lock = lock_problem(PROJECT_ROOT, profile.name, profile.pins)
    if stale_lock:
        early.append(PreflightResult(("ml_lock",), False, stale_lock))
    if target is not None:
        wheel_pins = [(pin, PipSources((), (mlc_index,))) for pin in MLC_WHEEL_PINS] if mlc_index else []
        if pip_sources is not None:
            wheel_pins += [(pin, pip_sources) for pin in PIP_PINS]
        for pin, sources in wheel_pins:
            requirement = profile.get(pin)
            if requirement:
                tasks.append(
                    ((pin,), lambda p=pin, r=str(requirement), s=sources: check_requirement(fetcher, p, r, s, target))
                )
        if pip_sources is not None and profile.cuda:
            tasks.append(
                (("torch_requirement", "variant"), lambda: check_cuda_major(fetcher, profile, pip_sources, target))
            )

    git_pins = [("mlc_llm_repo", "mlc_llm_ref")]
    if profile.get("emscripten_source", "emsdk") == "emsdk":
        git_pins.insert(0, ("emsdk_repo", "emsdk_ref"))
    for repo_pin, ref_pin in git_pins:
        if profile.get(repo_pin) and profile.get(ref_pin):
            tasks.append(
                (
                    (repo_pin, ref_pin),
                    lambda a=repo_pin, b=ref_pin: check_git_ref(fetcher, profile, a, b, git, git_timeout),
                )
            )

    if profile.get("npm_registry") and profile.get("webllm_version"):
        tasks.append((("npm_registry", "webllm_version", "webllm_integrity"), lambda: check_webllm(fetcher, profile)))

    try:
        with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="preflight") as pool:
            futures = [pool.submit(_guarded, pins, check) for pins, check in tasks]
            results = [*early, *(result for future in futures for result in future.result())]
    finally:
        if own_session:
            http.close()
    return _merge_same_failures(results)


def format_results(results: Iterable[PreflightResult]) -> tuple[str, bool]:
    """In doctor's layout: 'ok  ...' / 'NO  ...' with the fix under each problem; and all ok?"""
    return report_lines((result.ok, result.message, result.fix) for result in results)


def for_layers(results: Iterable[PreflightResult], layer_names: Iterable[str]) -> list[PreflightResult]:
    """The results that matter for building these layers: a pin only a later layer uses (say the
    app layer's WebLLM, when building --until ml) does not stop the build."""
    from llm2wasm.host.layers import LAYERS

    used_by_some_layer = {pin for layer in LAYERS for pin in layer.build_args.values()}
    wanted = {pin for layer in LAYERS if layer.name in set(layer_names) for pin in layer.build_args.values()}
    return [result for result in results if any(pin in wanted or pin not in used_by_some_layer for pin in result.pins)]


def resolved_pins(results: Iterable[PreflightResult]) -> dict[str, str]:
    """Pin -> what the checks that passed resolved it to (a commit, a digest)."""
    return {pin: value for result in results if result.ok for pin, value in result.resolved}


def preflight_or_stop(profile: Profile, layer_names: Iterable[str], say: Callable[[str], None]) -> dict[str, str]:
    """Run the preflight for a build; raise UsageError (exit 2) naming every pin that does not resolve.
    Returns what the pins resolved to (``resolved_pins``), for the build to pin itself to."""
    import time

    from llm2wasm.errors import UsageError

    started = time.monotonic()
    say(f"==> preflight: do the remote pins of profile {profile.name} resolve? (skip: --no-preflight)")
    everything = run_preflight(profile)
    results = for_layers(everything, layer_names)
    text, healthy = format_results(results)
    if not healthy:
        raise UsageError(
            f"preflight: pins of profile {profile.name} do not resolve; nothing was built.\n{text}\n"
            "Fix the pins (images/pins.toml or --set KEY=VALUE), or skip this check with --no-preflight."
        )
    say(f"<== preflight: {len(results)} checks passed in {time.monotonic() - started:.1f}s")
    return resolved_pins(everything)
