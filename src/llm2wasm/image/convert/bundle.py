"""Assemble the WebLLM bundle from the finished steps: weights folder, wasm, app config, README.

A bundle is replaced by renames only, so that whatever moment the process is killed at, what is
in OUT is either the previous bundle or the new one, never a config naming files that are gone:
the new weights folder is staged beside the old one and swapped in, the library and README are
written under temporary names and renamed, and app-config.json, the mark of a complete bundle, is
removed before anything live changes and written last (`incomplete` checks a bundle for it).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.inputs import ConvertRequest
from llm2wasm.image.hostpaths import shown_name

# WebLLM appends this to a model URL that has no /resolve/<rev>/ (web-llm cleanModelUrl).
RESOLVE = Path("resolve") / "main"
WEIGHTS = Path("model") / RESOLVE  # the bundle's weights folder, relative to OUT
APP_CONFIG = "app-config.json"
LOW_RESOURCE_MB = 2048
WASM_MAGIC = b"\0asm"


def library_path(out: Path, model_id: str) -> Path:
    return out / "lib" / f"{model_id}.wasm"


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (or, across file systems, copy) one regular file. A symlink or anything else is
    refused: following one would put whatever it points at into a bundle that gets published."""
    mode = os.lstat(source).st_mode
    if not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise UsageError(
            f"{source} is {kind}: a bundle takes only regular files. Remove {source.parent} and convert again"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # unlink, not exists()+unlink: a dangling symlink at target would otherwise be written through
    target.unlink(missing_ok=True)
    try:
        os.link(source, target, follow_symlinks=False)  # no second copy of the weights on disk
    except OSError:
        shutil.copyfile(source, target, follow_symlinks=False)


def _remove(path: Path) -> None:
    """A leftover of an interrupted assembly: a folder tree, a file, or a symlink (not its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _write_new(path: Path, text: str) -> Path:
    """A new file at path: whatever is there (a leftover, or a symlink) is unlinked, never written through."""
    path.unlink(missing_ok=True)
    with open(path, "x") as handle:
        handle.write(text)
    return path


def _swap_in(new: Path, target: Path) -> None:
    """Put the folder `new` at `target` by renames (a folder cannot be renamed onto a non-empty
    one): the old one aside, the new one in, then the old one removed."""
    old = target.with_name(target.name + ".old")
    _remove(old)
    if target.is_symlink() or target.exists():
        target.rename(old)
    new.rename(target)
    _remove(old)


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
    staging = out / "model.tmp"
    _remove(staging)  # an interrupted assembly's
    # Everything new is staged first: a refused file stops here, with the previous bundle untouched.
    for folder in (work / "gen_config" / "config", work / "convert_weight" / "weights"):
        for entry in sorted(folder.iterdir()):
            link_or_copy(entry, staging / RESOLVE / entry.name)
    chat_config = json.loads((staging / RESOLVE / "mlc-chat-config.json").read_text())
    library = library_path(out, request.model_id)
    library_tmp = library.with_name(library.name + ".tmp")
    link_or_copy(work / "compile" / f"{request.model_id}.wasm", library_tmp)
    app_config = {"model_list": [model_record(request, chat_config, memory)]}
    config_tmp = _write_new(out / f"{APP_CONFIG}.tmp", json.dumps(app_config, indent=2) + "\n")
    readme_tmp = _write_new(out / "README.md.tmp", bundle_readme(request, WEIGHTS))
    # From here on the bundle is incomplete until the app config is back, and says so by its absence.
    (out / APP_CONFIG).unlink(missing_ok=True)
    _swap_in(staging, out / "model")
    library_tmp.replace(library)
    # rename() between two hard links of one file (a re-assembly of an unchanged library) does
    # nothing and leaves the temporary name behind
    library_tmp.unlink(missing_ok=True)
    readme_tmp.replace(out / "README.md")
    config_tmp.replace(out / APP_CONFIG)


def incomplete(out: Path, model_id: str) -> str | None:
    """What is missing from the bundle in `out` for model `model_id`, or None when it is complete:
    an app config naming the model, the library (a wasm module), the weights folder's configs and
    every shard tensor-cache.json lists, each of the size it says."""
    try:
        record = json.loads((out / APP_CONFIG).read_text())["model_list"][0]
        named = record["model_id"]
    except FileNotFoundError:
        return f"no {APP_CONFIG} (the conversion did not finish)"
    except (OSError, ValueError, LookupError, TypeError):
        return f"{APP_CONFIG} is not a WebLLM app config with one model"
    if named != model_id:
        return f"{APP_CONFIG} names model {named!r}, not {model_id!r}"
    library = library_path(out, model_id)
    try:
        with open(library, "rb") as handle:
            magic = handle.read(len(WASM_MAGIC))
    except OSError:
        return f"{library.relative_to(out)} is missing"
    if magic != WASM_MAGIC:
        return f"{library.relative_to(out)} is not a wasm module"
    weights = out / WEIGHTS
    for name in ("mlc-chat-config.json", "tensor-cache.json"):
        if not (weights / name).is_file():
            return f"{WEIGHTS / name} is missing"
    try:
        shards = json.loads((weights / "tensor-cache.json").read_text())["records"]
        paths = [shard["dataPath"] for shard in shards]
    except (OSError, ValueError, LookupError, TypeError):
        return f"{WEIGHTS / 'tensor-cache.json'} is not a tensor cache"
    for shard, name in zip(shards, paths, strict=True):
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{WEIGHTS / 'tensor-cache.json'} lists {name!r}, not a file of its folder"
        if not (weights / name).is_file():
            return f"{WEIGHTS / name} is missing (tensor-cache.json lists it)"
        size = (weights / name).stat().st_size
        if isinstance(shard.get("nbytes"), int) and size != shard["nbytes"]:
            return f"{WEIGHTS / name} holds {size} bytes, tensor-cache.json says {shard['nbytes']}"
    return None


def bundle_readme(request: ConvertRequest, model_path: Path) -> str:
    f16 = (
        "It uses 16-bit floats in shaders: WebLLM needs the browser's `shader-f16` WebGPU feature "
        "(`required_features` in the app config).\n"
        if request.needs_shader_f16
        else ""
    )
    source = f"`{shown_name(request.model_dir)}`"
    if request.adapter:
        source += f" + adapter `{shown_name(request.adapter)}`"
    return f"""# {request.model_id}: a WebLLM model bundle

Made by llm2wasm from {source}
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
