"""transformers' reference for a bundle: what a model computes on the CPU with the weights a bundle
of a quantization holds (bf16-rounded for q0f32, mlc_llm's group quantization for q4f32_1, the same
in float16 for q0f16 and q4f16_1, which also compute in float16), and its greedy continuation of a
prompt with the margin of each token.

What a browser's tokens are compared with, id for id. Apart from the models themselves
(llm2wasm.image.convert.tiny, llm2wasm.image.convert.checkmodels): this emulates the bundle, and
says nothing of how a model is made.
"""

from __future__ import annotations

from pathlib import Path


def logits(model, ids):
    """A model's float32 logits for one sequence of ids (the selftest compares them across a merge)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


def round_as_f32_bundle_stores(model) -> None:
    """Round every weight of `model` to bfloat16 in place (round to nearest even), as an f32 bundle
    holds them: mlc_llm's convert_weight writes float32 tensors to tensor-cache.json's shards in
    TVM's "f32-to-bf16" encoding (tvm.contrib.tvmjs.dump_tensor_cache), which WebLLM widens back to
    float32 on load. A q0f32 bundle therefore computes in float32 with bf16-valued weights; where
    activations reach the thousands (a LoRA merged at 20x), that rounding alone moves logits by more
    than a greedy margin (docs/MODELS.md), so the reference must compute with the same weights."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).to(parameter.dtype))


# mlc_llm's q4f32_1 (mlc_llm/quantization/quantization.py, GroupQuantize): int4 in groups of 32
# along the input dimension, symmetric around 7, every linear layer (the output head included) and
# the embedding quantized, float32 scales.
Q4_GROUP_SIZE = 32
Q4_MAX_INT = 7
# The f32 quantizations a reference can compute with (as_bundle_holds): both run on a headless
# browser's software WebGPU adapter (browser-check), which has no shader-f16.
REFERENCE_QUANTIZATIONS = ("q0f32", "q4f32_1")
# The f16 ones (q4f16_1 is what WebLLM ships): mlc_llm's model_dtype float16, so the bundle stores
# float16 weights (and scales) and computes in float16; they need an adapter with shader-f16.
F16_QUANTIZATIONS = ("q0f16", "q4f16_1")


def group_quantize_as_mlc_llm(weight, model_dtype=None):
    """The values a q4f32_1 bundle computes with for `weight` (rows of groups of 32): mlc_llm's
    GroupQuantize._quantize (scale = group max |w| / 7, q = clip(round(w / scale + 7), 0, 14),
    round to nearest even as LLVM's nearbyint), then its _dequantize, (q - 7) * scale, with the
    scale as the tensor cache stores it (bf16-rounded, round_as_f32_bundle_stores).

    With `model_dtype` torch.float16 (q4f16_1): mlc_llm's loader casts the weight to float16 before
    quantizing, and every step above runs in float16 (each result rounded to float16, as torch's
    Half arithmetic does), the scale stored as float16 itself; the result is float16."""
    import torch

    rows, columns = weight.shape
    if columns % Q4_GROUP_SIZE:
        raise ValueError(f"a {tuple(weight.shape)} weight does not split into groups of {Q4_GROUP_SIZE}")
    dtype = model_dtype or torch.float32
    groups = weight.detach().to(dtype).reshape(rows, columns // Q4_GROUP_SIZE, Q4_GROUP_SIZE)
    scale = groups.abs().amax(dim=-1, keepdim=True) / Q4_MAX_INT
    # an all-zero group (the padding token's embedding row) has scale 0, so whatever mlc_llm packs
    # for it dequantizes to 0; dividing by 1 there keeps NaN out
    ones = torch.ones_like(scale)
    quantized = torch.clamp(torch.round(groups / torch.where(scale > 0, scale, ones) + Q4_MAX_INT), 0, 2 * Q4_MAX_INT)
    stored_scale = scale if dtype == torch.float16 else scale.to(torch.bfloat16).to(torch.float32)
    return ((quantized - Q4_MAX_INT) * stored_scale).reshape(rows, columns)


def as_bundle_holds(model, quantization: str) -> None:
    """Make `model`'s weights (in place) the values a bundle of `quantization` computes with: for
    q0f32 every weight bf16-rounded; for q4f32_1 every linear and embedding weight group-quantized
    as mlc_llm does (group_quantize_as_mlc_llm), the rest (norms, biases) bf16-rounded. For q0f16
    and q4f16_1 the model itself becomes float16 (the bundle stores float16 and computes in it),
    and q4f16_1 group-quantizes in float16."""
    import torch

    if quantization in F16_QUANTIZATIONS:
        model.to(torch.float16)
        if quantization == "q0f16":
            return
    elif quantization == "q0f32":
        round_as_f32_bundle_stores(model)
        return
    elif quantization not in REFERENCE_QUANTIZATIONS:
        known = (*REFERENCE_QUANTIZATIONS, *F16_QUANTIZATIONS)
        raise ValueError(f"no reference for quantization {quantization!r}: {', '.join(known)}")
    model_dtype = torch.float16 if quantization in F16_QUANTIZATIONS else None
    quantized = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            quantized[id(module.weight)] = module.weight  # a tied head and embedding: once
    with torch.no_grad():
        originals = {key: group_quantize_as_mlc_llm(weight, model_dtype) for key, weight in quantized.items()}
        if model_dtype is None:
            round_as_f32_bundle_stores(model)
        for key, weight in quantized.items():
            weight.copy_(originals[key].to(weight.dtype))


def greedy_reference(model_dir: Path, prompt: str, steps: int, quantization: str = "q0f32") -> dict:
    """transformers' greedy continuation of `prompt` on the CPU with the weights a bundle of
    `quantization` holds (as_bundle_holds), in float16 for the f16 quantizations (torch's CPU Half
    kernels: float16 tensors, their sums accumulated wider, as WebGPU kernels may or may not do),
    with the margin by which each chosen token beat the runner-up (the smallest margin says how
    safe an id-for-id comparison is)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    # tokenizer.json itself, as WebLLM reads it (transformers 5's AutoTokenizer may pick the
    # family's own tokenizer class for a model_type, e.g. Qwen2Tokenizer, and ignore it)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    as_bundle_holds(model, quantization)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    generated, margins = [], []
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            scores = model(torch.tensor([sequence])).logits[0, -1].float()
            top = torch.topk(scores, 2)
            generated.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            sequence.append(generated[-1])
    return {
        "prompt": prompt,
        "prompt_ids": ids,
        "reference_ids": generated,
        "min_margin": min(margins),
        "quantization": quantization,
    }
