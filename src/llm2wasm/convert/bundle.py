"""Assemble the WebLLM bundle from the finished steps: weights folder, wasm, app config, README."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .inputs import ConvertRequest

# WebLLM appends this to a model URL that has no /resolve/<rev>/ (web-llm cleanModelUrl).
RESOLVE = Path("resolve") / "main"
LOW_RESOURCE_MB = 2048


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)  # no second copy of the weights on disk
    except OSError:
        shutil.copyfile(source, target)


def vram_required_mb(memory: dict, context_window: int) -> float | None:
    if "without_kv_cache_mb" in memory and "kv_cache_mb_per_token" in memory:
        return round(memory["without_kv_cache_mb"] + memory["kv_cache_mb_per_token"] * context_window, 2)
    return memory.get("with_4k_kv_cache_mb") or memory.get("without_kv_cache_mb")


def model_record(request: ConvertRequest, chat_config: dict, memory: dict) -> dict:
    """One WebLLM ModelRecord (web-llm src/config.ts)."""
    base = request.base_url
    record: dict = {
        "model": f"{base}model/",
        "model_id": request.model_id,
        "model_lib": f"{base}lib/{request.model_id}.wasm",
    }
    overrides = request.chat_overrides()
    if overrides:
        record["overrides"] = overrides
    vram = vram_required_mb(memory, int(chat_config.get("context_window_size") or 4096))
    if vram is not None:
        record["vram_required_MB"] = vram
        record["low_resource_required"] = vram <= LOW_RESOURCE_MB
    if request.needs_shader_f16:
        record["required_features"] = ["shader-f16"]
    return record


def write_bundle(request: ConvertRequest, work: Path, memory: dict) -> None:
    out = request.output
    model_dir = out / "model" / RESOLVE
    staging = out / "model.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    for folder in (work / "gen_config" / "config", work / "convert_weight" / "weights"):
        for entry in sorted(folder.iterdir()):
            link_or_copy(entry, staging / RESOLVE / entry.name)
    chat_config = json.loads((staging / RESOLVE / "mlc-chat-config.json").read_text())
    if (out / "model").exists():
        shutil.rmtree(out / "model")
    staging.replace(out / "model")
    link_or_copy(work / "compile" / f"{request.model_id}.wasm", out / "lib" / f"{request.model_id}.wasm")
    app_config = {"model_list": [model_record(request, chat_config, memory)]}
    tmp = out / "app-config.json.tmp"
    tmp.write_text(json.dumps(app_config, indent=2) + "\n")
    tmp.replace(out / "app-config.json")
    (out / "README.md").write_text(bundle_readme(request, model_dir.relative_to(out)))


def bundle_readme(request: ConvertRequest, model_path: Path) -> str:
    f16 = (
        "It uses 16-bit floats in shaders: WebLLM needs the browser's `shader-f16` WebGPU feature "
        "(`required_features` in the app config).\n"
        if request.needs_shader_f16
        else ""
    )
    return f"""# {request.model_id}: a WebLLM model bundle

Made by llm2wasm from `{request.model_dir.name}`{f" + adapter `{request.adapter.name}`" if request.adapter else ""}
({request.quantization}, conversation template `{request.conv_template}`). {f16}
- `{model_path}/`: weights (`tensor-cache.json`, `params_shard_*.bin`), `mlc-chat-config.json`, tokenizer
- `lib/{request.model_id}.wasm`: the WebGPU model library
- `app-config.json`: a WebLLM `AppConfig` with this model's record

## Serving it

The app config points at `{request.base_url}` (change it with `--base-url`). WebLLM needs
absolute URLs and **appends `resolve/main/` to a model URL that has no `/resolve/<rev>/`**; that is
why the weights sit in `model/resolve/main/`: serve this folder as it is and `{request.base_url}model/`
resolves to them. For a quick local test:

    cd {request.output.name} && python3 -m http.server 8000

Serve over HTTPS with CORS allowed for your app's origin in production. To host the weights on
Hugging Face instead, upload the contents of `{model_path}/` to a model repository and set `model`
to `https://huggingface.co/USER/REPO` (WebLLM adds `resolve/main/`).

## Loading it

```js
import {{ CreateMLCEngine }} from "@mlc-ai/web-llm";
const appConfig = await (await fetch("{request.base_url}app-config.json")).json();
const engine = await CreateMLCEngine("{request.model_id}", {{ appConfig }});
```

The `.wasm` must come from the same mlc-llm/TVM build as the WebLLM runtime that loads it: a
library from another commit fails with `LinkError` or "Cannot find global function".
"""
