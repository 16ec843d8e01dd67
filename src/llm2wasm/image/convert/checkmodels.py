"""Models for the browser and chat checks: tiny models (llm2wasm.image.convert.tiny) made decisive,
so that a browser's greedy tokens can be compared with transformers' (llm2wasm.image.convert.reference)
id for id, and whose tokens show what each test is about (a tied head, a rope scaling, a LoRA's merge,
a chat template).

Apart from llm2wasm.image.convert.tiny: a seed is searched for until the continuation is decisive,
which needs the reference; the selftest needs neither.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from llm2wasm.image.convert.reference import greedy_reference
from llm2wasm.image.convert.tiny import (
    CHAT_SPECIAL,
    CHAT_SYSTEM,
    CHAT_USER,
    CHAT_WORDS,
    WORDS,
    make_lora_adapter,
    make_tiny_model,
    make_tokenizer,
)

BROWSER_CHECK_PROMPT = "hello world the model runs in"


def chat_prompt(model_dir: Path) -> str:
    """transformers' rendering of the chat check's turn: its system message and user message."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": CHAT_USER}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def make_chat_check_model(out: Path, steps: int = 8, min_margin: float = 1.0) -> dict:
    """A tiny Llama-architecture chat model trained (so to speak) with ChatML: its tokenizer has a
    ChatML chat template with a default system message of its own. Decisive on the chat turn
    transformers renders with `apply_chat_template(..., add_generation_prompt=True)`, and it
    stops on nothing within `steps` (no end of sequence, no <|im_end|>)."""
    import torch
    from transformers import AutoModelForCausalLM

    vocab_size = 3 + len(WORDS) + len(CHAT_SPECIAL) + len(CHAT_WORDS)
    for seed in range(50):
        model_dir = make_tiny_model(out, "llama", seed=seed, vocab_size=vocab_size)
        make_tokenizer(out, chat=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        with torch.no_grad():
            for parameter in decisive_scale_targets(model):
                parameter.mul_(60.0)
        model.save_pretrained(str(model_dir), safe_serialization=True)
        prompt = chat_prompt(model_dir)
        reference = greedy_reference(model_dir, prompt, steps)
        chosen = reference["reference_ids"]
        stops = {2, 3 + len(WORDS) + 1}  # </s>, <|im_end|>
        if reference["min_margin"] >= min_margin and not stops & set(chosen) and len(set(chosen)) >= 3:
            return {**reference, "seed": seed, "system": CHAT_SYSTEM, "user": CHAT_USER}
    raise RuntimeError(f"no seed below 50 gives a chat continuation with margins >= {min_margin}")


def rope_type(config) -> str:
    return (config.to_dict().get("rope_parameters") or {}).get("rope_type", "default")


# How a browser-check model's projections are scaled where its test is about more than the
# blocks' arithmetic (check_model_scales), by their names in the matrix's families.
SHARP_ATTENTION = {"q_proj": 10.0, "k_proj": 10.0, "qkv_proj": 10.0}
TIED_BLOCK_OUTPUTS = {"o_proj": 30.0, "down_proj": 3.0}


def check_model_scales(model) -> list[tuple[object, float]]:
    """What to scale, and by how much, so that the tokens show what the test is about.

    Tied embeddings: in a tiny random model the blocks add little to the residual stream, which
    stays close to the last input token's embedding, and a head tied to that embedding picks the
    input token again, every step. The attention and MLP outputs scaled up outweigh the embedding,
    as in a trained model.
    Tied embeddings and rope scaling: queries and keys scaled up make attention sharp, so which
    earlier token it reads depends on the position (the rope, scaled or not), not only on the last
    token; with the near-uniform attention of random weights a rope scaling changes no token. A
    fused qkv_proj (Phi-3) scales the values too, which changes nothing the test compares."""
    tied = bool(model.config.tie_word_embeddings)
    scales = {}
    if tied or rope_type(model.config) != "default":
        scales.update(SHARP_ATTENTION)
    if tied:
        scales.update(TIED_BLOCK_OUTPUTS)
    if not scales:
        return []
    scaled = [
        (module.weight, scales[name.rsplit(".", 1)[-1]])
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in scales
    ]
    if not scaled:
        raise RuntimeError(f"none of {', '.join(scales)} in {type(model).__name__}")
    return scaled


def without_rope_scaling(model_dir: Path, out: Path) -> Path:
    """A copy of the model at `model_dir` with the same weights and its rope scaling dropped (the
    plain rope of the same base): what a conversion that ignored the scaling would compute."""
    import shutil

    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    rope = config["rope_parameters"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def quiet_filler_rows(model, words: int) -> None:
    """The output head's rows of the filler words (ids from `words` on) scaled down to a tenth: among
    tens of thousands of random rows the best and the runner-up are close, and no seed gives a
    decisive continuation; quieted, the words win as in the small vocabulary. The sampler still
    takes the softmax of every logit and sorts every probability, which is what the size costs."""
    if model.config.tie_word_embeddings:
        raise ValueError("a padded vocabulary needs an untied output head (the filler rows are scaled there)")
    model.get_output_embeddings().weight[words:].mul_(0.1)


def decisive_scale_targets(model) -> list:
    """What to scale to scale the logits: the output head, or where it is tied to the input
    embeddings (scaling those would drown every layer in the input token) the final norm's weight
    and bias."""
    if not model.config.tie_word_embeddings:
        return [model.get_output_embeddings().weight]
    base = model.base_model
    norm = getattr(base, "norm", None) or getattr(base, "final_layer_norm", None)
    return [p for p in (norm.weight, getattr(norm, "bias", None)) if p is not None]


def make_browser_check_model(
    out: Path,
    steps: int = 8,
    min_margin: float = 1.0,
    architecture: str = "llama",
    quantization: str = "q0f32",
    vocab_size: int | None = None,
    also_decisive_for: tuple[str, ...] = (),
    first_seed: int = 0,
) -> dict:
    """A tiny model of `architecture` whose greedy continuation is decisive, for comparing a
    browser's tokens with transformers' id for id: its vocabulary is exactly the tokenizer's (no id
    the tokenizer cannot name), its output head is scaled up so the best token beats the runner-up
    by at least `min_margin` logits at every step (float32 on a GPU differs from the CPU by ~1e-4),
    and the continuation holds no end-of-sequence token (so both sides generate all `steps`) and at
    least three different tokens (a stuck repetition would prove little). `vocab_size` makes the
    vocabulary that large (filler words after the tokenizer's own), as real models' are: what a
    runner's sampler costs grows with it. `also_decisive_for`: other quantizations whose references
    must be as decisive (their tokens may differ), for a model converted to several. Seeds are tried
    from `first_seed` on (a caller that knows the first one that works skips the search)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer_size = vocab_size
    vocab_size = vocab_size or len(WORDS) + 3
    for seed in range(first_seed, first_seed + 50):
        model_dir = make_tiny_model(out, architecture, seed=seed, vocab_size=vocab_size, tokenizer_size=tokenizer_size)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        with torch.no_grad():
            for parameter in decisive_scale_targets(model):
                parameter.mul_(60.0)
            for parameter, scale in check_model_scales(model):
                parameter.mul_(scale)
            if tokenizer_size is not None:
                quiet_filler_rows(model, len(WORDS) + 3)
        model.save_pretrained(str(model_dir), safe_serialization=True)
        reference = greedy_reference(model_dir, BROWSER_CHECK_PROMPT, steps, quantization)
        chosen = reference["reference_ids"]
        if not (reference["min_margin"] >= min_margin and 2 not in chosen and len(set(chosen)) >= 3):
            continue
        others = [greedy_reference(model_dir, BROWSER_CHECK_PROMPT, steps, other) for other in also_decisive_for]
        if any(other["min_margin"] < min_margin or 2 in other["reference_ids"] for other in others):
            continue
        extra = {}
        scaling = rope_type(model.config)
        if scaling != "default":  # the tokens must show whether the scaling was applied
            with tempfile.TemporaryDirectory(prefix="llm2wasm-unscaled-") as tmp:
                plain = greedy_reference(without_rope_scaling(model_dir, Path(tmp) / "m"), BROWSER_CHECK_PROMPT,
                                         steps, quantization)["reference_ids"]  # fmt: skip
            if plain == chosen:
                continue
            extra = {"rope_type": scaling, "without_rope_scaling_ids": plain}
        return {**reference, "seed": seed, "architecture": architecture, **extra}
    raise RuntimeError(
        f"no seed from {first_seed} to {first_seed + 49} gives a continuation with margins >= {min_margin}"
    )


def make_browser_check_adapter(
    model_dir: Path,
    adapter_dir: Path,
    steps: int = 8,
    min_margin: float = 1.0,
    quantization: str = "q0f32",
    first_seed: int = 1,
) -> dict:
    """A LoRA on every linear layer of the browser-check model at `model_dir` whose merge changes
    the greedy tokens, and stays decisive; the reference is transformers' greedy continuation of
    the model merged by peft (llm2wasm's `--peft-merge`: merge_and_unload on the whole model), with the
    weights a bundle of `quantization` holds, so that a bundle `convert --adapter` merged tensor by tensor
    is compared with peft's merge. Seeds are tried from `first_seed` (another start gives
    another fine-tune of the same base)."""
    import shutil

    from llm2wasm.image.convert.merge import merge_adapter

    base_ids = greedy_reference(model_dir, BROWSER_CHECK_PROMPT, steps, quantization)["reference_ids"]
    for seed in range(first_seed, first_seed + 49):
        # scale 20: activations in the thousands after the first layer, as the "massive
        # activations" of real LLMs (where the bf16 rounding of an f32 bundle's weights shows)
        make_lora_adapter(model_dir, adapter_dir, seed=seed, target_modules="all-linear", scale=20.0)
        with tempfile.TemporaryDirectory(prefix="llm2wasm-merged-") as tmp:
            merged = Path(tmp) / "merged"
            merge_adapter(model_dir, adapter_dir, merged, Path(tmp) / "merge.log", method="peft")
            reference = greedy_reference(merged, BROWSER_CHECK_PROMPT, steps, quantization)
        chosen = reference["reference_ids"]
        decisive = reference["min_margin"] >= min_margin and 2 not in chosen and len(set(chosen)) >= 3
        if decisive and chosen != base_ids:
            return {**reference, "adapter_seed": seed, "base_reference_ids": base_ids}
        shutil.rmtree(adapter_dir)
    raise RuntimeError(f"no adapter seed from {first_seed} on changes the greedy tokens and stays decisive")
