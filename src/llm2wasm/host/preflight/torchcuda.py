"""Preflight of one CUDA major for a CUDA profile: torch's wheel (its Requires-Dist, read from the
index's PEP 658 metadata, else its local version label) must bring the CUDA libraries of the major
the MLC wheels of the profile's ``variant`` are built for.

Apart from the requirement checks (llm2wasm.host.preflight.wheels): those ask whether a file exists,
this one what the file that pip would pick needs, and it runs only for CUDA profiles.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from llm2wasm.host.pins import Profile
from llm2wasm.host.preflight.fetching import Fetcher, PreflightResult, SourceFailed, _as_version
from llm2wasm.host.preflight.indexes import collect
from llm2wasm.host.preflight.pipinstall import PipSources, Target

_CUDA_SUFFIX = re.compile(r"^nvidia-.+-cu(\d+)$")
_LOCAL_CUDA = re.compile(r"^cu(\d+)(\d)$")  # +cu130 -> 13, +cu128 -> 12


def torch_cuda_major(requires_dist: Iterable[str], local_version: str | None) -> tuple[int | None, str]:
    """The CUDA major a torch wheel needs, from its Requires-Dist (Linux x86_64 markers), else its
    local version label; with the requirement or label it was read from. (None, why) for a CPU
    build or when nothing says."""
    environment = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64"}
    for line in requires_dist:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        suffix = _CUDA_SUFFIX.match(name)
        if suffix:
            return int(suffix.group(1)), line.split(";")[0].strip()
        if name in ("cuda-toolkit", "nvidia-cuda-runtime"):
            for spec in requirement.specifier:
                version = _as_version(spec.version.rstrip(".*"))
                if version is not None:
                    return version.major, line.split(";")[0].strip()
    label = _LOCAL_CUDA.match(local_version or "")
    if label:
        return int(label.group(1)), f"+{local_version}"
    if local_version and local_version.startswith(("cpu", "rocm")):
        return None, f"+{local_version} (no CUDA)"
    return None, "no CUDA requirement"


def _metadata_requirements(fetcher: Fetcher, wheel_url: str) -> list[str] | None:
    """Requires-Dist of a wheel from its index's PEP 658 metadata file, without the wheel itself."""
    if not wheel_url:
        return None
    try:
        page = fetcher.get(wheel_url.split("#", 1)[0] + ".metadata", {"Accept": "*/*"}, 2**20)
    except SourceFailed:
        return None
    if page.status != 200:
        return None
    return [line.split(":", 1)[1].strip() for line in page.text.splitlines() if line.startswith("Requires-Dist:")]


def check_cuda_major(fetcher: Fetcher, profile: Profile, sources: PipSources, target: Target) -> list[PreflightResult]:
    """torch, its nvidia-* libraries and the MLC wheels must share one CUDA major: the MLC CUDA
    wheels load libcudart/libcublas of their own major, which only torch's requirements install."""
    pins = ("torch_requirement", "variant")
    wanted = profile.cuda_major
    text = str(profile.get("torch_requirement") or "")
    if wanted is None or not text:
        return []
    try:
        requirement = Requirement(text)
    except InvalidRequirement:
        return []  # check_requirement says so
    found = collect(fetcher, canonicalize_name(requirement.name), sources.indexes, sources.find_links)
    accepted = target.accepted_tags()
    installable = [
        item
        for item in found.candidates
        if item.is_wheel
        and item.tags & accepted
        and item.runs_on(target.python_version)
        and requirement.specifier.contains(item.version, prereleases=True)
    ]
    if not installable:
        return []  # check_requirement names what is missing
    best = max(installable, key=lambda item: item.version)
    requires = _metadata_requirements(fetcher, best.url)
    major, evidence = torch_cuda_major(requires or [], best.version.local)
    variant = profile.get("variant")
    where = f"{text} ({best.filename}"
    where += ", its metadata)" if requires is not None else ")"
    if major == wanted:
        return [
            PreflightResult(pins, True, f"torch_requirement {where}: CUDA {major} ({evidence}), as variant {variant}")
        ]
    needs = f"CUDA {major} ({evidence})" if major is not None else f"no CUDA ({evidence})"
    return [
        PreflightResult(
            pins,
            False,
            f"torch_requirement {where} brings {needs}, but the MLC wheels of variant {variant} are built for "
            f"CUDA {wanted} and need its libraries",
            (
                f"one CUDA major throughout: --set variant=cu{major}0 with the mlc-ai/mlc-llm cu{major}0 "
                f"requirements, or a torch built for CUDA {wanted}"
                if major
                else f"a torch built for CUDA {wanted}, or the MLC CPU wheels (profile cpu)"
            ),
            best.source,
        )
    ]
