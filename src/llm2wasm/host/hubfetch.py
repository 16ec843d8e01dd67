"""Fetch a model from the Hugging Face Hub: `org/name[@revision]` -> the files a conversion needs.

The files land in the standard Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub; or `cache_dir`)
through `huggingface_hub.snapshot_download`, so a second fetch of the same commit downloads nothing
and every other tool on the machine shares them. Only an allowlist is fetched: configs, tokenizer
files, safetensors weights (only the shards the index names, or the one model.safetensors), and for
a PEFT adapter its config and weights. Pickle weights (`pytorch_model*.bin`, `adapter_model.bin`)
only with `allow_pickle=True`, and only when the repository has no safetensors.

The token comes from the argument or from the client's own resolution (HF_TOKEN, then the stored
`hf auth login`); it goes only into the client's requests to the endpoint and is never shown. Every
failure the user can fix is a UsageError naming the fix. `provenance` / `write_provenance` record
where a model came from (source.json), for the bundle to carry and `hubpublish` to cite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.inputfiles import (
    SMALL_FILE_LIMIT,
    TOKENIZER_FILE_LIMIT,
    TOKENIZER_NAMES,
    WEIGHT_SUFFIXES,
)

CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SHARD = re.compile(r"pytorch_model(-\d{5}-of-\d{5})?\.bin")  # the names the converter accepts
ADAPTER_PICKLE = "adapter_model.bin"
PROVENANCE_FILE = "source.json"
# A revision is a branch, a tag, a commit id or a ref such as refs/pr/1: no spaces, no `..`.
REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# room left on the cache's disk after a download, for the conversion's scratch and the system
DISK_MARGIN = 2**30


@dataclass(frozen=True)
class HubRef:
    """A model on the Hub as the user names it: `org/name`, optionally `@revision`."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


@dataclass(frozen=True)
class FetchedModel:
    repo_id: str
    revision: str | None  # as asked; None: the default branch
    commit: str  # the 40-hex commit it resolved to
    folder: Path  # the cache's snapshot folder of that commit (its files link into the cache's blobs/)
    files: tuple[str, ...]  # the fetched files, names inside `folder`
    endpoint: str  # without credentials
    license: str | None = None  # from the model card's metadata, when the Hub gives it

    @property
    def file_paths(self) -> dict[str, Path]:
        """File name -> path in the snapshot (what llm2wasm.host.run.ConvertJob.model_files takes)."""
        return {name: self.folder / name for name in self.files}


def parse_hub_ref(text: str) -> HubRef:
    """`org/name[@revision]` -> HubRef, with the repo id checked as the Hub checks it."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, revision = text.strip().partition("@")
    example = "for example Qwen/Qwen2.5-0.5B-Instruct or Qwen/Qwen2.5-0.5B-Instruct@main"
    if repo_id.count("/") != 1:
        raise UsageError(f"{text!r} is not a Hub model id: write it as org/name[@revision] ({example})")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"{text!r} is not a Hub model id: {error} ({example})") from None
    if "@" in text and (not REVISION.fullmatch(revision) or ".." in revision or revision.endswith(("/", ".lock"))):
        raise UsageError(f"{revision!r} is not a revision: give a branch, a tag or a commit id after '@' ({example})")
    return HubRef(repo_id, revision or None)


def as_hub_ref(text: str) -> HubRef | None:
    """What the user meant by `text`: None for a local folder (an existing path wins over a Hub id
    of the same spelling), else the Hub model it names. A path-looking text that exists nowhere is
    a UsageError, not a Hub id."""
    if Path(text).expanduser().exists():
        return None
    if text.startswith(("/", "./", "../", "~")):
        raise UsageError(f"{text} does not exist: give a model folder, or a Hub model id as org/name[@revision]")
    return parse_hub_ref(text)


def hub_cache_dir() -> Path:
    """The client's cache folder: HF_HUB_CACHE, or HF_HOME/hub (read by huggingface_hub at import)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def public_endpoint(endpoint: str) -> str:
    """The endpoint without user:password@, query or fragment: safe to print and to record."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def plan_files(names: set[str], shown: str, *, allow_pickle: bool = False) -> tuple[list[str], str | None]:
    """From a repository's file names: the files to fetch, and the weight index whose shards come on
    top (read once it is fetched). Only top-level files; a UsageError when there is nothing to convert."""
    top = {name for name in names if "/" not in name}
    wanted = [name for name in (*CONFIG_FILES, *TOKENIZER_FILES, ADAPTER_CONFIG) if name in top]
    adapter = ADAPTER_CONFIG in top
    if "config.json" not in top and not adapter:
        raise UsageError(
            f"{shown} has no config.json (nor adapter_config.json): it is not a transformers model or PEFT "
            "adapter that llm2wasm can convert. Check the id, or pick the repository of the original weights"
        )
    if adapter:
        weights, index = [name for name in (ADAPTER_WEIGHTS,) if name in top], None
        pickles = [name for name in (ADAPTER_PICKLE,) if name in top]
    else:
        # one set of weights, never two: an index names its shards; else the one model.safetensors;
        # else whatever safetensors there are
        index = SAFETENSORS_INDEX if SAFETENSORS_INDEX in top else None
        single = [SAFETENSORS_SINGLE] if SAFETENSORS_SINGLE in top else []
        weights = [] if index else single or sorted(name for name in top if name.endswith(".safetensors"))
        pickles = sorted(name for name in top if PICKLE_SHARD.fullmatch(name) or name == PICKLE_INDEX)
    if index or weights:
        return [*wanted, *([index] if index else weights)], index
    if pickles and allow_pickle:
        index = PICKLE_INDEX if PICKLE_INDEX in pickles else None
        return [*wanted, *([index] if index else pickles)], index
    if pickles:
        raise UsageError(
            f"{shown} has its weights only as pickle files ({', '.join(pickles)}), no .safetensors: loading a "
            "pickle can run code from the repository. Pass --allow-pickle (allow_pickle=True) if you trust it "
            "(llm2wasm still reads the pickle opcode by opcode first), or pick a revision or a repository with "
            "safetensors weights"
        )
    raise UsageError(
        f"{shown} holds no model weights llm2wasm reads: no *.safetensors, no pytorch_model*.bin. GGUF, ONNX or "
        "already-converted MLC repositories are not converted: pick the repository of the original weights"
    )


def index_shards(index_file: Path, names: set[str], shown: str) -> list[str]:
    """The shard files a weight index maps tensors to; each must be a top-level file of the repository."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{shown}: {index_file.name} is not a weight index (no weight_map)") from None
    missing = [shard for shard in shards if not isinstance(shard, str) or "/" in shard or shard not in names]
    if missing or not shards:
        raise UsageError(f"{shown}: {index_file.name} names shards the repository does not hold: {missing[:3]}")
    return shards


def fetch_model(
    source: str | HubRef,
    *,
    cache_dir: Path | str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    allow_pickle: bool = False,
) -> FetchedModel:
    """Resolve `source` (org/name[@revision]) to a commit and download the files a conversion needs
    into the cache (what is there already is not downloaded again). Progress bars on stderr."""
    from huggingface_hub import HfApi, constants, get_cached_repo_tree

    ref = source if isinstance(source, HubRef) else parse_hub_ref(source)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    api = HfApi(endpoint=endpoint, token=token)
    with explained(ref, endpoint, cache, api):
        # resolve_revision falls back on the cache's refs/ when the Hub cannot be reached
        revision = api.resolve_revision(ref.repo_id, revision=ref.revision, cache_dir=cache)
        online, license, sizes = not constants.is_offline_mode(), None, {}
        if online:
            try:
                info = api.model_info(ref.repo_id, revision=revision.resolved, files_metadata=True)
                names = {sibling.rfilename for sibling in info.siblings or []}
                sizes = {sibling.rfilename: sibling.size for sibling in info.siblings or [] if sibling.size is not None}
                license = getattr(info.card_data, "license", None) if info.card_data else None
            except _unreachable():
                online = False
        if not online:
            tree = get_cached_repo_tree(ref.repo_id, revision=revision.resolved, cache_dir=cache)
            names = {entry.path for entry in tree}
        files, index = plan_files(names, str(ref), allow_pickle=allow_pickle)
        snapshot = snapshot_folder(cache, ref.repo_id, revision.resolved)
        if online:
            check_download(files, sizes, snapshot, cache, str(ref))
        folder = _download(ref, revision, files, cache, api, online)
        if index is not None:
            files += index_shards(folder / index, names, str(ref))
            if online:
                check_download(files, sizes, snapshot, cache, str(ref))
            folder = _download(ref, revision, files, cache, api, online)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise UsageError(
            f"{ref} (commit {revision.resolved}) is only partly in the cache {cache} (missing {', '.join(missing)}) "
            f"and the Hub at {public_endpoint(endpoint)} cannot be reached: fetch it again when online"
        )
    return FetchedModel(
        ref.repo_id, ref.revision, revision.resolved, folder, tuple(files), public_endpoint(endpoint), license
    )


def snapshot_folder(cache: Path, repo_id: str, commit: str) -> Path:
    """Where the client puts a commit's files (huggingface_hub's cache layout)."""
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit


def size_limit(name: str) -> int | None:
    """The most a file of this name may hold, as the converter reads it (weights: no limit)."""
    if name.endswith(WEIGHT_SUFFIXES):
        return None
    return TOKENIZER_FILE_LIMIT if name in TOKENIZER_NAMES else SMALL_FILE_LIMIT


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds `folder` (or the nearest folder above it that exists)."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    return shutil.disk_usage(existing).free


def check_download(files: list[str], sizes: dict[str, int], snapshot: Path, cache: Path, shown: str) -> None:
    """Before anything is downloaded, from the sizes the Hub lists: no config or tokenizer file larger
    than the converter would read (a repository made to fill the disk), and room on the cache's disk
    for what is not in the cache already."""
    for name in files:
        limit = size_limit(name)
        if limit is not None and sizes.get(name, 0) > limit:
            raise UsageError(
                f"{shown}: its {name} is {sizes[name] / 2**20:,.0f} MiB on the Hub, more than any {name} needs "
                f"({limit // 2**20} MiB); it was not downloaded. The repository is damaged or made to fill the "
                "disk: pick another repository or revision"
            )
    needed = sum(sizes.get(name, 0) for name in files if not (snapshot / name).exists())
    free = free_bytes(cache)
    if needed + DISK_MARGIN > free:
        raise UsageError(
            f"{shown}: the files it still needs take {needed / 1e9:,.2f} GB, and the disk of the Hugging Face cache "
            f"{cache} has {free / 1e9:,.2f} GB free ({DISK_MARGIN / 2**30:g} GiB kept back); they were not downloaded. "
            "Free space there, or point HF_HUB_CACHE (or HF_HOME) at a disk with room"
        )
    if needed:
        print(f"{shown}: {needed / 1e9:,.2f} GB to download into {cache}", file=sys.stderr)


def _download(ref: HubRef, revision, files: list[str], cache: Path, api, online: bool) -> Path:
    from huggingface_hub import snapshot_download

    listed = ", ".join(files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "")
    print(f"{'fetching' if online else 'using the cached'} {ref} ({revision.resolved[:12]}): {listed}", file=sys.stderr)
    folder = snapshot_download(
        ref.repo_id,
        revision=revision,  # a ResolvedRevision: no second resolution, pinned to this commit
        cache_dir=cache,
        allow_patterns=[escape(name) for name in files],  # exact names, not patterns
        token=api.token,
        endpoint=api.endpoint,
        local_files_only=not online,
    )
    return Path(folder)


def _unreachable() -> tuple[type[BaseException], ...]:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return (httpx2.TransportError, OfflineModeIsEnabled)


@contextmanager
def explained(ref: HubRef, endpoint: str, cache: Path, api) -> Iterator[None]:
    """The client's errors as UsageErrors that name the problem and the fix (never the token)."""
    from huggingface_hub import errors

    shown, hub = str(ref), public_endpoint(endpoint)
    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        yield
    except errors.GatedRepoError as error:
        page = f"{hub}/{ref.repo_id}"
        if error.response.status_code == 403:
            raise UsageError(
                f"{shown} is gated and the token in use has no access: accept its terms on {page} with the account "
                "of that token (some repositories also need the owners' approval), then try again"
            ) from None
        raise UsageError(f"{shown} is gated: accept its terms on {page}, then {login} and try again") from None
    except errors.RepositoryNotFoundError:
        raise UsageError(
            f"{ref.repo_id} is not a model on {hub}: check the id (org/name); if it is private, {login} "
            "(a token that can read it)"
        ) from None
    except errors.RevisionNotFoundError:
        raise UsageError(
            f"{shown}: no revision {ref.revision or 'main'!r} in {ref.repo_id}. {_known_refs(api, ref)}"
        ) from None
    except (*_unreachable(), errors.RevisionResolutionError, errors.LocalEntryNotFoundError) as error:
        raise UsageError(_offline_message(ref, hub, cache, error)) from None
    except errors.CachedRepoTreeNotFoundError:
        raise UsageError(_offline_message(ref, hub, cache, None)) from None
    except errors.HfHubHTTPError as error:
        status = error.response.status_code
        if status == 401:
            raise UsageError(
                f"{hub} refused the token in use (invalid or expired) for {shown}: {login} with a valid token, "
                "or unset HF_TOKEN for a public model"
            ) from None
        raise UsageError(f"{hub} answered {status} for {shown}: try again later, or check the endpoint") from None


def _known_refs(api, ref: HubRef) -> str:
    try:
        refs = api.list_repo_refs(ref.repo_id)
    except Exception:  # the suggestion is a courtesy: the error stands without it
        return "Give a branch, a tag or a full commit id."
    branches = ", ".join(branch.name for branch in refs.branches) or "none"
    tags = ", ".join(tag.name for tag in refs.tags) or "none"
    return f"Give a branch ({branches}), a tag ({tags}) or a full commit id."


def _offline_message(ref: HubRef, hub: str, cache: Path, error: BaseException | None) -> str:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        reason = "HF_HUB_OFFLINE is set"
        fix = "unset HF_HUB_OFFLINE to download it"
    else:
        cause = (error.__cause__ or error) if error is not None else None  # the connection error, not its wrapper
        reason = f"the Hub at {hub} cannot be reached" + (f" ({type(cause).__name__}: {cause})" if cause else "")
        fix = "check the network and proxy settings (HTTPS_PROXY), or the endpoint (HF_ENDPOINT)"
    return f"{reason}, and {ref} is not in the cache {cache}: {fix}. Once fetched, a model is used from the cache"


def file_sha256(path: Path) -> str:
    """The sha256 of a fetched file. The cache names a large (LFS) file's blob by the Hub's sha256 of
    it, so gigabytes of weights need not be read again; a small file's blob is named by its git id,
    and that file is hashed here."""
    blob = Path(os.readlink(path)).name if path.is_symlink() else ""
    if SHA256_HEX.fullmatch(blob):
        return blob
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def provenance(model: FetchedModel) -> dict:
    """Where a model came from, for source.json: no credentials, no local paths."""
    record = {
        "repo_id": model.repo_id,
        "revision": model.revision,
        "commit": model.commit,
        "endpoint": public_endpoint(model.endpoint),
        "files": [
            {"path": name, "size": (model.folder / name).stat().st_size, "sha256": file_sha256(model.folder / name)}
            for name in model.files
        ],
    }
    if model.license:
        record["license"] = model.license
    return record


def write_provenance(folder: Path, model: FetchedModel | dict) -> Path:
    """Write source.json into `folder` (a bundle folder): replaced whole, never written through a link."""
    record = provenance(model) if isinstance(model, FetchedModel) else dict(model)
    target = Path(folder) / PROVENANCE_FILE
    staging = target.with_name(f".{PROVENANCE_FILE}.tmp")
    staging.unlink(missing_ok=True)
    staging.write_text(json.dumps(record, indent=2) + "\n")
    staging.replace(target)
    return target


def read_provenance(folder: Path) -> dict | None:
    """source.json of `folder`, or None when there is none (a model converted from a local folder)."""
    path = Path(folder) / PROVENANCE_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is not a provenance record ({error}): remove it or fetch the model again") from None
    if not isinstance(record, dict) or not isinstance(record.get("repo_id"), str):
        raise UsageError(f"{path} is not a provenance record (no repo_id): remove it or fetch the model again")
    return record
