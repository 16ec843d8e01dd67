"""The model's config as mlc_llm reads it, and a parity guard against what transformers reads.

transformers 5 writes `rope_parameters: {rope_theta, rope_type, ...}` (per layer type for some
families), `dtype` and `layer_types`, where 4.x wrote top-level `rope_theta`, `rope_scaling`,
`torch_dtype`. mlc_llm's model configs read the 4.x keys and fall back silently where they are
missing (LlamaConfig: rope base 10000) or fail (QWen2Config: `rope_theta` required). So:

* transformers itself (`AutoConfig`, which reads both dialects) says what the model is;
* the installed mlc_llm's config class for the `model_type` (its dataclass fields and the names its
  `__post_init__` reads) says which 4.x keys to write — the mapping below is the one place where a
  transformers value becomes an mlc_llm key, for every family;
* a rope type the installed model does not implement is refused before any step runs;
* after gen_config, `parity_mismatches` compares the hyper-parameters mlc_llm will compile with
  (`mlc-chat-config.json` `model_config`) with transformers' values.

The adapted config.json goes into the workspace's source view only, never into the user's folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.mlcprobe import (
    ROPE_TYPE_ALIASES,
    MlcConfigReads,
    probe_installed_mlc,
    probe_reads_output_head,
)


def untied_head_problem(model_type: str, hf: HfView, reads_lm_head: bool | None) -> str | None:
    """The refusal when the checkpoint has an output head of its own that mlc_llm would not read
    (mlc_llm's starcoder2 and gpt2 loaders take the embeddings for it, whatever the config says)."""
    if hf.config.get("tie_word_embeddings", True) or reads_lm_head in (True, None):
        return None
    return (
        f"tie_word_embeddings = false: this {model_type} checkpoint has an output head (lm_head.weight) of its own, "
        f"but the installed mlc_llm's {model_type} weight loader never reads it and uses the input embeddings "
        "as the output head, so the bundle would compute another model. Convert a checkpoint with tied "
        "embeddings, or use an mlc_llm whose loader reads lm_head.weight"
    )


# ------------------------------------------------------------------ what transformers reads
@dataclass(frozen=True)
class HfView:
    """The hyper-parameters transformers reads from a model folder (either dialect)."""

    config: dict  # AutoConfig(...).to_dict(): transformers 5's normal form
    rope_theta: float | None
    rope_type: str
    rope_params: dict  # the scaling parameters (no rope_theta / rope_type / partial_rotary_factor)
    partial_rotary_factor: float | None
    local_rope_theta: float | None  # the sliding layers' base, where it has one of its own
    sliding_window: int | None  # only when some layer really uses it


def hf_view(model_dir: Path) -> HfView:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model_dir)).to_dict()
    except (ValueError, KeyError, OSError) as error:
        import transformers

        first = str(error).strip().split("\n")[0]
        raise UsageError(
            f"transformers {transformers.__version__} cannot read {model_dir}/config.json: {first}"
        ) from None
    return view_of(config)


def view_of(config: dict) -> HfView:
    rope = config.get("rope_parameters") or {}
    local = None
    if "full_attention" in rope or "sliding_attention" in rope:  # per layer type (Gemma 3)
        local = (rope.get("sliding_attention") or {}).get("rope_theta")
        rope = rope.get("full_attention") or rope.get("sliding_attention") or {}
    if not rope and config.get("rope_theta") is not None:  # a config transformers did not normalise
        rope = {"rope_theta": config["rope_theta"], **(config.get("rope_scaling") or {})}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    rope_type = ROPE_TYPE_ALIASES.get(rope_type, rope_type)
    params = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type", "partial_rotary_factor")}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", config.get("rotary_pct")))
    layer_types = config.get("layer_types")
    if layer_types is not None:
        sliding = config.get("sliding_window") if "sliding_attention" in layer_types else None
    else:
        sliding = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    theta = rope.get("rope_theta")
    return HfView(
        config=config,
        rope_theta=float(theta) if theta is not None else None,
        rope_type=rope_type,
        rope_params=params,
        partial_rotary_factor=partial,
        local_rope_theta=float(local) if local is not None and local != theta else None,
        sliding_window=sliding,
    )


# ------------------------------------------------------------------ the mapping
def mlc_config(raw: dict, hf: HfView, reads: MlcConfigReads) -> tuple[dict, list[str]]:
    """config.json as the installed mlc_llm reads it: `raw` plus the 4.x keys its config class
    reads, from transformers' values. Returns it with a line per key written. A rope type or
    variant the installed model does not implement is a UsageError naming both."""
    model_type = raw.get("model_type", "?")
    if hf.rope_type != "default" and hf.rope_type not in reads.rope_types:
        supported = ", ".join(["default", *sorted(reads.rope_types)])
        raise UsageError(
            f"rope_parameters.rope_type = {hf.rope_type!r}: the installed mlc_llm's {model_type} model does not "
            f"implement it (it implements: {supported}); converting would compute another model. "
            "Use a model whose rope type is among these, or an mlc_llm that implements it"
        )
    if hf.local_rope_theta is not None:
        raise UsageError(
            f"rope_parameters: the sliding-attention layers use rope_theta {hf.local_rope_theta:g} and the full-"
            f"attention layers {hf.rope_theta:g}; the installed mlc_llm's {model_type} model uses one rope base for "
            "every layer, so converting would compute another model"
        )
    scaling = None
    if hf.rope_type != "default":
        scaling = {**hf.rope_params, "rope_type": hf.rope_type, "type": hf.rope_type}
    dtype = hf.config.get("dtype") or hf.config.get("torch_dtype")
    wanted = {
        "rope_theta": hf.rope_theta,
        "rope_scaling": scaling,
        "partial_rotary_factor": hf.partial_rotary_factor,
        "rotary_pct": hf.partial_rotary_factor,
        "torch_dtype": str(dtype).removeprefix("torch.") if dtype else None,
        "head_dim": hf.config.get("head_dim"),
        "sliding_window": hf.sliding_window,
    }
    out, written = dict(raw), []
    for key, value in wanted.items():
        if value is None or not reads.reads(key) or out.get(key) == value:
            continue
        if key == "sliding_window" and key in out:
            continue  # the folder's own value, which hf_view read
        out[key] = value
        written.append(f"{key} = {json.dumps(value)}")
    return out, written


# ------------------------------------------------------------------ the parity guard
# field -> the mlc_llm model_config keys that may hold it (transformers' values: _hf_values)
_ALIASES = {
    "rope base": ("position_embedding_base", "rope_theta", "rotary_emb_base"),
    "layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "hidden size": ("hidden_size", "n_embd", "d_model"),
    "intermediate size": ("intermediate_size", "ffn_hidden_size", "n_inner"),
    "attention heads": ("num_attention_heads", "n_head"),
    "KV heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "vocab size": ("vocab_size",),
    "norm epsilon": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps"),
    "tied embeddings": ("tie_word_embeddings",),
    "sliding window": ("sliding_window_size", "sliding_window"),
    "rotary fraction": ("partial_rotary_factor", "rotary_pct"),
    "rope scaling": ("rope_scaling",),
}
# fields every family's mlc_llm config has: absent means mlc_llm did not read them
_REQUIRED = {"rope base", "layers", "hidden size", "attention heads", "vocab size"}


def _hf_values(hf: HfView) -> dict:
    c = hf.config
    heads = c.get("num_attention_heads")
    values = {
        "rope base": hf.rope_theta,
        "layers": c.get("num_hidden_layers"),
        "hidden size": c.get("hidden_size"),
        "intermediate size": c.get("intermediate_size"),
        "attention heads": heads,
        "KV heads": c.get("num_key_value_heads") or heads,
        "head_dim": c.get("head_dim") or (c["hidden_size"] // heads if heads and c.get("hidden_size") else None),
        "vocab size": c.get("vocab_size"),
        "norm epsilon": next((c[k] for k in _ALIASES["norm epsilon"] if c.get(k) is not None), None),
        "tied embeddings": c.get("tie_word_embeddings"),
        "sliding window": hf.sliding_window,
        "rotary fraction": hf.partial_rotary_factor,
        "rope scaling": {"rope_type": hf.rope_type, **hf.rope_params} if hf.rope_type != "default" else None,
    }
    return values


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _no_window(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and value <= 0)


def parity_mismatches(model_config: dict, hf: HfView) -> list[str]:
    """Each hyper-parameter where mlc_llm's model_config differs from transformers', as
    'field: transformers X, mlc_llm Y'. Empty when they agree."""
    problems = []
    for field, hf_value in _hf_values(hf).items():
        key = next((k for k in _ALIASES[field] if k in model_config), None)
        mlc_value = model_config.get(key) if key else None
        if field == "sliding window":
            if _no_window(hf_value) and _no_window(mlc_value):
                continue
        elif field == "rope scaling":
            mismatch = _rope_scaling_mismatch(hf_value, mlc_value)
            if mismatch:
                problems.append(f"rope scaling: transformers {mismatch[0]}, mlc_llm {mismatch[1]}")
            continue
        elif field == "rotary fraction" and key is None:
            if hf_value is None or _same(hf_value, 1.0):
                continue
        elif hf_value is None or (key is None and field not in _REQUIRED):
            continue
        if key is None or not _same(hf_value, mlc_value):
            where = f"{key} = {json.dumps(mlc_value)}" if key else "not read"
            problems.append(f"{field}: transformers {json.dumps(hf_value)}, mlc_llm {where}")
    return problems


def longrope_beyond_original_context(hf: HfView, context_window: int | None) -> str | None:
    """The warning for a `longrope` model (Phi-3.5, Phi-4 mini) compiled for a context longer than
    its original one. TVM's KV cache (relax/frontend/nn/llm/position_embedding.py) chooses the long
    factors by how many tokens one forward pass holds (a prefill chunk longer than the original
    context), not by position: decoding past the original context uses the short factors, where
    transformers computes the whole sequence with the long ones once it is longer (Phi-3's
    generation even drops its cache to do so)."""
    if hf.rope_type != "longrope" or not context_window:
        return None
    original = hf.rope_params.get("original_max_position_embeddings") or hf.config.get(
        "original_max_position_embeddings"
    )
    if not original or context_window <= original:
        return None
    return (
        f"longrope: this bundle's context window is {context_window} tokens, but beyond {original} (the model's "
        "original context) it computes otherwise than transformers: the installed TVM's KV cache picks longrope's "
        "long factors by the number of tokens in one forward pass, not by position, so tokens past "
        f"{original} are decoded with the short factors, where transformers computes the whole sequence with the "
        f"long ones once it is longer. Up to {original} "
        f"tokens both agree; --context-window {original} keeps the bundle there"
    )


def _rope_scaling_mismatch(hf_value: dict | None, mlc_value) -> tuple[str, str] | None:
    mlc = mlc_value if isinstance(mlc_value, dict) and mlc_value else None
    mlc_type = (mlc or {}).get("rope_type") or (mlc or {}).get("type")
    if hf_value is None:
        return None if mlc is None else ("none", json.dumps(mlc))
    if mlc is None or ROPE_TYPE_ALIASES.get(mlc_type, mlc_type) != hf_value["rope_type"]:
        return json.dumps(hf_value), json.dumps(mlc_value)
    differing = [k for k, v in hf_value.items() if k != "rope_type" and k in mlc and not _same(v, mlc[k])]
    missing = [k for k in hf_value if k != "rope_type" and k not in mlc]
    if differing or missing:
        return json.dumps(hf_value), json.dumps(mlc)
    return None


class ModelConfigAdapter:
    """Adapts a model folder's config.json for the installed mlc_llm; the installed config class
    is read once per model_type."""

    def __init__(self):
        self._reads: dict[str, MlcConfigReads] = {}

    def reads(self, model_type: str) -> MlcConfigReads:
        if model_type not in self._reads:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            self._reads[model_type] = probe_installed_mlc(model_type, set(ROPE_INIT_FUNCTIONS))
        return self._reads[model_type]

    def adapt(self, model_dir: Path) -> tuple[dict, list[str], HfView]:
        """The config.json to hand mlc_llm for `model_dir`, a line per key written, and
        transformers' view of it (for the parity guard). UsageError for what cannot be mapped
        faithfully."""
        raw = json.loads((model_dir / "config.json").read_text())
        hf = hf_view(model_dir)
        config, written = mlc_config(raw, hf, self.reads(raw.get("model_type", "")))
        return config, written, hf

    def check(self, model_dir: Path) -> None:
        config, _, hf = self.adapt(model_dir)
        if not hf.config.get("tie_word_embeddings", True):  # only an untied head can be dropped
            model_type = config.get("model_type", "")
            problem = untied_head_problem(model_type, hf, probe_reads_output_head(model_type, config))
            if problem:
                raise UsageError(problem)
