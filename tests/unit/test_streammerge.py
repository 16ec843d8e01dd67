"""The streaming LoRA merge's plan (llm2wasm.image.convert.streammerge), without torch: key mapping,
scaling, PEFT's target matching, and what falls back to the peft merge and why. The merge's arithmetic
against peft's is tests/integration/test_streaming_merge.py (in the image, with torch and peft)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from llm2wasm.image.convert.command import convert_parser
from llm2wasm.image.convert.streammerge import (
    LoraChange,
    Unsupported,
    is_targeted,
    lora_scaling,
    plan_merge,
    unsupported_config,
)

HIDDEN, VOCAB = 8, 32
LINEAR = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file of zeros with these names, dtypes and shapes (headers are all the plan reads)."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * {"F32": 4, "BF16": 2, "F16": 2, "I8": 1}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def base_tensors(layers: int = 2, dtype: str = "BF16", tied: bool = False) -> dict:
    tensors = {"model.embed_tokens.weight": (dtype, [VOCAB, HIDDEN]), "model.norm.weight": (dtype, [HIDDEN])}
    if not tied:
        tensors["lm_head.weight"] = (dtype, [VOCAB, HIDDEN])
    for layer in range(layers):
        for module in LINEAR:
            tensors[f"model.layers.{layer}.{module}.weight"] = (dtype, [HIDDEN, HIDDEN])
    return tensors


def make_base(root: Path, shards: int = 1, tied: bool = False, dtype: str = "BF16", **config) -> Path:
    root.mkdir()
    (root / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": VOCAB, "tie_word_embeddings": tied, **config})
    )
    tensors = base_tensors(tied=tied, dtype=dtype)
    if shards == 1:
        write_safetensors(root / "model.safetensors", tensors)
        return root
    names = sorted(tensors)
    weight_map = {}
    for index in range(shards):
        shard = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = names[index::shards]
        write_safetensors(root / shard, {name: tensors[name] for name in part})
        weight_map.update(dict.fromkeys(part, shard))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def make_adapter(root: Path, modules=None, rank: int = 4, extra: dict | None = None, **config) -> Path:
    root.mkdir()
    modules = modules if modules is not None else [f"model.layers.{i}.{m}" for i in range(2) for m in LINEAR[:2]]
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    (root / "adapter_config.json").write_text(json.dumps(settings))
    tensors = {}
    for module in modules:
        r = (config.get("rank_pattern") or {}).get(module.rsplit(".", 1)[-1], rank)
        tensors[f"base_model.model.{module}.lora_A.weight"] = ("F32", [r, HIDDEN])
        tensors[f"base_model.model.{module}.lora_B.weight"] = ("F32", [HIDDEN, r])
    tensors.update(extra or {})
    write_safetensors(root / "adapter_model.safetensors", tensors)
    return root


def test_each_lora_module_maps_to_its_base_weight_with_alpha_over_r(tmp_path):
    plan = plan_merge(make_base(tmp_path / "base"), make_adapter(tmp_path / "adapter"))
    change = plan.changes["model.layers.1.self_attn.v_proj.weight"]
    assert change == LoraChange(
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
        2.0,
        False,
    )
    assert len(plan.changes) == 4 and list(plan.shards) == ["model.safetensors"] and plan.index is None
    assert plan.summary() == "4 LoRA weights merged, over 1 shard(s)"


def test_a_sharded_checkpoint_keeps_its_index_and_shard_names(tmp_path):
    base = make_base(tmp_path / "base", shards=3)
    (base / "consolidated.safetensors").write_bytes(b"")  # beside the index: not what transformers reads
    plan = plan_merge(base, make_adapter(tmp_path / "adapter"))
    assert sorted(plan.shards) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert plan.index == base / "model.safetensors.index.json"


@pytest.mark.parametrize(
    ("config", "module", "expected"),
    [
        ({"r": 16, "lora_alpha": 32}, "model.layers.0.self_attn.q_proj", (16, 2.0)),
        ({"r": 16, "lora_alpha": 32, "use_rslora": True}, "model.layers.0.self_attn.q_proj", (16, 8.0)),
        ({"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 2}}, "model.layers.0.self_attn.v_proj", (2, 8.0)),
        ({"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 2}}, "model.layers.0.self_attn.q_proj", (8, 2.0)),
        (
            {"r": 8, "lora_alpha": 16, "alpha_pattern": {r"layers\.1\..*q_proj": 4}},
            "model.layers.1.self_attn.q_proj",
            (8, 0.5),
        ),
        (
            {"r": 8, "lora_alpha": 16, "alpha_pattern": {r"layers\.1\..*q_proj": 4}},
            "model.layers.0.self_attn.q_proj",
            (8, 2.0),
        ),
        # a pattern matches a whole name segment: "proj" names no module ending in "q_proj"
        ({"r": 8, "lora_alpha": 16, "rank_pattern": {"proj": 2}}, "model.layers.0.self_attn.q_proj", (8, 2.0)),
    ],
)
def test_scaling_follows_peft(config, module, expected):
    assert lora_scaling(config, module) == expected


@pytest.mark.parametrize(
    ("config", "module", "expected"),
    [
        ({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj", True),
        ({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.k_proj", False),
        ({"target_modules": ["proj"]}, "model.layers.0.self_attn.q_proj", False),  # whole segments only
        ({"target_modules": "all-linear"}, "model.layers.0.mlp.down_proj", True),
        ({"target_modules": r".*\.1\..*q_proj"}, "model.layers.1.self_attn.q_proj", True),
        ({"target_modules": r".*\.1\..*q_proj"}, "model.layers.11.self_attn.q_proj", False),  # fullmatch
        ({"target_modules": ["q_proj"], "layers_to_transform": [1]}, "model.layers.0.self_attn.q_proj", False),
        ({"target_modules": ["q_proj"], "layers_to_transform": 1}, "model.layers.1.self_attn.q_proj", True),
        (
            {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
            "model.layers.0.self_attn.q_proj",
            True,
        ),
        ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj", False),
        ({"target_modules": "all-linear", "modules_to_save": ["lm_head"]}, "lm_head", False),
    ],
)
def test_target_matching_follows_peft(config, module, expected):
    assert is_targeted(config, module) is expected


def test_modules_to_save_tensors_replace_the_base_ones(tmp_path):
    extra = {
        "base_model.model.lm_head.weight": ("F32", [VOCAB, HIDDEN]),
        "base_model.model.model.norm.weight": ("F32", [HIDDEN]),
    }
    adapter = make_adapter(tmp_path / "adapter", extra=extra, modules_to_save=["lm_head", "norm"])
    plan = plan_merge(make_base(tmp_path / "base"), adapter)
    assert plan.changes["lm_head.weight"] == "base_model.model.lm_head.weight"
    assert plan.changes["model.norm.weight"] == "base_model.model.model.norm.weight"
    assert plan.summary() == "4 LoRA weights merged, 2 tensors replaced (modules_to_save), over 1 shard(s)"


def test_fan_in_fan_out_expects_the_transposed_weight(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": VOCAB}))
    write_safetensors(base / "model.safetensors", {"h.0.attn.c_attn.weight": ("F32", [HIDDEN, 3 * HIDDEN])})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["c_attn"], "fan_in_fan_out": True})
    )
    write_safetensors(
        adapter / "adapter_model.safetensors",
        {
            "base_model.model.h.0.attn.c_attn.lora_A.weight": ("F32", [2, HIDDEN]),
            "base_model.model.h.0.attn.c_attn.lora_B.weight": ("F32", [3 * HIDDEN, 2]),
        },
    )
    change = plan_merge(base, adapter).changes["h.0.attn.c_attn.weight"]
    assert change.fan_in_fan_out and change.scaling == 1.0


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"peft_type": "IA3"}, "a IA3 adapter"),
        ({"peft_type": "LORA", "use_dora": True}, "DoRA"),
        ({"peft_type": "LORA", "lora_bias": True}, "lora_bias"),
        ({"peft_type": "LORA", "bias": "all"}, "trained biases"),
        ({"peft_type": "LORA", "layer_replication": [[0, 2]]}, "layer_replication"),
        ({"peft_type": "LORA", "target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
        ({"peft_type": "LORA", "trainable_token_indices": [5]}, "trainable tokens"),
        ({"peft_type": "LORA", "some_future_variant": {"on": 1}}, "some_future_variant"),
    ],
)
def test_what_the_config_asks_beyond_a_plain_lora_falls_back(config, reason):
    assert reason in unsupported_config(config)


def test_a_plain_config_as_peft_saves_it_streams():
    saved = {"peft_type": "LORA", "bias": "none", "megatron_core": "megatron.core", "qalora_group_size": 16,
             "use_dora": False, "loftq_config": {}, "layer_replication": None, "init_lora_weights": False}  # fmt: skip
    assert unsupported_config(saved) is None


def fallback_reason(tmp_path, base_options=None, **adapter_options) -> str:
    base = make_base(tmp_path / "base", **(base_options or {}))
    with pytest.raises(Unsupported) as raised:
        plan_merge(base, make_adapter(tmp_path / "adapter", **adapter_options))
    return str(raised.value)


def test_embedding_lora_falls_back(tmp_path):
    extra = {"base_model.model.model.embed_tokens.lora_embedding_A": ("F32", [4, VOCAB])}
    assert "embedding LoRA" in fallback_reason(tmp_path, extra=extra)


def test_dora_magnitudes_fall_back(tmp_path):
    extra = {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": ("F32", [HIDDEN])}
    assert "DoRA" in fallback_reason(tmp_path, extra=extra)


def test_tied_embeddings_the_adapter_changes_fall_back(tmp_path):
    extra = {"base_model.model.model.embed_tokens.weight": ("F32", [VOCAB, HIDDEN])}
    reason = fallback_reason(tmp_path, {"tied": True}, extra=extra, modules_to_save=["embed_tokens"])
    assert "tied embeddings" in reason


def test_a_module_the_checkpoint_lacks_falls_back(tmp_path):
    reason = fallback_reason(tmp_path, {"tied": True}, modules=["lm_head"], target_modules=["lm_head"])
    assert "no lm_head.weight" in reason


def test_lora_weights_target_modules_do_not_select_fall_back(tmp_path):
    reason = fallback_reason(tmp_path, modules=["model.layers.0.mlp.down_proj"])
    assert "do not select" in reason


def test_a_rank_the_config_does_not_give_falls_back(tmp_path):
    assert "rank 4" in fallback_reason(tmp_path, r=8, extra={})


def test_a_quantized_base_falls_back(tmp_path):
    assert "quantized" in fallback_reason(tmp_path, {"quantization_config": {"quant_method": "gptq"}})


def test_an_integer_weight_falls_back(tmp_path):
    assert "I8 (a quantized base?)" in fallback_reason(tmp_path, {"dtype": "I8"})


def test_a_pickled_base_or_adapter_falls_back(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(Unsupported, match="pickle"):
        plan_merge(base, adapter)
    (adapter / "adapter_model.bin").rename(adapter / "adapter_model.safetensors")
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    with pytest.raises(Unsupported, match="not safetensors"):
        plan_merge(base, adapter)


def test_peft_merge_is_an_option_of_convert():
    args = ["model", "-q", "q4f16_1", "-o", "out", "--adapter", "lora"]
    assert convert_parser().parse_args(args).peft_merge is False
    assert convert_parser().parse_args([*args, "--peft-merge"]).peft_merge is True
