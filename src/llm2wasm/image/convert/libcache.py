"""A library cache shared across conversions, so the fine-tunes of one base model compile once.

The WebGPU library `mlc_llm compile` makes from `mlc-chat-config.json` follows the model's shape
(architecture, sizes, vocabulary), the sequence bounds it is compiled for (context window, prefill chunk,
sliding window, batch size), the quantization, the compile options and the tools that built it; never the
weights, which it only receives when it runs. WebLLM's prebuilt list relies on this: one library serves
every fine-tune of a base. So the key (`library_key`) is a SHA-256 over exactly those inputs, and a fine-tune
that differs in its weights, conversation template, tokenizer or sampling defaults finds its base's library.

The cache folder is shared by many conversions (maybe other containers), so an entry is verified before use:
its recorded inputs must hash to the key it is filed under, its library must have the recorded digest and
size and be a wasm module, and it must hold regular files only (no symlinks followed). A "planted" entry is
filed under a key its own inputs do not hash to (a library of another shape, copied there by hand or by a
bug); used, it would give a bundle a library that does not fit its weights. A failed check is a miss (the
caller compiles), never a broken bundle. Entries are written into a temp folder inside the cache and renamed
into place, so concurrent conversions never see half an entry. Standard library only: this ships into the image.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

CACHE_ENVIRONMENT_VARIABLE = "LLM2WASM_LIB_CACHE"
KEY_FORMAT = 1  # bump when what goes into a key changes, so old entries miss instead of being misread
LIBRARY_NAME = "library.wasm"
RECORD_NAME = "entry.json"
WASM_MAGIC = b"\0asm"
MAX_RECORD_BYTES = 16 * 1024 * 1024  # a record is a few KiB; anything huge is not one of ours
KEY_PATTERN = re.compile(r"[0-9a-f]{64}")

# Top-level fields of mlc-chat-config.json that reach the library, as mlc-llm 79d603f0 reads them: `mlc_llm
# compile` (interface/compile.py: compile) pops `model_config`, updates it with every other top-level field and
# builds the model's config class from that (ConfigBase.from_dict), so a field of that class's name counts.
LIBRARY_FIELDS = (
    "model_type",  # picks the model definition (cli/compile.py: detect_model_type), the library's metadata
    "quantization",  # picks the quantized layers and kernels (detect_quantization reads it when no flag is given)
    "model_config",  # the architecture: layer count, hidden/head sizes, rope, norms... the graph is built from it
    "vocab_size",  # overrides model_config's: embedding and output head shapes
    "active_vocab_size",  # popped by compile into the library's metadata (the logits the runtime keeps)
    "context_window_size",  # the KV cache's total_seq_len bound in the kernels, and the metadata
    "sliding_window_size",  # the rolling cache length and kv_seq_len bound, and the metadata
    "prefill_chunk_size",  # the seq_len bound the prefill kernels are compiled for, and the metadata
    "attention_sink_size",  # the KV cache's sink size (mistral-like configs), and the metadata
    "tensor_parallel_shards",  # shards weights and adds all-reduce ops to the graph, and the metadata
    "pipeline_parallel_stages",  # the pipeline stages recorded per parameter, and the metadata
    "max_batch_size",  # the batch_size bound of the kernels (model_config's, overridable at the top level)
    "disaggregation",  # changes the KV cache functions the graph exports (model_config's, overridable)
)
# Top-level fields that never reach the library: compile reads none of them; they fall into the model config's
# `kwargs`, which compile replaces.
NON_LIBRARY_FIELDS = frozenset(
    {"conv_template", "tokenizer_files", "tokenizer_info"}  # WebLLM applies them at run time
    | {"temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"}  # WebLLM's sampler
    | {"pad_token_id", "bos_token_id", "eos_token_id"}  # baichuan, internlm* ... declare them; no graph reads them
    | {"model_task", "embedding_metadata"}  # compile takes both from mlc_llm's registry entry of model_type
    | {"version"}  # the schema's: the mlc_llm version in the toolchain covers it
)
REVIEWED_FIELDS = NON_LIBRARY_FIELDS | set(LIBRARY_FIELDS)


def canonical_json(value: object) -> str:
    """One text per value, so equal inputs give equal keys here and when recomputed from a record."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def key_of(inputs: Mapping) -> str:
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def library_key(
    chat_config: Mapping, *, quantization: str, compile_options: Mapping, toolchain: Mapping
) -> tuple[str, dict]:
    """The cache key of the library `mlc_llm compile` makes from `chat_config` (the generated
    mlc-chat-config.json), and the inputs it hashes (for the entry's record). Weights, adapters, the
    model id and the library's file name are not inputs: fine-tunes of one base share a key."""
    reviewed = {name: chat_config[name] for name in LIBRARY_FIELDS if name in chat_config}
    # A field not reviewed here (a newer mlc_llm's) may reach the library: a needless miss costs a compile.
    unreviewed = {name: value for name, value in chat_config.items() if name not in REVIEWED_FIELDS}
    inputs = dict(key_format=KEY_FORMAT, chat_config=reviewed, unreviewed_chat_config=unreviewed)
    inputs |= dict(quantization=quantization, compile_options=dict(compile_options), toolchain=dict(toolchain))
    # The record holds what was hashed after a JSON round trip (tuples as lists), so it re-hashes equal.
    normalized = json.loads(canonical_json(inputs))
    return key_of(normalized), normalized


@dataclass(frozen=True)
class Entry:
    key: str
    folder: Path
    inputs: dict
    library_sha256: str
    library_size: int
    wgsl_result: dict
    created: str
    memory: dict  # compile's memory figures (the bundle's vram_required_MB), as the library's own compile printed them

    @property
    def library(self) -> Path:
        return self.folder / LIBRARY_NAME


class Rejected(Exception):
    """An entry that failed verification; the message says why."""


class EntryChanged(Exception):
    """The library changed between its verification and its copy: the caller compiles instead."""


def _blocks(path: Path) -> Iterator[bytes]:
    """The bytes of the regular file at `path`. A symlink there is refused (O_NOFOLLOW), not followed, and a
    planted FIFO does not hang the open (O_NONBLOCK)."""
    with open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK)) as reader:
        if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
            raise Rejected(f"{path.name} is not a regular file")
        while block := reader.read(1 << 20):
            yield block


def _measure(blocks: Iterable[bytes], sink: Callable[[bytes], None] = lambda block: None) -> tuple[str, int, bytes]:
    """The SHA-256, size and first four bytes of `blocks`, each passed on to `sink` as well."""
    digest, size, head = hashlib.sha256(), 0, b""
    for block in blocks:
        digest.update(block)
        size, head = size + len(block), (head + block[:4])[:4]
        sink(block)
    return digest.hexdigest(), size, head


def _write_new(path: Path, blocks: Iterable[bytes]) -> tuple[str, int, bytes]:
    """Create `path` and write `blocks` to it: never over an existing file or through a symlink ("x",
    O_NOFOLLOW), mode 0644 whatever the umask (other users' conversions read it), synced to disk."""
    with open(path, "xb", opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW, 0o644)) as writer:
        measured = _measure(blocks, writer.write)
        writer.flush()
        os.fchmod(writer.fileno(), 0o644)
        os.fsync(writer.fileno())
    return measured


def _is_plain_folder(path: Path) -> bool:
    return os.path.lexists(path) and stat.S_ISDIR(os.lstat(path).st_mode)


def _fsync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _make_folder(path: Path, may_be_link: bool = False) -> None:
    with contextlib.suppress(FileExistsError):
        path.mkdir(parents=may_be_link)
        os.chmod(path, 0o755)  # only a folder made here: a user's own cache folder keeps its mode
    # The root may be a link the user chose; a key's folder must be ours, never a link's target.
    if not (_is_plain_folder(path) or (may_be_link and path.is_dir())):
        raise ValueError(f"{path} is not a plain folder")


@dataclass(frozen=True)
class LibraryCache:
    root: Path

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> LibraryCache | None:
        """The cache `$LLM2WASM_LIB_CACHE` names, or None (no cache) when it is unset or empty."""
        value = environ.get(CACHE_ENVIRONMENT_VARIABLE, "").strip()
        return cls(Path(value).expanduser()) if value else None

    def folder_of(self, key: str) -> Path:
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError(f"not a library key: {key!r}")  # a key is a path component: nothing else passes
        return self.root / key[:2] / key

    def lookup(self, key: str, on_reject: Callable[[str], None] | None = None) -> Entry | None:
        """The verified entry of `key`, or None. When something is there but fails verification,
        `on_reject` is told why (for the caller's message); a plain absence is silent."""
        try:
            folder = self.folder_of(key)
            if not os.path.lexists(folder):
                return None
            return self._verified(key, folder)
        # Whatever is wrong with what is on disk (or a bad key), a cache never breaks a conversion.
        except Exception as error:
            if on_reject is not None:
                on_reject(f"library cache entry {key}: {error}")
            return None

    def _verified(self, key: str, folder: Path) -> Entry:
        for level in (folder.parent, folder):
            if not _is_plain_folder(level):
                raise Rejected(f"{level} is not a plain folder (a symlink?)")
        # Judged by lstat (follow_symlinks=False): a link to a good library elsewhere is no entry of ours.
        kinds = {item.name: "file" if item.is_file(follow_symlinks=False) else "other" for item in os.scandir(folder)}
        if kinds != {LIBRARY_NAME: "file", RECORD_NAME: "file"}:
            raise Rejected(f"holds {kinds}, not just the regular files {RECORD_NAME} and {LIBRARY_NAME}")
        text = b"".join(_blocks(folder / RECORD_NAME))
        record = json.loads(text) if len(text) <= MAX_RECORD_BYTES else None
        if not isinstance(record, dict) or record.get("key_format") != KEY_FORMAT:
            raise Rejected(f"{RECORD_NAME} is not a record of this format")
        inputs, library, wgsl_result = record.get("inputs"), record.get("library"), record.get("wgsl")
        memory = record.get("memory", {})
        if not all(isinstance(part, dict) for part in (inputs, library, wgsl_result, memory)):
            raise Rejected(f"{RECORD_NAME} lacks inputs, library, wgsl or memory")
        if key_of(inputs) != key or record.get("key") != key:
            raise Rejected("its recorded inputs hash to another key (a planted or edited entry)")
        digest, size, head = _measure(_blocks(folder / LIBRARY_NAME))
        if size != library.get("size"):
            raise Rejected(f"{LIBRARY_NAME} has {size} bytes, the record says {library.get('size')}")
        if head != WASM_MAGIC:
            raise Rejected(f"{LIBRARY_NAME} is not a wasm module")
        if digest != library.get("sha256"):
            raise Rejected(f"{LIBRARY_NAME}'s SHA-256 is {digest}, the record says {library.get('sha256')}")
        return Entry(key, folder, inputs, digest, size, wgsl_result, str(record.get("created")), memory)

    def store(self, key: str, inputs: dict, library: Path, wgsl_result: dict, memory: dict | None = None) -> Entry:
        """File `library` under `key`. If another conversion filed a valid entry first, theirs is kept
        and returned (made from the same inputs), and ours removed."""
        folder = self.folder_of(key)
        if key_of(inputs) != key:
            raise ValueError("the inputs do not hash to the key: an entry filed so would be planted")
        _make_folder(self.root, may_be_link=True)
        _make_folder(folder.parent)
        # Written beside the entries (same file system, so the rename is atomic), under a name no key has.
        staging = Path(tempfile.mkdtemp(prefix=".store-", dir=self.root))
        try:
            digest, size, head = _write_new(staging / LIBRARY_NAME, _blocks(library))
            if head != WASM_MAGIC:
                raise ValueError(f"{library} is not a wasm module")
            created = datetime.now(UTC).isoformat(timespec="seconds")
            record = {"key_format": KEY_FORMAT, "key": key, "inputs": inputs, "created": created}
            record |= {"library": {"sha256": digest, "size": size}, "wgsl": wgsl_result, "memory": memory or {}}
            _write_new(staging / RECORD_NAME, [json.dumps(record, indent=2, sort_keys=True).encode()])
            os.chmod(staging, 0o755)  # mkdtemp made it 0700
            _fsync_folder(staging)
            entry = Entry(key, folder, inputs, digest, size, wgsl_result, created, memory or {})
            return self._publish(entry, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # already gone when it was renamed into place

    def _publish(self, ours: Entry, staging: Path) -> Entry:
        for _attempt in range(3):
            try:
                os.rename(staging, ours.folder)  # atomic; fails when a non-empty folder (or a file) is there
                _fsync_folder(ours.folder.parent)  # should this fail, the lookup below finds ours in place
                return ours
            except OSError:
                theirs = self.lookup(ours.key)
                if theirs is not None:
                    return theirs  # another conversion was first
                # What is there is damaged or planted (or half-removed by clear()): set it aside and retry.
                aside = Path(tempfile.mkdtemp(prefix=".rejected-", dir=self.root))
                with contextlib.suppress(FileNotFoundError):
                    os.rename(ours.folder, aside / "entry")  # renames a symlink itself, never its target
                shutil.rmtree(aside, ignore_errors=True)
        raise OSError(f"could not file the library under {ours.folder}")

    @contextlib.contextmanager
    def compiling(self, key: str, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Held while one conversion looks up, compiles and files the library of `key`: a second one
        (another batch item of the same base, in its own container on the same cache) waits here and
        then finds the entry, rather than compiling the same library at the same time. An advisory
        lock (flock) on a file under .locks/, released when its holder ends, however it ends."""
        locks = self.root / ".locks"
        _make_folder(self.root, may_be_link=True)
        _make_folder(locks)
        descriptor = os.open(locks / f"{self.folder_of(key).name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait()
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    def copy_into(self, entry: Entry, target: Path) -> Path:
        """Copy the verified library to `target` (a temp name, then a rename). The copy's digest is checked
        against the verified one: a library swapped after `lookup` raises EntryChanged, and target is untouched."""
        temporary = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            digest, size, _head = _write_new(temporary, _blocks(entry.library))
            if (digest, size) != (entry.library_sha256, entry.library_size):
                raise EntryChanged(f"{entry.library} changed after it was verified")
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        return target

    def size(self) -> int:
        """Bytes held by the cache (entries and any leftover temp folders); symlinks are not followed."""
        total = 0
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile by a clear() or a store()
                    status = os.lstat(os.path.join(folder, name))
                    total += status.st_size if stat.S_ISREG(status.st_mode) else 0
        return total

    def clear(self) -> None:
        """Remove every entry; the root folder stays (it may be the user's own, or a mount). A conversion
        storing meanwhile fails its store, and one looking up misses: neither gets half an entry."""
        for child in self.root.iterdir() if self.root.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):  # a concurrent store renamed its temp folder away
                if _is_plain_folder(child):
                    shutil.rmtree(child)  # removes links inside, never what they point at
                else:
                    child.unlink()
