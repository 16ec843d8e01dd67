"""The plan of a streaming LoRA merge: which tensor of the base checkpoint gets which change, read
from safetensors headers and adapter_config.json alone (standard library only; the merge itself,
tensor by tensor with torch, is llm2wasm.image.convert.merge).

What PEFT's merge_and_unload computes for a LoRA adapter (peft/tuners/lora/layer.py, Linear.merge
and get_delta_weight; config.py; utils/save_and_load.py for the key names), restated: an adapter file
holds `base_model.model.<module>.lora_A.weight` (r x in) and `...lora_B.weight` (out x r) for each
adapted Linear `<module>`, whose weight becomes W + scaling * B @ A (transposed where fan_in_fan_out:
GPT-2's Conv1D stores in x out), with scaling lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora,
r and lora_alpha per module from rank_pattern / alpha_pattern where a pattern matches its name. A
module of modules_to_save is saved whole (`base_model.model.<module>.<param>`) and replaces the base's.

Anything else is the peft merge's (the caller falls back to it, saying why): other PEFT types, DoRA,
LoRA on embeddings or convolutions, lora_bias, trained biases, replicated layers, LoRA on parameters,
trainable tokens, a quantized or pickled checkpoint, and an adapter touching tied embeddings.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from llm2wasm.image.convert.adapterconfig import ALL_LINEAR, layer_segment, name_end
from llm2wasm.image.convert.inputs import safetensors_header

ADAPTER_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# adapter_config.json keys the merge reads, or that only say how the adapter was trained or
# initialised (its saved A and B are what counts) and change nothing in the merged weights
UNDERSTOOD_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out",
    "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "bias", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "runtime_config", "megatron_core", "qalora_group_size", "ensure_weight_tying",
}  # fmt: skip
# keys whose non-empty value is a LoRA variant the streaming merge does not compute, by what it is
VARIANT_KEYS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a LoRA bias (lora_bias)",
    "layer_replication": "replicated layers (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "megatron_config": "Megatron layers (megatron_config)",
}


class Unsupported(Exception):
    """What the streaming merge does not cover, in a phrase (the peft merge runs instead)."""


@dataclass
class LoraChange:
    a_key: str
    b_key: str
    scaling: float
    fan_in_fan_out: bool


@dataclass
class MergePlan:
    """Shards to write (output name -> source file), the index to copy, and per base tensor what
    replaces it: a LoraChange, or the name of an adapter tensor (modules_to_save)."""

    shards: dict[str, Path]
    index: Path | None
    adapter_file: Path
    changes: dict[str, LoraChange | str] = field(default_factory=dict)

    def summary(self) -> str:
        lora = sum(isinstance(change, LoraChange) for change in self.changes.values())
        whole = len(self.changes) - lora
        saved = f", {whole} tensors replaced (modules_to_save)" if whole else ""
        return f"{lora} LoRA weights merged{saved}, over {len(self.shards)} shard(s)"


def pattern_key(patterns, module: str) -> str | None:
    """The first rank_pattern / alpha_pattern key naming `module` (PEFT's get_pattern_key: the key,
    a regular expression, matches the whole name or its end after a dot)."""
    for key in patterns:
        if re.match(name_end(key), module):
            return key
    return None


def module_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    ranks = config.get("rank_pattern") or {}
    alphas = config.get("alpha_pattern") or {}
    r_key, alpha_key = pattern_key(ranks, module), pattern_key(alphas, module)
    r = ranks[r_key] if r_key is not None else config.get("r", 8)
    alpha = alphas[alpha_key] if alpha_key is not None else config.get("lora_alpha", 8)
    return int(r), float(alpha)


def lora_scaling(config: dict, module: str) -> tuple[int, float]:
    """The rank PEFT gives `module` and the scaling of its B @ A."""
    r, alpha = module_rank_alpha(config, module)
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def layer_index(module: str, layers_pattern) -> int | None:
    """The index of the layer `module` is in: the first numbered segment (after `layers_pattern`)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(layer_segment(p), module))), None)
    return int(match.group("idx")) if match else None


def is_targeted(config: dict, module: str) -> bool:
    """Whether PEFT puts a LoRA layer on `module` (tuners_utils.check_target_module_exists); with
    "all-linear" every module is (which ones are Linear, the adapter's own weights say)."""
    excluded = config.get("exclude_modules")
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, module):
                return False
        elif module in excluded or any(module.endswith(f".{name}") for name in excluded):
            return False
    # names, not patterns (PEFT compares them with endswith)
    if any(re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", module) for name in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if targets == ALL_LINEAR or (isinstance(targets, list) and targets == [ALL_LINEAR]):
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{name}") for name in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    index = layer_index(module, config.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def unsupported_config(config: dict) -> str | None:
    """Why adapter_config.json needs the peft merge, or None."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        return f"a {peft_type or 'typeless'} adapter (the streaming merge computes LoRA)"
    for key, what in VARIANT_KEYS.items():
        if config.get(key):
            return what
    if str(config.get("bias") or "none") != "none":
        return f"trained biases (bias={config['bias']!r})"
    unknown = sorted(key for key, value in config.items() if key not in UNDERSTOOD_KEYS and key not in VARIANT_KEYS
                     and value not in (None, False, {}, [], ""))  # fmt: skip
    if unknown:
        return f"adapter_config.json sets {', '.join(unknown)}, which the streaming merge does not know"
    return None


def checkpoint_shards(model_dir: Path) -> tuple[dict[str, Path], Path | None]:
    """The safetensors files transformers would read (the index's shards, or the single file)."""
    indexes = sorted(model_dir.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map") or {}
        return {name: model_dir / name for name in sorted(set(weight_map.values()))}, indexes[0]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise Unsupported("the base checkpoint is not safetensors")
    if len(files) > 1:
        raise Unsupported(f"{len(files)} safetensors files and no index: which ones transformers reads is unclear")
    return {files[0].name: files[0]}, None


def tied(config: dict) -> bool:
    """Whether the output head is the input embedding (transformers' default where config.json is silent)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


def embedding_like(name: str, shape: list[int], vocab_size) -> bool:
    return any(part in name for part in ("embed", "lm_head", "wte")) or (bool(shape) and shape[0] == vocab_size)


def unsupported_tensors(keys) -> str | None:
    """Why the adapter file's tensors need the peft merge (LoRA on embeddings, DoRA, a base layer
    saved whole, names PEFT does not save), or None."""
    for key in sorted(keys):
        if not key.startswith(ADAPTER_PREFIX):
            return f"the adapter's tensor {key} is not named as PEFT saves a model's"
        if re.search(r"\.lora_embedding_[AB]\b", key):
            return f"embedding LoRA tensors ({key})"
        if "lora_magnitude_vector" in key:
            return f"DoRA tensors ({key})"
        if re.search(r"\.lora_[A-Za-z_]+\.", key) and not key.endswith(tuple(LORA_SUFFIXES)):
            return f"LoRA tensors of another kind ({key})"
    for key in sorted(keys):
        if ".base_layer." in key:
            return f"the adapter saves a base layer whole ({key}): a targeted or resized embedding"
    return None


def split_adapter_key(key: str) -> tuple[str, str | None]:
    """(base tensor or module name, "A" / "B" / None for a whole tensor) of an adapter file's key."""
    name = key.removeprefix(ADAPTER_PREFIX)
    for suffix, which in LORA_SUFFIXES.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), which
    return name.replace(".modules_to_save.", "."), None


def plan_merge(model_dir: Path, adapter_dir: Path) -> MergePlan:
    """What a streaming merge of `adapter_dir` into `model_dir` writes; Unsupported if it cannot."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    reason = unsupported_config(config)
    if reason:
        raise Unsupported(reason)
    model_config = json.loads((model_dir / "config.json").read_text())
    if model_config.get("quantization_config"):
        raise Unsupported("a quantized base checkpoint")
    adapter_file = adapter_dir / ADAPTER_WEIGHTS
    if not adapter_file.is_file():
        raise Unsupported("the adapter's weights are a pickle (adapter_model.bin), not safetensors")
    shards, index = checkpoint_shards(model_dir)
    base: dict[str, dict] = {}
    for path in shards.values():
        base.update({k: v for k, v in safetensors_header(path).items() if k != "__metadata__"})
    adapter = {k: v for k, v in safetensors_header(adapter_file).items() if k != "__metadata__"}
    plan = MergePlan(shards, index, adapter_file)
    lora: dict[str, dict[str, str]] = {}
    reason = unsupported_tensors(adapter)
    if reason:
        raise Unsupported(reason)
    for key in sorted(adapter):
        name, which = split_adapter_key(key)
        if which:
            lora.setdefault(name, {})[which] = key
            continue
        if not config.get("modules_to_save"):
            raise Unsupported(f"the adapter holds {key} without modules_to_save in its config")
        if name not in base:
            raise Unsupported(f"the adapter's {key} replaces {name}, which the checkpoint does not hold")
        if base[name]["shape"] != adapter[key]["shape"]:
            raise Unsupported(f"{key} is {adapter[key]['shape']}, {name} {base[name]['shape']} (a resized vocabulary?)")
        plan.changes[name] = key
    for module, keys in sorted(lora.items()):
        plan.changes[f"{module}.weight"] = lora_change(config, module, keys, base, adapter)
    vocab = model_config.get("vocab_size") or (model_config.get("text_config") or {}).get("vocab_size")
    if tied(model_config):
        touched = [name for name in plan.changes if embedding_like(name, base[name]["shape"], vocab)]
        if touched:
            raise Unsupported(f"tied embeddings, and the adapter changes {touched[0]}")
    return plan


def lora_change(config: dict, module: str, keys: dict[str, str], base: dict, adapter: dict) -> LoraChange:
    if set(keys) != {"A", "B"}:
        raise Unsupported(f"{module} has lora_{'A' if 'B' in keys else 'B'} alone")
    if not is_targeted(config, module):
        raise Unsupported(f"the adapter holds LoRA weights for {module}, which its target_modules do not select")
    weight = base.get(f"{module}.weight")
    if weight is None:
        raise Unsupported(f"the adapter targets {module}, and the checkpoint has no {module}.weight")
    a_shape, b_shape, w_shape = adapter[keys["A"]]["shape"], adapter[keys["B"]]["shape"], weight["shape"]
    if len(w_shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2:
        raise Unsupported(f"{module} is not a Linear layer (convolution LoRA?)")
    if weight["dtype"] not in FLOAT_DTYPES:
        raise Unsupported(f"{module}.weight is {weight['dtype']} (a quantized base?)")
    r, scaling = lora_scaling(config, module)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    out_in = [b_shape[0], a_shape[1]]
    expected = out_in[::-1] if fan_in_fan_out else out_in
    if a_shape[0] != b_shape[1] or list(w_shape) != expected:
        raise Unsupported(f"{module}: A {a_shape} and B {b_shape} do not fit its weight {w_shape}")
    if a_shape[0] != r:
        raise Unsupported(f"{module} has rank {a_shape[0]}, and the config (r, rank_pattern) says {r}")
    return LoraChange(keys["A"], keys["B"], scaling, fan_in_fan_out)


def peak_memory_mib() -> float:
    """This process's peak resident memory so far (ru_maxrss, KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
