"""`invoke publish-bundle`: a finished bundle to a Hub model repository, and what to tell the user.

The publishing itself is llm2wasm.host.hubpublish; here is what the task adds: the versions of the
tools that made the bundle, for the model card, read from what the conversion recorded
(OUT/.llm2wasm/state.json: each finished step's tools) and the WebLLM version the image's preview
runs (images/pins.toml: the bundle does not record it); the refusal of a publish without any token
before anything is read or hashed; and the ready `model_list` entry, printed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.host import hubpublish
from llm2wasm.host.hubfetch import public_endpoint

STATE_FILE = Path(hubpublish.STATE_DIR) / "state.json"
# The steps whose tool records are read, the later one winning: compile ran the most tools.
RECORDED_STEPS = ("merge", "gen_config", "convert_weight", "compile")
# What the card shows of a step's tools (llm2wasm.image.convert.toolchain's names), in this order.
CARD_TOOLS = {"llm2wasm": "llm2wasm", "mlc_llm": "mlc_llm", "tvm": "tvm", "web_runtime": "web_runtime",
              "emcc": "emscripten"}  # fmt: skip
ABSENT = "absent"  # llm2wasm.image.convert.toolchain.ABSENT: a tool the image did not have


def bundle_versions(bundle: Path, webllm_version: str | None = None) -> dict[str, str]:
    """What made the bundle in `bundle`, by the card's names: the tools its conversion recorded, and
    the WebLLM version given (the one its preview ran). Empty where the bundle recorded nothing."""
    tools: dict[str, str] = {}
    try:
        state = json.loads((Path(bundle) / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = {}
    steps = state.get("steps") if isinstance(state, dict) else None
    for step in RECORDED_STEPS:
        record = steps.get(step) if isinstance(steps, dict) else None
        recorded = record.get("tools") if isinstance(record, dict) else None
        if isinstance(recorded, dict):
            tools.update({name: value for name, value in recorded.items() if isinstance(value, str)})
    if not tools and isinstance(state, dict) and isinstance(state.get("llm2wasm"), str):
        tools["llm2wasm"] = state["llm2wasm"]  # an older state file: the version of llm2wasm only
    versions = {card: tools[tool] for tool, card in CARD_TOOLS.items() if tools.get(tool) not in (None, "", ABSENT)}
    if webllm_version:
        versions["webllm"] = webllm_version
    return versions


def require_token(token: str | None) -> None:
    """A publish sends with a token: without any, say how to get one before a file is hashed."""
    from huggingface_hub import get_token

    if token is None and get_token() is None:
        raise UsageError(
            "publishing needs a Hugging Face token with write access: log in with `hf auth login`, or set "
            "HF_TOKEN (https://huggingface.co/settings/tokens); --dry-run shows what would be sent without one"
        )


def publish_command(
    bundle: Path,
    repo_id: str,
    *,
    webllm_version: str | None = None,
    revision: str = "main",
    dry_run: bool = False,
    private: bool | None = None,
    endpoint: str | None = None,
    license: str | None = None,
    token: str | None = None,
) -> hubpublish.PublishResult:
    """Publish (or with `dry_run`, show) the bundle; print the files and the model_list entry."""
    from huggingface_hub import constants

    hubpublish.check_repo_id(repo_id)
    if not dry_run:
        require_token(token)
    result = hubpublish.publish_bundle(
        Path(bundle),
        repo_id,
        versions=bundle_versions(Path(bundle), webllm_version),
        revision=revision,
        token=token,
        endpoint=endpoint,
        private=private,
        license=license,
        dry_run=dry_run,
    )
    print(summary(result, public_endpoint(endpoint or constants.ENDPOINT), dry_run))
    return result


def summary(result: hubpublish.PublishResult, hub: str, dry_run: bool) -> str:
    """Where the model is (or would be), and the entry to paste into a WebLLM app's model_list."""
    record_url = result.record["model"] + hubpublish.RECORD_FILE
    sent = [upload for upload in result.uploads if upload.status != "unchanged"]
    if dry_run:
        head = f"dry run: nothing sent. Published, the entry would be at {record_url}"
    elif not sent:
        head = f"{hub}/{result.repo_id} already holds this bundle (commit {result.commit}): nothing sent"
    else:
        head = f"published {len(sent)} file(s) to {hub}/{result.repo_id} (commit {result.commit})"
    return "\n".join(
        [
            head,
            f"model_list entry ({record_url}); add it to your WebLLM app config (docs/HUB.md):",
            json.dumps(result.record, indent=2),
        ]
    )


def webllm_version_of(pins: Mapping) -> str | None:
    version = pins.get("webllm_version")
    return str(version) if version else None
