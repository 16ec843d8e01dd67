"""Publish verified images. Tags come from what is inside the image, never typed by hand
(docker-stacks' habit): the profile, python-X.Y, mlc-llm-VERSION, emsdk-VERSION, the commit, the date."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from llm2wasm.errors import UsageError
from llm2wasm.host import docker
from llm2wasm.host.checks import emcc_version
from llm2wasm.host.layers import FINAL_LAYER
from llm2wasm.host.pins import Profile
from llm2wasm.host.state import VerifiedImages, checks_digest

FACTS_SCRIPT = r"""
import importlib.metadata, json, platform, subprocess
facts = {"python": platform.python_version()}
for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name.startswith("mlc-llm"):
        facts["mlc_llm"] = dist.version
out = subprocess.run(["emcc", "--version"], capture_output=True, text=True).stdout.splitlines()
facts["emcc"] = out[0] if out else ""
print(json.dumps(facts))
"""


@dataclass(frozen=True)
class ImageFacts:
    python: str
    mlc_llm: str | None
    emsdk: str | None


def read_facts(image: str) -> ImageFacts:
    data = json.loads(docker.run_script(image, FACTS_SCRIPT).strip().splitlines()[-1])
    return ImageFacts(python=data["python"], mlc_llm=data.get("mlc_llm"), emsdk=emcc_version(data.get("emcc", "")))


def safe_tag(text: str) -> str:
    """Docker tags: [A-Za-z0-9_.-], at most 128 characters; '+' of local versions becomes '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:128]


def tags_for(facts: ImageFacts, profile: str, revision: str, date: str) -> list[str]:
    python_minor = ".".join(facts.python.split(".")[:2])
    tags = [profile, f"{profile}-python-{python_minor}", f"{profile}-{date}"]
    if revision and revision != "unknown":
        tags.append(f"{profile}-{revision[:12]}")
    if facts.mlc_llm:
        tags.append(f"{profile}-mlc-llm-{facts.mlc_llm}")
    if facts.emsdk:
        tags.append(f"{profile}-emsdk-{facts.emsdk}")
    return [safe_tag(tag) for tag in tags]


def publish(
    profile: Profile,
    target_repository: str,
    *,
    local_repository: str = "llm2wasm",
    revision: str,
    date: str,
    push: bool = True,
) -> list[str]:
    """Tag (and push) the verified final image. Refuses an image whose checks did not pass."""
    source = f"{local_repository}:{FINAL_LAYER}-{profile.name}"
    image_id = docker.image_id(source)
    if image_id is None:
        raise UsageError(f"{source} not found: build it with `invoke build --profile {profile.name}`")
    if not VerifiedImages(profile.name).is_verified(FINAL_LAYER, image_id, checks_digest(FINAL_LAYER, profile)):
        raise UsageError(
            f"{source} ({image_id[:19]}) has not passed its checks with the current pins and checks: "
            f"run `invoke build --profile {profile.name}` (it verifies each layer) before publishing"
        )
    refs = [f"{target_repository}:{tag}" for tag in tags_for(read_facts(source), profile.name, revision, date)]
    for ref in refs:
        docker.tag(image_id, ref)
        if push:
            result = docker.run(["push", ref], check=False)
            if result.returncode != 0:
                raise UsageError(f"docker push {ref} failed (logged in to the registry?):\n{result.stderr.strip()}")
    return refs
