"""The bundle's app config: checked, with every file it names, before the server takes its port, and
served with its base URL replaced by the server's public one (nothing in the bundle is rewritten on
disk). Apart from the handler, which serves the config that check_bundle returned.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.image.preview.bundlefiles import is_regular, read_regular


def check_bundle(out: Path) -> dict:
    """The bundle's app config, after checking that everything it names is there, as the server
    will serve it: regular files, no symlinks, nothing hidden or outside (exit 2 otherwise)."""
    if not out.is_dir():
        raise UsageError(f"{out} is not a folder: pass the output folder of `llm2wasm convert`")
    config_path = out / "app-config.json"
    if not is_regular(out, "app-config.json"):
        raise UsageError(f"{config_path} not found: {out} is not a bundle made by `llm2wasm convert`")
    try:
        config = json.loads(read_regular(out, "app-config.json"))
        record = config["model_list"][0]
        base = bundle_base(record)
        lib_path, model_path = record["model_lib"][len(base) :], record["model"][len(base) :]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise UsageError(f"{config_path} is not a WebLLM app config with one model ({exc}): convert again") from None
    if not is_regular(out, lib_path):
        raise UsageError(f"{out / lib_path} not found: the app config names it as the model library (model_lib)")
    weights = f"{model_path.rstrip('/')}/resolve/main"
    for name in ("mlc-chat-config.json", "tensor-cache.json"):
        if not is_regular(out, f"{weights}/{name}"):
            raise UsageError(f"{out / weights / name} not found: WebLLM fetches it for model {record['model_id']!r}")
    try:
        cache = json.loads(read_regular(out, f"{weights}/tensor-cache.json"))
        shards = [shard["dataPath"] for shard in cache.get("records", [])]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as exc:
        cache_path = out / weights / "tensor-cache.json"
        raise UsageError(f"{cache_path} is not a tensor cache ({exc}): convert again") from None
    for shard in shards:
        if not isinstance(shard, str) or not is_regular(out, f"{weights}/{shard}"):
            raise UsageError(f"{out / weights / str(shard)} not found: tensor-cache.json lists it")
    return config


def bundle_base(record: dict) -> str:
    """The base URL the bundle was made for: what model_lib and model share before lib/ and model/."""
    lib = record["model_lib"]
    marker = lib.rfind("/lib/")
    if marker < 0 or not record["model"].startswith(lib[: marker + 1]):
        raise ValueError("model_lib and model do not share a base URL")
    return lib[: marker + 1]


def served_config(config: dict, served_base: str) -> tuple[dict, str]:
    """The app config with its base replaced by the one the page is served from."""
    served = json.loads(json.dumps(config))
    original = bundle_base(served["model_list"][0])
    for record in served["model_list"]:
        for key in ("model", "model_lib"):
            if record[key].startswith(original):
                record[key] = served_base + record[key][len(original) :]
    return served, original
