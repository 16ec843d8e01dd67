"""Publish a finished bundle to a Hugging Face model repository, laid out as WebLLM's prebuilt
`<Model>-<quant>-MLC` repositories are: the weights folder's files at the root, the model library
beside them under WebLLM's own naming (`<Model>-<quant>_cs1k-webgpu.wasm`, web-llm src/config.ts
prebuiltAppConfig), a model card, and the ready WebLLM `model_list` entry (webllm-model-record.json)
whose URLs are absolute, so that anyone's WebLLM app loads the model by adding that entry.

The bundle (OUT, written by llm2wasm.image.convert.bundle) is read as files, not through the
converter's modules: app-config.json, lib/<model_id>.wasm, model/resolve/main/ (mlc-chat-config.json,
tensor-cache.json or the older ndarray-cache.json, params_shard_*.bin, tokenizer files), and
source.json when the model came from the Hub (llm2wasm.host.hubfetch). OUT/.llm2wasm (state, logs)
and the bundle's own README.md (how to serve the folder) are never uploaded.

Upload goes through `HfApi.create_commit`: the client asks the Hub which files it already holds
(preupload's `oid`, the LFS batch's missing `actions`) and sends only the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from llm2wasm.errors import UsageError
from llm2wasm.host.hubfetch import public_endpoint  # (it goes into published URLs)

APP_CONFIG = "app-config.json"
WEIGHTS = Path("model") / "resolve" / "main"
STATE_DIR = ".llm2wasm"
SOURCE_FILE = "source.json"
RECORD_FILE = "webllm-model-record.json"
CARD_FILE = "README.md"
TENSOR_CACHES = ("tensor-cache.json", "ndarray-cache.json")  # WebLLM reads either
WASM_MAGIC = b"\0asm"
F16_QUANTIZATION = re.compile(r"q\d+f16")  # q0f16, q4f16_1, ...: shaders use 16-bit floats
QUANTIZATION_IN_NAME = re.compile(r"q\d+f\d+(?:_\d+)?")
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# What the published entry keeps of the bundle's ModelRecord (web-llm src/config.ts), URLs aside.
RECORD_FIELDS = ("vram_required_MB", "low_resource_required", "buffer_size_required_bytes", "model_type", "overrides")
VERSION_LABELS = {
    "llm2wasm": "llm2wasm",
    "mlc_llm": "mlc-llm",
    "tvm": "TVM",
    "web_runtime": "web runtimes built from",
    "emscripten": "emscripten (emsdk)",
    "webllm": "WebLLM (tested with)",
}


@dataclass(frozen=True)
class Bundle:
    folder: Path
    record: dict  # the bundle's own ModelRecord (its URLs point where the bundle was meant to be served)
    chat_config: dict  # mlc-chat-config.json
    weights: dict[str, Path]  # file name -> file, the weights folder's files
    library: Path  # lib/<model_id>.wasm

    @property
    def model_id(self) -> str:
        return self.record["model_id"]

    @property
    def quantization(self) -> str:
        named, found = self.chat_config.get("quantization"), QUANTIZATION_IN_NAME.search(self.model_id)
        return named if isinstance(named, str) and named else found.group(0) if found else "unknown"


@dataclass(frozen=True)
class Upload:
    path_in_repo: str
    size: int
    status: str  # "new", "changed" or "unchanged" (already on the Hub with the same content)
    source: Path | None = None  # a bundle file
    content: bytes | None = None  # or made here (model card, record, provenance)


@dataclass(frozen=True)
class PublishResult:
    repo_id: str
    revision: str
    record: dict  # the published WebLLM ModelRecord, absolute URLs
    uploads: tuple[Upload, ...]
    commit: str | None  # None on a dry run

    @property
    def url(self) -> str:
        return self.record["model"]


def _refuse(bundle: Path, problem: str) -> UsageError:
    return UsageError(f"{bundle} is not a complete bundle: {problem}. Convert it again (or pick the right folder)")


def _regular(bundle: Path, path: Path, what: str) -> Path:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise _refuse(bundle, f"{path.relative_to(bundle)} is missing ({what})") from None
    if not stat.S_ISREG(mode):
        raise _refuse(bundle, f"{path.relative_to(bundle)} is not a regular file ({what})")
    return path


def _read_json(bundle: Path, path: Path, what: str) -> dict:
    try:
        value = json.loads(_regular(bundle, path, what).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise _refuse(bundle, f"{path.relative_to(bundle)} is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise _refuse(bundle, f"{path.relative_to(bundle)} is not a JSON object ({what})")
    return value


def read_bundle(folder: Path) -> Bundle:
    """The bundle in `folder`, checked complete (app config, wasm library, configs, every shard the
    tensor cache names at its size) and free of symlinks; a UsageError naming what is wrong."""
    bundle = Path(folder)
    if not bundle.is_dir():
        raise UsageError(f"{bundle} is not a folder: give the output folder of a conversion")
    for parent, folders, files in os.walk(bundle):
        if Path(parent) == bundle and STATE_DIR in folders:
            folders.remove(STATE_DIR)  # the converter's own state: never published, never read
        for name in folders + files:
            if (Path(parent) / name).is_symlink():
                link = (Path(parent) / name).relative_to(bundle)
                raise UsageError(f"{bundle}: {link} is a symbolic link; a published bundle holds regular files only")
    app_config = _read_json(bundle, bundle / APP_CONFIG, "the WebLLM app config")
    models = app_config.get("model_list")
    if not isinstance(models, list) or len(models) != 1 or not isinstance(models[0], dict):
        raise _refuse(bundle, f"{APP_CONFIG} does not list exactly one model")
    record = models[0]
    model_id = record.get("model_id")
    if not isinstance(model_id, str) or not MODEL_ID.fullmatch(model_id):
        raise _refuse(bundle, f"{APP_CONFIG} names no valid model_id ({model_id!r})")
    library = _regular(bundle, bundle / "lib" / f"{model_id}.wasm", "the model library")
    with open(library, "rb") as handle:
        if handle.read(len(WASM_MAGIC)) != WASM_MAGIC:
            raise _refuse(bundle, f"lib/{model_id}.wasm is not a wasm module")
    weights_folder = bundle / WEIGHTS
    if not weights_folder.is_dir():
        raise _refuse(bundle, f"{WEIGHTS}/ is missing (the weights)")
    chat_config = _read_json(bundle, weights_folder / "mlc-chat-config.json", "the model's chat config")
    cache_name = next((name for name in TENSOR_CACHES if (weights_folder / name).exists()), None)
    if cache_name is None:
        raise _refuse(bundle, f"{WEIGHTS}/ has no {' or '.join(TENSOR_CACHES)}")
    records = _read_json(bundle, weights_folder / cache_name, "the tensor cache").get("records")
    if not isinstance(records, list) or not records:
        raise _refuse(bundle, f"{WEIGHTS / cache_name} lists no shards")
    for shard in records:
        name = shard.get("dataPath") if isinstance(shard, dict) else None
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise _refuse(bundle, f"{WEIGHTS / cache_name} lists {name!r}, not a file of its folder")
        size = _regular(bundle, weights_folder / name, f"a shard {cache_name} lists").stat().st_size
        if isinstance(shard.get("nbytes"), int) and size != shard["nbytes"]:
            raise _refuse(bundle, f"{WEIGHTS / name} holds {size} bytes, {cache_name} says {shard['nbytes']}")
    weights = {}
    for entry in sorted(weights_folder.iterdir()):
        if entry.is_dir():
            raise _refuse(bundle, f"{WEIGHTS}/ holds a folder, {entry.name}/")
        if not entry.name.startswith("."):  # a converter's leftover temporary, not a bundle file
            weights[entry.name] = _regular(bundle, entry, "a weights file")
    return Bundle(bundle, record, chat_config, weights, library)


def wasm_file_name(model_id: str, quantization: str, prefill_chunk_size: object) -> str:
    """The library's name in the repository, after WebLLM's prebuilt ones: the model id without
    `-MLC`, its quantization, `_cs<prefill chunk>` (1024 -> 1k), `-webgpu.wasm`."""
    base = model_id.removesuffix("-MLC")
    if quantization not in base:
        base = f"{base}-{quantization}"
    if isinstance(prefill_chunk_size, int) and prefill_chunk_size > 0:
        chunk = f"{prefill_chunk_size // 1024}k" if prefill_chunk_size % 1024 == 0 else str(prefill_chunk_size)
        base = f"{base}_cs{chunk}"
    return f"{base}-webgpu.wasm"


def published_record(bundle: Bundle, repo_id: str, endpoint: str, revision: str, library_name: str) -> dict:
    """The bundle's ModelRecord with absolute URLs into the repository (`model` ends in
    /resolve/<revision>/, which WebLLM uses as it is) and shader-f16 required for f16 quantizations."""
    base = f"{public_endpoint(endpoint)}/{repo_id}/resolve/{quote(revision, safe='')}/"
    record = {"model": base, "model_id": bundle.model_id, "model_lib": base + library_name}
    record.update({key: bundle.record[key] for key in RECORD_FIELDS if bundle.record.get(key) is not None})
    features = [feature for feature in bundle.record.get("required_features") or [] if isinstance(feature, str)]
    if F16_QUANTIZATION.match(bundle.quantization) and "shader-f16" not in features:
        features.append("shader-f16")
    if features:
        record["required_features"] = features
    return record


def _yaml_scalar(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", value) else json.dumps(value)


def model_card(
    bundle: Bundle, record: dict, versions: Mapping[str, str], source: Mapping | None, license: str | None
) -> str:
    """README.md of the repository: Hub metadata (front matter), how to load it, how it was made."""
    base_model = source.get("repo_id") if source else None
    meta = ["library_name: mlc-llm"]
    # a PEFT adapter merged in before quantizing: no longer a quantization of the base model alone
    merged = bool(source and source.get("adapter_merged"))
    relation = "finetune" if merged else "quantized"
    if base_model:
        meta += [f"base_model: {_yaml_scalar(base_model)}", f"base_model_relation: {relation}"]
    if license:
        meta.append(f"license: {_yaml_scalar(license)}")
    meta += ["tags:", "- mlc-llm", "- web-llm", f"- {_yaml_scalar(bundle.quantization)}"]
    origin = "a model converted by llm2wasm"
    if base_model:
        commit = (source or {}).get("commit")
        at = f" (commit `{commit}`)" if isinstance(commit, str) else ""
        origin = f"[{base_model}]({source.get('endpoint') or 'https://huggingface.co'}/{base_model}){at}"
        origin += " with a PEFT adapter merged in" if merged else ""
    f16 = (
        "\nIt needs the browser's `shader-f16` WebGPU feature (`required_features`).\n"
        if "shader-f16" in record.get("required_features", [])
        else ""
    )
    rows = [f"| {VERSION_LABELS.get(key, key)} | `{value}` |" for key, value in versions.items() if value]
    made_with = "\n".join(["| part | version |", "| --- | --- |", *rows]) if rows else "(versions not recorded)"
    return f"""---
{chr(10).join(meta)}
---

# {bundle.model_id}

{origin}, quantized to `{bundle.quantization}` in MLC format for [WebLLM](https://github.com/mlc-ai/web-llm):
the weights (`tensor-cache.json`, `params_shard_*.bin`), `mlc-chat-config.json`, the tokenizer and the
WebGPU model library `{record["model_lib"].rsplit("/", 1)[-1]}`.
{f16}
## Use it in WebLLM

Add its `model_list` entry (also in [`{RECORD_FILE}`]({record["model"]}{RECORD_FILE})) to your app config:

```js
import {{ CreateMLCEngine, prebuiltAppConfig }} from "@mlc-ai/web-llm";
const record = await (await fetch("{record["model"]}{RECORD_FILE}")).json();
const appConfig = {{ ...prebuiltAppConfig, model_list: [...prebuiltAppConfig.model_list, record] }};
const engine = await CreateMLCEngine(record.model_id, {{ appConfig }});
```

```json
{json.dumps(record, indent=2)}
```

## How it was made

{made_with}

The model library must match the WebLLM runtime that loads it (the same mlc-llm/TVM web runtime):
with another WebLLM version, loading can fail with `LinkError` or "Cannot find global function".
"""


def _file_hash(source: Path | None, content: bytes | None, kind: str) -> str:
    """sha256 (what the Hub keys LFS files by) or the git blob id (regular files) of a file or bytes."""
    size = len(content) if content is not None else source.stat().st_size
    digest = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % size)
    if content is not None:
        digest.update(content)
    else:
        with open(source, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _status(remote, source: Path | None, content: bytes | None) -> str:
    if remote is None:
        return "new"
    kind, expected = ("sha256", remote.lfs.sha256) if remote.lfs is not None else ("git", remote.blob_id)
    return "unchanged" if _file_hash(source, content, kind) == expected else "changed"


def describe(uploads: tuple[Upload, ...], repo_id: str, dry_run: bool) -> str:
    """What a publish sends (or would send), a line per file, and what the Hub already holds."""
    lines = [f"{'would publish' if dry_run else 'publishing'} to {repo_id}:"]
    lines += [f"  {u.status:<9} {u.size / 2**20:>10.2f} MiB  {u.path_in_repo}" for u in uploads]
    sent = [u for u in uploads if u.status != "unchanged"]
    lines.append(
        f"{len(sent)} file(s), {sum(u.size for u in sent) / 2**20:.2f} MiB to send; "
        f"{len(uploads) - len(sent)} already on the Hub with the same content (not sent again)"
    )
    return "\n".join(lines)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("it must be namespace/name (your user name or an organization, then a name)")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"{repo_id!r} is not a repository id to publish to: {error}") from None


def publish_bundle(
    bundle_folder: Path,
    repo_id: str,
    *,
    versions: Mapping[str, str] | None = None,
    revision: str = "main",
    token: str | None = None,
    endpoint: str | None = None,
    private: bool | None = None,
    license: str | None = None,
    source: Mapping | None = None,
    dry_run: bool = False,
    commit_message: str | None = None,
) -> PublishResult:
    """Publish the bundle in `bundle_folder` to the model repository `repo_id` (created when missing)
    in one commit on `revision`; with `dry_run`, only say what would be sent. `versions`: what made
    it (llm2wasm, mlc_llm, tvm, emscripten, webllm), for the model card; `source`: the provenance
    record (default: the bundle's source.json). The token: the argument, else HF_TOKEN or the stored login."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    check_repo_id(repo_id)
    bundle = read_bundle(bundle_folder)
    if source is None and (bundle.folder / SOURCE_FILE).exists():
        source = _read_json(bundle.folder, bundle.folder / SOURCE_FILE, "the model's provenance")
    license = license or (source or {}).get("license")
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    library = wasm_file_name(bundle.model_id, bundle.quantization, bundle.chat_config.get("prefill_chunk_size"))
    record = published_record(bundle, repo_id, endpoint, revision, library)
    made: dict[str, bytes] = {
        CARD_FILE: model_card(bundle, record, versions or {}, source, license).encode(),
        RECORD_FILE: (json.dumps(record, indent=2) + "\n").encode(),
    }
    if source:
        made[SOURCE_FILE] = (json.dumps(dict(source), indent=2) + "\n").encode()
    files: dict[str, tuple[Path | None, bytes | None]] = {name: (path, None) for name, path in bundle.weights.items()}
    for name, value in [(library, (bundle.library, None)), *((n, (None, c)) for n, c in made.items())]:
        if name in files:
            raise _refuse(bundle.folder, f"{WEIGHTS}/{name} would collide with the {name} publishing adds")
        files[name] = value
    api = HfApi(endpoint=endpoint, token=token)
    with _explained(repo_id, revision, endpoint):
        remote = _remote_files(api, repo_id, revision)
        uploads = tuple(
            Upload(name, len(content) if content is not None else path.stat().st_size,
                   _status(remote.get(name), path, content), path, content)
            for name, (path, content) in files.items()
        )  # fmt: skip
        print(describe(uploads, repo_id, dry_run), flush=True)
        if dry_run:
            return PublishResult(repo_id, revision, record, uploads, None)
        api.create_repo(repo_id, exist_ok=True, private=private)
        # Every file goes to the client, which asks the Hub what it already holds and sends the rest.
        operations = [CommitOperationAdd(u.path_in_repo, u.source or u.content) for u in uploads]
        message = commit_message or f"Publish {bundle.model_id} ({bundle.quantization}) for WebLLM"
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    return PublishResult(repo_id, revision, record, uploads, info.oid)


def _remote_files(api, repo_id: str, revision: str) -> dict:
    """path -> RepoFile of what `revision` of the repository holds; empty for a repository not there yet."""
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        tree = api.list_repo_tree(repo_id, recursive=True, revision=revision)
        return {entry.path: entry for entry in tree if isinstance(entry, RepoFile)}
    except RepositoryNotFoundError:  # (a private repository of someone else's reads the same)
        return {}


@contextmanager
def _explained(repo_id: str, revision: str, endpoint: str) -> Iterator[None]:
    """The client's errors while publishing, as UsageErrors naming the fix (never the token)."""
    import httpx2
    from huggingface_hub import errors

    hub, login = public_endpoint(endpoint), "log in with `hf auth login` (a token with write access) or set HF_TOKEN"
    try:
        yield
    except (httpx2.TransportError, errors.OfflineModeIsEnabled) as error:
        raise UsageError(f"cannot reach the Hub at {hub} to publish ({error}): check the network") from None
    except errors.RevisionNotFoundError:
        raise UsageError(f"{repo_id} has no branch {revision!r}: publish to main, or create the branch first") from None
    except errors.HfHubHTTPError as error:
        status = error.response.status_code
        if status == 401 or isinstance(error, errors.RepositoryNotFoundError):
            raise UsageError(f"publishing to {repo_id} on {hub} needs a valid login: {login}") from None
        if status == 403:
            raise UsageError(
                f"the token in use cannot write to {repo_id}: use one of {repo_id.split('/')[0]} (or of a member "
                f"of that organization) with write access; {login}"
            ) from None
        raise UsageError(f"{hub} answered {status} while publishing {repo_id}: try again") from None
