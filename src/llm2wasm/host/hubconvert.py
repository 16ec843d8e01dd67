"""`invoke convert`'s MODEL_DIR: a local model folder, or a model on the Hugging Face Hub.

A MODEL_DIR that exists on this host is a folder, whatever it looks like; anything else that reads
as `org/name[@revision]` is fetched here, on the host, into the standard Hugging Face cache
(llm2wasm.host.hubfetch): the token (HF_TOKEN or the stored `hf auth login`) is used for that
download only and never reaches the conversion's container, which keeps running without network.
The fetched files are mounted one by one (llm2wasm.host.run.ConvertJob.model_files), and once the
conversion has succeeded, where the model came from is written into the bundle as source.json, for
`invoke publish-bundle` to cite as the base model.

An adapter (`--adapter org/lora[@revision]`) is fetched and mounted file by file the same way. A
batch's Hub items (`hub =`, `adapter_hub =`) are fetched by `fetch_model_source` and
`fetch_adapter_source` too (llm2wasm.host.batchrun): the spec's key says they are Hub ids, so no
local path of the same spelling is looked for.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.host import hubfetch

HUB_ID_FORM = "org/name[@revision]"


@dataclass(frozen=True)
class ModelSource:
    """What a ConvertJob needs of the model, and where it came from."""

    model_dir: Path  # the folder (for a Hub model: its snapshot in the cache)
    model_files: dict[str, Path] | None = None  # a Hub model's files, mounted one by one
    shown_model: str | None = None  # how messages name a Hub model: org/name@<commit>
    provenance: dict | None = None  # source.json's record, None for a local folder

    @property
    def from_hub(self) -> bool:
        return self.provenance is not None


def fetched_source(fetched: hubfetch.FetchedModel) -> ModelSource:
    """A fetched Hub snapshot as a conversion takes it: its files one by one, named by commit."""
    return ModelSource(
        model_dir=fetched.folder,
        model_files=fetched.file_paths,
        shown_model=f"{fetched.repo_id}@{fetched.commit}",
        provenance=hubfetch.provenance(fetched),
    )


def resolve_model_source(
    text: str,
    *,
    allow_pickle: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> ModelSource:
    """The model `text` names: an existing local path as it is; else a Hub model id, fetched (only
    the files a conversion reads; nothing again that the cache holds). A UsageError names the fix."""
    if "/" not in text and not Path(text).expanduser().exists():
        # "my-model": a mistyped folder far more often than a Hub id, which always has an org
        raise UsageError(
            f"model folder {text} does not exist: give a Hugging Face model folder, or a Hub model id as "
            f"{HUB_ID_FORM} (for example Qwen/Qwen2.5-0.5B-Instruct)"
        )
    ref = hubfetch.as_hub_ref(text)
    if ref is None:
        return ModelSource(Path(text).expanduser())
    return fetch_model_source(ref, allow_pickle=allow_pickle, token=token, endpoint=endpoint, cache_dir=cache_dir)


def fetch_model_source(
    ref: hubfetch.HubRef,
    *,
    allow_pickle: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> ModelSource:
    """A Hub model, fetched (nothing again that the cache holds); a PEFT adapter in its place is refused."""
    fetched = hubfetch.fetch_model(ref, cache_dir=cache_dir, token=token, endpoint=endpoint, allow_pickle=allow_pickle)
    if hubfetch.ADAPTER_CONFIG in fetched.files:
        raise UsageError(
            f"{ref} is a PEFT adapter, not a model: convert its base model and pass the adapter as a local "
            f"folder with --adapter (hf download {ref.repo_id} --local-dir ./adapter)"
        )
    print(f"llm2wasm: {ref} is commit {fetched.commit}, in the cache {fetched.folder}", file=sys.stderr)
    return fetched_source(fetched)


def resolve_adapter_source(text: str | None, *, allow_pickle: bool = False) -> ModelSource | None:
    """The adapter `--adapter` names: an existing local folder (or anything that reads as a path: the
    conversion's own check refuses what is not one); else a Hub adapter id, fetched as a model is (its
    config and weights only), mounted file by file too. A model repository in its place is refused."""
    if text is None:
        return None
    path = Path(text).expanduser()
    if path.exists() or "/" not in text or text.startswith(("/", "./", "../", "~")):
        return ModelSource(path)
    ref = hubfetch.as_hub_ref(text)
    if ref is None:
        return ModelSource(path)
    return fetch_adapter_source(ref, allow_pickle=allow_pickle)


def fetch_adapter_source(ref: hubfetch.HubRef, *, allow_pickle: bool = False) -> ModelSource:
    """A Hub adapter, fetched as a model is (its config and weights only); a model in its place is refused."""
    fetched = hubfetch.fetch_model(ref, allow_pickle=allow_pickle)
    if hubfetch.ADAPTER_CONFIG not in fetched.files:
        raise UsageError(
            f"{ref} is a model, not a PEFT adapter (it has no adapter_config.json): pass it as the model, or give "
            "the adapter's own repository to --adapter"
        )
    print(f"llm2wasm: adapter {ref} is commit {fetched.commit}, in the cache {fetched.folder}", file=sys.stderr)
    return fetched_source(fetched)


def record_source(
    output: Path, source: ModelSource, *, adapter_merged: bool = False, adapter: ModelSource | None = None
) -> Path | None:
    """After a successful conversion: the Hub model's provenance into OUT/source.json (with whether an
    adapter was merged, so that the card does not call the bundle a plain quantization of it, and the
    adapter's own provenance when it came from the Hub too). For a
    local folder, a source.json left by an earlier Hub conversion into OUT is removed: it would
    name a base model this bundle was not made from."""
    if source.provenance is None:
        stale = Path(output) / hubfetch.PROVENANCE_FILE
        if stale.is_file() or stale.is_symlink():
            stale.unlink()
            print(f"llm2wasm: removed {stale}: it named the Hub model of an earlier conversion", file=sys.stderr)
        return None
    record = dict(source.provenance)
    if adapter_merged:
        record["adapter_merged"] = True
    if adapter is not None and adapter.provenance is not None:
        record["adapter"] = adapter.provenance
    return hubfetch.write_provenance(Path(output), record)
