"""The files of a model or adapter folder that a conversion reads, chosen by construction.

A model folder comes from a stranger on the Hub and is hostile input. mlc_llm reads whatever it
finds beside config.json (its gen_config passes each line of an `rwkv_vocab_v*.txt` to `eval()`;
it copies tokenizer files into the bundle, following symlinks), so nothing reaches it but a view:
a folder of symlinks to an allowlist of regular files, each resolved inside its folder. Every
other file is left out (and named); a listed file that is a symlink out of the folder, a dangling
one, a FIFO, a device or a folder is refused, and so is a small file whose size is no config's.
Pickle checkpoints (`*.bin`) are opened only after their pickle was read opcode by opcode and
found to name nothing but torch's tensor rebuilders (`check_pickle`); torch.load then runs with
weights_only forced on (`TORCH_FORCE_WEIGHTS_ONLY_LOAD`, set by the converter) besides.

Standard library only: this runs in the image before anything heavy is imported.
"""

from __future__ import annotations

import os
import pickletools
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from llm2wasm.errors import UsageError

TOKENIZER_NAMES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_NAMES = ("config.json", "generation_config.json", *TOKENIZER_NAMES)
MODEL_PATTERNS = (
    re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.safetensors"),
    re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.safetensors\.index\.json"),
    re.compile(r"pytorch_model(-\d{5}-of-\d{5})?\.bin"),
    re.compile(r"pytorch_model\.bin\.index\.json"),
)
ADAPTER_NAMES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", *TOKENIZER_NAMES)
ADAPTER_PATTERNS: tuple[re.Pattern, ...] = ()

# A config or index is kilobytes (an index of a 400-shard model about 2 MB); a tokenizer tens of
# megabytes (Gemma 3's tokenizer.json is 33 MB). Past these a file is damaged or made to exhaust
# memory (a sparse multi-gigabyte config.json reads as gigabytes of zeros).
SMALL_FILE_LIMIT = 16 * 2**20
TOKENIZER_FILE_LIMIT = 256 * 2**20
WEIGHT_SUFFIXES = (".safetensors", ".bin")

# What a weights-only pickle of a state dict may name (torch.serialization's own allowlist, read
# in torch/_weights_only_unpickler.py): tensor and storage rebuilders, dtypes, OrderedDict.
PICKLE_GLOBALS = re.compile(
    r"(torch\._utils _rebuild_[a-z0-9_]+|torch [A-Za-z0-9]*Storage|torch (float|bfloat|half|int|uint|bool)[0-9a-z_]*"
    r"|torch\.storage UntypedStorage|torch device|torch Size|collections OrderedDict)"
)


@dataclass
class InputFiles:
    """The files of `folder` a conversion may read: name -> the regular file it resolves to."""

    folder: Path
    files: dict[str, Path]
    left_out: list[str] = field(default_factory=list)

    def view(self, at: Path) -> Path:
        """A folder of symlinks to exactly these files (what mlc_llm, transformers and peft read)."""
        at.mkdir(parents=True)
        for name, target in self.files.items():
            (at / name).symlink_to(target)
        return at

    def note(self) -> str | None:
        if not self.left_out:
            return None
        more = len(self.left_out) - 12
        shown = ", ".join(self.left_out[:12]) + (f" and {more} more" if more > 0 else "")
        return f"left out of {self.folder} (a conversion does not read them): {shown}"


def allowed(name: str, names: tuple[str, ...], patterns: tuple[re.Pattern, ...]) -> bool:
    return name in names or any(pattern.fullmatch(name) for pattern in patterns)


def select_model_files(folder: Path) -> InputFiles:
    return select(folder, MODEL_NAMES, MODEL_PATTERNS, "model")


def select_adapter_files(folder: Path) -> InputFiles:
    return select(folder, ADAPTER_NAMES, ADAPTER_PATTERNS, "adapter")


def select(folder: Path, names: tuple[str, ...], patterns: tuple[re.Pattern, ...], what: str) -> InputFiles:
    root = folder.resolve()
    files: dict[str, Path] = {}
    left_out: list[str] = []
    for entry in sorted(root.iterdir(), key=lambda path: path.name):
        if not allowed(entry.name, names, patterns):
            left_out.append(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
            continue
        files[entry.name] = checked_file(root, entry, what)
    return InputFiles(root, files, left_out)


def checked_file(root: Path, entry: Path, what: str) -> Path:
    """`entry` as the regular file inside `root` it resolves to, or a UsageError naming the problem."""
    if entry.is_symlink():
        try:
            target = entry.resolve(strict=True)
        except (OSError, RuntimeError):
            raise UsageError(
                f"{entry} is a symlink to {os.readlink(entry)!r}, which does not exist here: copy the real file "
                f"into the {what} folder (`cp -L`)"
            ) from None
        if not target.is_relative_to(root):
            raise UsageError(
                f"{entry} is a symlink to {os.readlink(entry)!r}, outside the {what} folder {root}: a conversion "
                f"reads only files inside it. Copy the real file in place (`cp -L`; for a Hugging Face cache "
                f"snapshot, download with `--local-dir DIR` instead)"
            )
    else:
        target = entry
    mode = target.stat().st_mode
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise UsageError(f"{entry} is {kind}: a {what} folder's {entry.name} must be a regular file")
    size = target.stat().st_size
    limit = TOKENIZER_FILE_LIMIT if entry.name in TOKENIZER_NAMES else SMALL_FILE_LIMIT
    if not entry.name.endswith(WEIGHT_SUFFIXES) and size > limit:
        raise UsageError(
            f"{entry} is {size / 2**20:,.0f} MiB, more than any {entry.name} needs ({limit // 2**20} MiB): "
            f"the {what} folder is damaged or was made to exhaust memory; download it again"
        )
    if entry.name.endswith(".bin"):
        check_pickle(target, entry)
    return target


def check_pickle(path: Path, shown: Path) -> None:
    """Refuse a pickle checkpoint that names anything but torch's tensor rebuilders: unpickling
    runs what a pickle names. Read opcode by opcode, never unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith(".pkl")]
            if not pickles:
                raise zipfile.BadZipFile("no .pkl record")
            for name in pickles:
                if archive.getinfo(name).file_size > SMALL_FILE_LIMIT:
                    raise UsageError(f"{shown}: its pickle {name} is implausibly large; download it again")
                check_pickle_globals(archive.read(name), shown)
    except zipfile.BadZipFile:
        raise UsageError(
            f"{shown} is not a PyTorch zip checkpoint (a legacy or damaged pickle): llm2wasm reads only "
            "zip checkpoints whose pickle names torch's tensor types. Convert it to safetensors "
            "(`safetensors.torch.save_file`) in a trusted environment, or use the repo's *.safetensors"
        ) from None


STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
NO_PUSH = {"PROTO", "FRAME", "MEMOIZE", *MEMO_PUTS}


def check_pickle_globals(data: bytes, shown: Path) -> None:
    """What each GLOBAL / STACK_GLOBAL names. STACK_GLOBAL takes its two names from the stack, so
    the strings pushed (directly or from the memo) are tracked; anything else pushed is unknown,
    and a STACK_GLOBAL of an unknown is refused rather than guessed."""
    pushed: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in STRING_OPCODES:
                pushed.append(str(arg))
                continue
            if name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in MEMO_PUTS:
                memo[int(arg)] = pushed[-1] if pushed else None
            if name in MEMO_GETS:
                pushed.append(memo.get(int(arg)))
            elif name not in NO_PUSH:
                pushed.append(None)
            if name == "GLOBAL":
                named = str(arg)
            elif name == "STACK_GLOBAL":
                module, attribute = pushed[-3:-1] if len(pushed) >= 3 else (None, None)
                named = f"{module} {attribute}" if module and attribute else "a name built on the stack"
            elif name in {"INST", "OBJ", "EXT1", "EXT2", "EXT4"}:
                named = f"{name} opcode"
            else:
                continue
            if not PICKLE_GLOBALS.fullmatch(named):
                raise UsageError(
                    f"{shown} is a pickle that names {named!r}, which no tensor checkpoint needs: loading it "
                    "would run that code. Refused; use the repo's *.safetensors"
                )
    except ValueError as error:  # pickletools on a truncated or malformed stream
        raise UsageError(f"{shown} holds a damaged pickle ({error}): download it again") from None
