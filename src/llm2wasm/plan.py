"""The build plan: which images, from which Dockerfiles, with which build arguments."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .layers import Layer, image_arg, layers_until
from .pins import PROJECT_ROOT, Profile

DERIVED = "<derived at build time from the {} image>"


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
    profile: Profile, *, until: str | None = None, repository: str = "llm2wasm", images_dir: Path | None = None
) -> BuildPlan:
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
    return BuildPlan(profile=profile, repository=repository, context=PROJECT_ROOT, steps=steps)
