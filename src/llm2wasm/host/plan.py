"""The build plan: which images, from which Dockerfiles, with which build arguments.

Some build arguments carry what the preflight resolved a pin to (``Layer.resolved_args``): the commit
of ``emsdk_ref`` and of ``mlc_llm_ref`` (the Dockerfiles stop when the clone is at another commit, and
record it in a label), and the base image's manifest digest (the base layer is built ``FROM
NAME:TAG@sha256:...`` and labelled with it). A plan is made before the preflight with placeholders
there (what ``--dry-run`` prints); ``BuildPlan.with_resolved`` fills them in, with what the preflight
found or, under ``--no-preflight``, with nothing (then the build goes by tag and checks no commit)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from llm2wasm.host.layers import Layer, image_arg, layers_until
from llm2wasm.host.pins import PROJECT_ROOT, Profile

DERIVED = "<derived at build time from the {} image>"
PREFLIGHT_PENDING = "<resolved by the preflight at build time: the {} that pin {} names then{}>"
COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 and SHA-256 repositories


def pending_value(pin: str) -> str:
    """The placeholder of a build arg the preflight fills in (see PREFLIGHT_PENDING)."""
    if pin == "base_image":
        return PREFLIGHT_PENDING.format("manifest digest", pin, " (BASE_IMAGE becomes NAME:TAG@DIGEST)")
    return PREFLIGHT_PENDING.format("commit", pin, "")


@dataclass(frozen=True)
class Step:
    layer: Layer
    tag: str
    dockerfile: Path
    build_args: dict[str, str]
    # ARG -> pin key it came from (for the dry-run's "sources")
    sources: dict[str, str]
    network: str


@dataclass(frozen=True)
class BuildPlan:
    profile: Profile
    repository: str
    context: Path
    steps: list[Step]

    def with_resolved(self, resolved: Mapping[str, str]) -> BuildPlan:
        """The plan with the preflight's findings in place of the placeholders: each resolved arg gets
        what its pin resolved to ("" when unknown: --no-preflight, or a pin the preflight skips), and
        the base image is pulled by digest when its digest is known."""
        from llm2wasm.host.preflight.registry import pinned_by_digest

        steps = []
        for step in self.steps:
            args = dict(step.build_args)
            for arg, pin in step.layer.resolved_args.items():
                value = str(resolved.get(pin) or "").strip()
                if value and pin != "base_image" and not COMMIT.fullmatch(value):
                    raise ValueError(f"{pin} resolved to {value!r}, which is not a full commit id")
                args[arg] = value
            if step.layer.build_args.get("BASE_IMAGE") == "base_image":
                args["BASE_IMAGE"] = pinned_by_digest(
                    str(self.profile["base_image"]), str(resolved.get("base_image") or "")
                )
            steps.append(replace(step, build_args=args))
        return replace(self, steps=steps)

    def pending_args(self) -> list[str]:
        """'layer ARG' for each build arg still waiting for the preflight (with_resolved not applied)."""
        return [
            f"{step.layer.name} {arg}"
            for step in self.steps
            for arg, pin in step.layer.resolved_args.items()
            if step.build_args.get(arg) == pending_value(pin)
        ]

    def resolution_lines(self) -> list[str]:
        """What the build is pinned to beyond the pins themselves, one line per resolved build arg."""
        lines = []
        for step in self.steps:
            for arg, pin in step.layer.resolved_args.items():
                value = step.build_args.get(arg, "")
                if not value or value == pending_value(pin):
                    continue
                what = f"FROM {step.build_args['BASE_IMAGE']}" if pin == "base_image" else f"{arg}={value}"
                lines.append(f"{pin} {self.profile[pin]} is {value}: {step.layer.name} layer built with {what}")
        return lines

    def unpinned_note(self) -> str:
        """What a build without the preflight gives up, for the build output."""
        return (
            f"preflight skipped (--no-preflight): the base image is pulled by tag ({self.profile['base_image']}), "
            "not by digest, and the emsdk and mlc-llm clones are not checked against a commit; the layers' "
            "digest and commit labels stay empty"
        )

    def describe(self) -> str:
        lines = [f"profile {self.profile.name}: {self.profile.description}", f"context {self.context}", ""]
        for index, step in enumerate(self.steps, 1):
            built_from = f" (from {step.layer.parent}" if step.layer.parent else ""
            if step.layer.joins:
                built_from += f", joins {', '.join(step.layer.joins)}"
            built_from += ")" if built_from else ""
            lines.append(f"[{index}/{len(self.steps)}] {step.layer.name} -> {step.tag}{built_from}")
            dockerfile = step.dockerfile
            if dockerfile.is_relative_to(self.context):
                dockerfile = dockerfile.relative_to(self.context)
            lines.append(f"    dockerfile {dockerfile}")
            lines.append(f"    network    {step.network}")
            for key, value in step.build_args.items():
                source = step.sources.get(key)
                origin = f"  (pin {source})" if source else ""
                lines.append(f"    --build-arg {key}={value}{origin}")
            lines.append(f"    checks     {step.layer.check_module.relative_to(PROJECT_ROOT)} (and every parent's)")
        return "\n".join(lines)


def git_revision() -> tuple[str, str]:
    """The checkout's commit and commit date, for OCI labels (reproducible, unlike `now`)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "log", "-1", "--format=%H %cI"], capture_output=True, text=True, check=True
        ).stdout.split()
        return out[0], out[1]
    except (subprocess.CalledProcessError, IndexError, FileNotFoundError):
        return "unknown", "unknown"


def make_plan(
    profile: Profile,
    *,
    until: str | None = None,
    repository: str = "llm2wasm",
    images_dir: Path | None = None,
    resolved: Mapping[str, str] | None = None,
) -> BuildPlan:
    """The plan; with ``resolved`` (the preflight's findings, or {} for --no-preflight) filled in,
    without it with placeholders where they go (BuildPlan.with_resolved)."""
    images_dir = images_dir or PROJECT_ROOT / "images"
    steps: list[Step] = []
    revision, created = git_revision()

    def layer_tag(name: str) -> str:
        return next(step.tag for step in steps if step.layer.name == name)

    for layer in layers_until(until):
        args: dict[str, str] = {}
        sources: dict[str, str] = {}
        for arg, pin in layer.build_args.items():
            value = profile[pin]
            args[arg] = str(value).lower() if isinstance(value, bool) else str(value)
            sources[arg] = pin
        if layer.parent is not None:
            args["BASE_IMAGE"] = layer_tag(layer.parent)
            sources.pop("BASE_IMAGE", None)
        for joined in layer.joins:
            args[image_arg(joined)] = layer_tag(joined)
        for arg, source in layer.derived_args.items():
            args[arg] = DERIVED.format(source)
        for arg, pin in layer.resolved_args.items():
            args[arg] = pending_value(pin)
            sources[arg] = f"{pin}, via the preflight"
        if layer.name == "app":
            args["LLM2WASM_REVISION"] = revision
            args["LLM2WASM_CREATED"] = created
        steps.append(
            Step(
                layer=layer,
                tag=layer.tag(profile.name, repository),
                dockerfile=images_dir / layer.name / "Dockerfile",
                build_args=args,
                sources=sources,
                network=str(profile.get("build_network", "default")),
            )
        )
    plan = BuildPlan(profile=profile, repository=repository, context=PROJECT_ROOT, steps=steps)
    return plan if resolved is None else plan.with_resolved(resolved)
