"""Preflight of the wheel pins: ``mlc_ai_requirement`` / ``mlc_llm_requirement`` on the flat find-links page
``mlc_wheel_index``, the other requirements on the indexes ``pip_options`` names (PyPI by default): a release
matches the specifier and has a file the image's Python can install on linux for this host's architecture.

This module judges a requirement against the files the sources offer (llm2wasm.host.preflight.indexes
reads them; llm2wasm.host.preflight.pipinstall says where pip looks and what it can install) and, when
none fits, says what does exist. For CUDA profiles, torch's CUDA major is llm2wasm.host.preflight.torchcuda.
"""

from __future__ import annotations

import re

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from llm2wasm.host.preflight.fetching import (
    SHOWN,
    Fetcher,
    PreflightResult,
    _as_version,
    nearest_names,
    nearest_versions,
)
from llm2wasm.host.preflight.indexes import Candidate, collect, index_projects
from llm2wasm.host.preflight.pipinstall import PipSources, Target

# Installed from the MLC wheel index with `pip download --no-index --find-links`.
MLC_WHEEL_PINS = ("mlc_ai_requirement", "mlc_llm_requirement")
# Installed with `pip install $PIP_OPTIONS`; the last two exist only in some profiles.
PIP_PINS = (
    "torch_requirement",
    "transformers_requirement",
    "peft_requirement",
    "bitsandbytes_requirement",
    "tvm_ffi_requirement",
    "wgsl_validator_requirement",
)


def check_requirement(
    fetcher: Fetcher,
    pin: str,
    requirement_text: str,
    sources: PipSources,
    target: Target,
) -> list[PreflightResult]:
    pins = (pin,)
    try:
        requirement = Requirement(requirement_text)
    except InvalidRequirement as exc:
        return [PreflightResult(pins, False, f"{pin} {requirement_text!r} is not a requirement: {exc}")]
    where = ", ".join((*sources.find_links, *sources.indexes)) or "no package source"
    if requirement.url:
        return [PreflightResult(pins, True, f"{pin} {requirement_text}: a direct URL, fetched at build time")]
    if not sources.find_links and not sources.indexes:
        return [PreflightResult(pins, False, f"{pin} {requirement_text}: pip_options leaves no package source")]

    project = canonicalize_name(requirement.name)
    found = collect(fetcher, project, sources.indexes, sources.find_links)
    failures = [failure.result(pins) for failure in found.failures]
    verdict = _judge(pin, requirement, found.candidates, target, where)
    if verdict.ok:
        return [verdict, *failures]
    if failures:
        return failures  # a source we could not read may well hold it
    if found.unchecked:
        unchecked = ", ".join(found.unchecked)
        return [PreflightResult(pins, True, f"{pin} {requirement_text}: not checked in {unchecked} (not http)")]
    if not found.candidates:
        similar = nearest_names(project, {*found.other_projects, *index_projects(fetcher, sources.indexes)})
        hint = f"; similar: {', '.join(similar)}" if similar else ""
        fix = ""
        if similar:
            requirement.name = similar[0]
            fix = f"--set {pin}={requirement}"
        message = f"{pin} {requirement_text}: the index has no project {project} ({where}){hint}"
        return [PreflightResult(pins, False, message, fix, where)]
    return [verdict]


def _judge(
    pin: str, requirement: Requirement, candidates: list[Candidate], target: Target, where: str
) -> PreflightResult:
    """The best installable file, or a failure that says what does exist."""
    pins = (pin,)
    shown = str(requirement)
    specifier = requirement.specifier
    matching = [item for item in candidates if specifier.contains(item.version, prereleases=True)]
    accepted = target.accepted_tags()
    installable = [
        item for item in matching if (not item.is_wheel or item.tags & accepted) and item.runs_on(target.python_version)
    ]
    if installable:
        best = max(installable, key=lambda item: (item.version, item.is_wheel))
        return PreflightResult(pins, True, f"{pin} {shown}: {best.filename} in {best.source}", source=best.source)
    if not candidates:
        return PreflightResult(pins, False, f"{pin} {shown}: not found in {where}", source=where)

    if not matching:
        target_version = _specifier_target(specifier)
        releases = [str(v) for v in nearest_versions(target_version, (item.version for item in candidates))]
        order = " (nearest first)" if target_version else " (newest first)"
        fixed = Requirement(shown)
        fixed.specifier = SpecifierSet(f"=={releases[0]}")
        return PreflightResult(
            pins,
            False,
            f"{pin} {shown}: no release matches {specifier} in {where}; releases: {', '.join(releases)}{order}",
            f"pin an existing release: --set {pin}={fixed}",
            where,
        )

    runnable = [item for item in matching if item.runs_on(target.python_version)]
    if not runnable:
        needs = sorted({item.requires_python for item in matching})
        return PreflightResult(
            pins,
            False,
            f"{pin} {shown}: every matching file needs Python {' or '.join(needs)}, the image has "
            f"{target.python_version} ({where})",
            "pin a release that supports the image's python_version",
            where,
        )
    platform_words = f"linux {target.arch}"
    # what is left are wheels whose tags do not fit (an sdist or a fitting wheel would be installable)
    fitting_platform = [item for item in runnable if _fits_platform(item, target)]
    if fitting_platform:
        interpreters = _nearest_interpreters(
            target, {tag.interpreter for item in fitting_platform for tag in item.tags}
        )
        fix = f"pin a release built for {target.python_tag}"
        if interpreters and re.fullmatch(r"cp3\d+", interpreters[0]):
            fix += f", or the image's Python: --set python_version=3.{interpreters[0][3:]}"
        return PreflightResult(
            pins,
            False,
            f"{pin} {shown} has no {target.python_tag} wheel for {platform_words} in {where}; "
            f"{', '.join(interpreters)} exist{'s' if len(interpreters) == 1 else ''}",
            fix,
            where,
        )
    offered = sorted({tag.platform for item in runnable for tag in item.tags})
    return PreflightResult(
        pins,
        False,
        f"{pin} {shown} has no wheel for {platform_words} in {where}; platforms: {', '.join(offered[:SHOWN])}",
        f"pin a variant with linux {target.arch} wheels, or build on a host of another architecture",
        where,
    )


def _fits_platform(candidate: Candidate, target: Target) -> bool:
    platforms = {*target.platforms, "any"}
    return any(tag.platform in platforms for tag in candidate.tags)


def _nearest_interpreters(target: Target, interpreters: set[str]) -> list[str]:
    def distance(name: str) -> tuple[int, int]:
        match = re.fullmatch(r"cp3(\d+)", name)
        if not match:
            return (1, 0)
        return (0, abs(int(match.group(1)) - target.python[1]) * 2 + (int(match.group(1)) < target.python[1]))

    return sorted(sorted(interpreters, reverse=True), key=distance)[:SHOWN]


def _specifier_target(specifier: SpecifierSet) -> Version | None:
    """The version a specifier aims at ('==0.20.1' -> 0.20.1), to order the releases around it."""
    for item in specifier:
        if item.operator in {"==", "===", "~=", ">=", "<=", ">", "<"}:
            version = _as_version(item.version.removesuffix(".*"))
            if version is not None:
                return version
    return None
