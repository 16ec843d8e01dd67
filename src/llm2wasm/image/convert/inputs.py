"""Checks on a conversion's inputs, all made before any work: each problem is a UsageError
naming what is wrong and how to fix it (exit status 2, nothing written)."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.adapterconfig import (
    ALL_LINEAR,
    adapter_config_problem,
    slow_pattern_problem,
)
from llm2wasm.image.convert.inputfiles import InputFiles, select_adapter_files, select_model_files
from llm2wasm.image.convert.mlc import WEBGPU_QUANTIZATIONS, MlcNames

# model_type -> conversation template, for when --conv-template is not given
TEMPLATE_GUESSES = {
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mistral": "mistral_default",
    "phi3": "phi-3",
    "gemma": "gemma_instruction",
    "gemma3_text": "gemma3_instruction",
    "smollm": "smollm",
}
MERGEABLE_PEFT_TYPES = {"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "OFT", "BOFT"}
PREQUANTIZED_METHODS = {"gptq", "awq", "bitsandbytes", "aqlm", "exl2", "hqq", "quanto", "fp8", "compressed-tensors"}


# emcc's optimisation level for the model library's link, where nearly all of its time is binaryen's
# wasm-opt over the whole module (TVM's create_tvmjs_wasm passes -O3). Measured on the tiny Llama
# (bench/results.md): O2 takes about 45 % of O3's link time for a library 1.04x the size with the
# same exports and imports and the same tokens in the browser; O1 skips wasm-opt (1.6x the size).
LINK_OPT_LEVELS = ("O2", "O3")
DEFAULT_LINK_OPT = "O2"


@dataclass
class ConvertRequest:
    model_dir: Path
    quantization: str
    conv_template: str | None  # None until chosen by the model's chat template (llm2wasm.image.convert.chat)
    output: Path
    model_id: str
    adapter: Path | None = None
    prefill_chunk_size: int | None = None
    context_window: int | None = None
    base_url: str = "http://localhost:8000/"
    force: bool = False
    # declare never-written buffers read-only where the WGSL check finds TVM's read_write defect
    repair_wgsl: bool = True
    # emcc's -O level at the library's link (LINK_OPT_LEVELS)
    link_opt: str = DEFAULT_LINK_OPT
    device: str = "auto"  # merge and convert_weight (llm2wasm.image.convert.device)
    strict_template: bool = False
    # look the library up in (and add it to) the shared library cache, where $LLM2WASM_LIB_CACHE names one
    use_lib_cache: bool = True
    # merge with transformers + peft on the whole model, not tensor by tensor (llm2wasm.image.convert.merge)
    peft_merge: bool = False
    # run even when the memory estimate exceeds what is available (llm2wasm.image.convert.memory)
    skip_memory_check: bool = False
    # the model's default system message, where it differs from the chosen template's
    system_message: str | None = None
    warnings: list[str] = field(default_factory=list)
    # the files of the model and adapter folders a conversion reads (llm2wasm.image.convert.inputfiles)
    model_files: InputFiles | None = None
    adapter_files: InputFiles | None = None
    # folders of symlinks to exactly those files, made for the run (what every reader is given)
    model_view: Path | None = None
    adapter_view: Path | None = None

    @property
    def needs_shader_f16(self) -> bool:
        return "f16" in self.quantization

    def overrides(self) -> dict[str, int]:
        """Compile-time overrides for `mlc_llm compile --overrides`."""
        values = {}
        if self.context_window:
            values["context_window_size"] = self.context_window
        if self.prefill_chunk_size:
            values["prefill_chunk_size"] = self.prefill_chunk_size
        return values

    def chat_overrides(self) -> dict[str, int]:
        """Overrides for WebLLM's ModelRecord: only ChatOptions fields (web-llm src/config.ts
        ChatConfig). prefill_chunk_size is a compile-time setting that WebLLM's types do not admit;
        it is baked into the library and the bundle's mlc-chat-config.json."""
        return {key: value for key, value in self.overrides().items() if key in CHAT_OPTION_OVERRIDES}


# The compile-time overrides that are also WebLLM ChatOptions fields.
CHAT_OPTION_OVERRIDES = ("context_window_size", "sliding_window_size", "attention_sink_size")


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from a file of the input (already checked to be a regular file of sane size)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} not found: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise UsageError(f"{path} is not valid JSON ({reason}): {what}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} holds a JSON {type(value).__name__}, not an object: {what}")
    return value


def weight_files(files: InputFiles) -> list[Path]:
    """The checkpoint's weights among the files a conversion reads: safetensors, else pickles."""
    safetensors = [path for name, path in sorted(files.files.items()) if name.endswith(".safetensors")]
    return safetensors or [path for name, path in sorted(files.files.items()) if name.endswith(".bin")]


def safetensors_header(path: Path) -> dict:
    """A safetensors file's header (tensor names, dtypes, shapes, offsets), without its weights."""
    damaged = f"{path} is not a complete safetensors file"
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise UsageError(f"{damaged} (shorter than its 8-byte header length): download it again")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 * 1024 * 1024 or length > path.stat().st_size - 8:
            raise UsageError(f"{damaged} (its header claims {length:,} bytes): download it again")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError, RecursionError):  # ValueError: also an integer of 5,000 digits
            header = None
    if not isinstance(header, dict):
        raise UsageError(f"{damaged} (its header is not a JSON object): download it again")
    return header


def safetensors_names(files: list[Path]) -> set[str]:
    """Tensor names from safetensors headers, without loading any weights."""
    names: set[str] = set()
    for path in files:
        if path.suffix == ".safetensors":
            names.update(key for key in safetensors_header(path) if key != "__metadata__")
    return names


def check_model_dir(model_dir: Path, files: InputFiles | None = None) -> dict:
    if not model_dir.is_dir():
        raise UsageError(
            f"model folder {model_dir} does not exist: pass the folder of a Hugging Face "
            "checkpoint (config.json, *.safetensors, tokenizer files)"
        )
    config = _read_json(model_dir / "config.json", "a Hugging Face model folder has config.json beside its weights")
    weights = weight_files(files) if files is not None else []
    if not weights:
        raise UsageError(
            f"no weights in {model_dir}: expected *.safetensors or pytorch_model*.bin "
            "(download the full checkpoint, e.g. `huggingface-cli download REPO --local-dir DIR`)"
        )
    unreadable = [path.name for path in [model_dir / "config.json", *weights] if not os.access(path, os.R_OK)]
    if unreadable:
        raise UsageError(
            f"cannot read {', '.join(unreadable)} in {model_dir}: the conversion runs as your user "
            "(uid " + str(os.getuid()) + "); make the files readable, e.g. `chmod a+r`"
        )
    has_tokenizer = (
        (model_dir / "tokenizer.json").is_file()
        or (model_dir / "tokenizer.model").is_file()
        or ((model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file())
    )
    if not has_tokenizer:
        raise UsageError(
            f"no tokenizer in {model_dir}: expected tokenizer.json, tokenizer.model, or vocab.json + "
            "merges.txt (save it with `tokenizer.save_pretrained(DIR)`)"
        )
    safetensors_names(weights)  # every header whole, before any step reads the weights
    return config


def check_quantization(quantization: str, names: MlcNames) -> None:
    if quantization not in names.quantizations:
        raise UsageError(
            f"unknown quantization {quantization!r}: the installed mlc_llm offers "
            f"{', '.join(names.quantizations)}; for WebGPU use one of {', '.join(WEBGPU_QUANTIZATIONS)}"
        )
    if quantization not in WEBGPU_QUANTIZATIONS:
        raise UsageError(
            f"quantization {quantization!r} is not for WebGPU (bf16, fp8, AWQ/FT kernels and other "
            f"group layouts have no WebGPU kernels): use one of {', '.join(WEBGPU_QUANTIZATIONS)} "
            "(q4f16_1 is WebLLM's usual choice; q4f32_1 for GPUs without shader-f16)"
        )


def check_model_type(config: dict, model_dir: Path, names: MlcNames) -> None:
    """The architecture first: no template, quantization or adapter question matters for a model that
    mlc_llm cannot convert at all."""
    model_type = str(config.get("model_type", ""))
    if not names.model_types or model_type in names.model_types:
        return
    if not model_type:
        raise UsageError(
            f"{model_dir}/config.json has no model_type: it is not a transformers model config "
            "(save the model with `save_pretrained`, which writes it)"
        )
    nearest = difflib.get_close_matches(model_type, names.model_types, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(name) for name in nearest)}?)" if nearest else ""
    raise UsageError(
        f"the installed mlc_llm cannot convert model_type {model_type!r}{hint}: it converts "
        f"{', '.join(names.model_types)}. A fine-tune converts when its base architecture is one of these; "
        "other architectures need support in mlc_llm itself (docs/MODELS.md lists what llm2wasm tests)"
    )


def choose_template(
    conv_template: str | None, config: dict, names: MlcNames, has_chat_template: bool = False
) -> tuple[str | None, str | None]:
    """The template given, or the one guessed from model_type with a note saying so. (None, None)
    when the model has a chat template to choose by (llm2wasm.image.convert.chat) and none was given."""
    if conv_template:
        if conv_template not in names.conv_templates:
            raise UsageError(
                f"unknown conversation template {conv_template!r}: the installed mlc_llm offers "
                f"{', '.join(names.conv_templates)}"
            )
        return conv_template, None
    guess = guess_template(config, names)
    if has_chat_template:
        return None, None
    if guess is None:
        raise UsageError(
            f"cannot guess a conversation template for model_type {config.get('model_type', '')!r} (and the model "
            "has no chat template to choose one by): pass "
            f"--conv-template, one of {', '.join(names.conv_templates)}"
        )
    return guess, (
        f"no --conv-template given and the model has no chat template: using {guess!r} "
        f"for model_type {config.get('model_type')!r}"
    )


def guess_template(config: dict, names: MlcNames) -> str | None:
    """The usual template of the model's family (for a base model without a chat template)."""
    model_type = str(config.get("model_type", ""))
    guess = TEMPLATE_GUESSES.get(model_type)
    if model_type == "llama":
        guess = "llama-3" if int(config.get("vocab_size", 0)) >= 128000 else "llama-2"
    return guess if guess in names.conv_templates else None


def check_not_prequantized(config: dict, model_dir: Path, merging: bool) -> None:
    quant = config.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    four_bit = bool(quant.get("load_in_4bit") or quant.get("load_in_8bit"))
    if method in PREQUANTIZED_METHODS or four_bit:
        if merging:
            raise UsageError(
                f"{model_dir} is a {method or 'bitsandbytes'}-quantized checkpoint: a PEFT adapter cannot "
                "be merged into quantized weights. Pass the original fp16/bf16 base model instead"
            )
        raise UsageError(
            f"{model_dir} is already quantized ({method or 'bitsandbytes'}): WebGPU conversion needs the "
            "original fp16/bf16 checkpoint (mlc_llm quantizes it itself)"
        )


def check_adapter(adapter: Path, model_files: InputFiles, config: dict, warnings: list[str]) -> None:
    model_dir = model_files.folder
    if not adapter.is_dir():
        raise UsageError(f"adapter folder {adapter} does not exist: pass the folder PEFT's save_pretrained wrote")
    adapter_config = _read_json(
        adapter / "adapter_config.json", "a PEFT adapter folder has adapter_config.json (written by save_pretrained)"
    )
    if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise UsageError(f"no adapter weights in {adapter}: expected adapter_model.safetensors or adapter_model.bin")
    peft_type = str(adapter_config.get("peft_type", "")).upper()
    if peft_type not in MERGEABLE_PEFT_TYPES:
        raise UsageError(
            f"adapter type {peft_type or 'unknown'!r} cannot be merged into the weights: llm2wasm merges "
            f"{', '.join(sorted(MERGEABLE_PEFT_TYPES))} adapters (prompt-tuning types add no weights)"
        )
    problem = adapter_config_problem(adapter_config)
    if problem:
        raise UsageError(
            f"{adapter / 'adapter_config.json'}: {problem}. It is not a config PEFT wrote: fix the field, "
            "or ask the adapter's author for the folder save_pretrained wrote"
        )
    model_names = safetensors_names(weight_files(model_files))
    problem = slow_pattern_problem(adapter_config, model_names)
    if problem:
        raise UsageError(
            f"{adapter / 'adapter_config.json'}: {problem}. PEFT would hang on it: use another adapter, or "
            "rewrite the pattern without nested repetition (a list of module names does the same job)"
        )
    targets = adapter_config.get("target_modules") or []
    listed = [targets] if isinstance(targets, str) else targets
    if listed and model_names and ALL_LINEAR not in listed:
        if isinstance(targets, str):  # PEFT: one regular expression (timed above)
            hit = any(re.search(targets, name) for name in model_names)
        else:  # PEFT: module names
            hit = any(f".{target}." in f".{name}" for target in targets for name in model_names)
        if not hit:
            raise UsageError(
                f"the adapter targets modules {', '.join(listed)}, none of which exist in {model_dir}: "
                "it was trained for another architecture. Pass the base model the adapter was made for"
            )
    declared = str(adapter_config.get("base_model_name_or_path") or "")
    known = {str(config.get("_name_or_path") or ""), model_dir.name}
    if declared and not any(
        name and (name == declared or name.split("/")[-1] == declared.split("/")[-1]) for name in known
    ):
        warnings.append(
            f"the adapter says its base is {declared!r}, and {model_dir} does not name itself so; "
            "merging anyway because the module names match. Check this is the right base model"
        )


def check_output(output: Path, force: bool, is_previous_bundle: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} is a file: pass a folder for the bundle")
    # As this process sees it: a read-only mount, or a folder root may write only by a capability
    # the container does not have, must fail here and not in a step after the checks.
    nearest = next(path for path in (output, *output.parents) if path.exists())
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write to {nearest} (uid {os.getuid()}, read-only or not yours): "
            "choose an output folder this user can write to, or change its permissions"
        )
    if output.is_dir() and any(output.iterdir()) and not is_previous_bundle and not force:
        raise UsageError(
            f"output folder {output} is not empty and is not an llm2wasm bundle: choose a new folder "
            "or pass --force to replace its contents"
        )


def check_base_url(base_url: str) -> str:
    parsed = urlparse(base_url)
    if parsed.scheme not in {"http", "https"} or not parsed.netloc:
        raise UsageError(
            f"--base-url {base_url!r} is not an absolute http(s) URL: WebLLM builds the weights URL "
            "with `new URL(...)`, which throws on a relative one. Example: https://example.com/models/"
        )
    return base_url if base_url.endswith("/") else base_url + "/"


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"{name} must be a positive number of tokens, not {value}")


def build_request(args, names: MlcNames, previous_bundle) -> ConvertRequest:
    """Validate the parsed arguments; previous_bundle(output) says whether OUT holds our bundle."""
    model_dir = Path(args.model_dir).resolve()
    output = Path(args.output).resolve()
    check_positive("--prefill-chunk-size", args.prefill_chunk_size)
    check_positive("--context-window", args.context_window)
    base_url = check_base_url(args.base_url or "http://localhost:8000/")
    if not model_dir.is_dir():
        check_model_dir(model_dir)  # says what a model folder is
    model_files = select_model_files(model_dir)
    config = check_model_dir(model_dir, model_files)
    adapter = Path(args.adapter).resolve() if args.adapter else None
    adapter_files = select_adapter_files(adapter) if adapter is not None and adapter.is_dir() else None
    check_model_type(config, model_dir, names)
    check_not_prequantized(config, model_dir, merging=adapter is not None)
    check_quantization(args.quantization, names)
    warnings: list[str] = []
    from llm2wasm.image.convert.chat import has_chat_template, tokenizer_dir

    template, note = choose_template(
        args.conv_template, config, names, has_chat_template(tokenizer_dir(model_dir, adapter))
    )
    if note:
        warnings.append(note)
    if adapter is not None:
        check_adapter(adapter, model_files, config, warnings)
    if output == model_dir or model_dir in output.parents:
        raise UsageError(f"output {output} is inside the model folder: write the bundle somewhere else")
    check_output(output, args.force, previous_bundle(output))
    model_id = args.model_id or f"{output.name}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model_id):
        raise UsageError(
            f"model id {model_id!r} must be letters, digits, '.', '_' or '-' (it names files and URLs): pass --model-id"
        )
    return ConvertRequest(
        model_dir=model_dir,
        quantization=args.quantization,
        conv_template=template,
        output=output,
        model_id=model_id,
        adapter=adapter,
        prefill_chunk_size=args.prefill_chunk_size,
        context_window=args.context_window,
        base_url=base_url,
        force=args.force,
        repair_wgsl=not getattr(args, "no_wgsl_repair", False),
        link_opt=getattr(args, "link_opt", DEFAULT_LINK_OPT),
        device=getattr(args, "device", "auto"),
        strict_template=getattr(args, "strict_template", False),
        use_lib_cache=not getattr(args, "no_lib_cache", False),
        peft_merge=getattr(args, "peft_merge", False),
        skip_memory_check=getattr(args, "skip_memory_check", False),
        warnings=warnings,
        model_files=model_files,
        adapter_files=adapter_files,
    )


def warn(message: str) -> None:
    print(f"llm2wasm: warning: {message}", file=sys.stderr)


def fingerprint(files: InputFiles, say=None) -> list[tuple[str, int, str]]:
    """What a step's cached output depends on in an input folder: each file's name, size and the
    SHA-256 of its content. Not modification times: a copy that keeps them (`rsync -a`, `tar`) of
    other weights of the same size is other content. Hashing reads every byte once (about 1 GB/s)."""
    total = sum(path.stat().st_size for path in files.files.values())
    if say is not None and total > 2**30:
        say(f"  hashing {total / 2**30:.1f} GiB of {files.folder} (the step cache is keyed on content) …")
    entries = []
    for name, path in sorted(files.files.items()):
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        entries.append((name, path.stat().st_size, digest))
    return entries
