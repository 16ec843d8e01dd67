"""A tiny random Llama and LoRA adapter, made locally (no hub): for `llm2wasm selftest` and tests."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

WORDS = ["the", "a", "model", "runs", "in", "browser", "with", "webgpu", "and", "wasm", "hello", "world"]


# A chat model's extra vocabulary: ChatML's markers and roles, and the words of its system message.
CHAT_SPECIAL = ["<|im_start|>", "<|im_end|>"]
CHAT_WORDS = ["system", "user", "assistant", "you", "are"]
CHAT_SYSTEM = "you are a model"
CHAT_USER = "hello world the model runs in"
# ChatML with a default system message of its own (as SmolLM2's has), written as a Jinja template
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nyou are a model<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tokenizer(out: Path, chat: bool = False):
    """A word-level tokenizer over WORDS (and, for a chat model, ChatML's markers and roles with a
    ChatML chat template): a vocabulary this small keeps SwiftShader's sampler compile short."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>", *WORDS, *((CHAT_SPECIAL + CHAT_WORDS) if chat else [])]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"additional_special_tokens": CHAT_SPECIAL} if chat else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>", **extra
    )
    if chat:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(str(out))
    return tokenizer


# The architecture matrix: each family as users have it (grouped-query attention, a rope base
# that is not the default, tied or untied embeddings as the family has them), tiny. head_dim is
# hidden_size / heads throughout (mlc_llm's qwen2, phi3 and gpt_neox configs assert it).
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
ARCHITECTURES = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2, "rope_theta": 50000.0, "tie_word_embeddings": False}),
    # Qwen2/Qwen3 come both ways (small ones tied, 7B/8B and up untied); untied here, since a tiny
    # random tied model only repeats its input token, which proves little in a browser.
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2, "rope_theta": 1000000.0, "tie_word_embeddings": False}),
    "qwen3": (
        "Qwen3Config",
        {"num_key_value_heads": 2, "head_dim": 16, "rope_theta": 1000000.0, "tie_word_embeddings": False},
    ),
    "mistral": (
        "MistralConfig",
        {
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rope_theta": 1000000.0,
            "sliding_window": None,
            "tie_word_embeddings": False,
        },
    ),
    "phi3": ("Phi3Config", {"num_key_value_heads": 2, "rope_theta": 30000.0, "tie_word_embeddings": False}),
    # transformers 5's GPTNeoXConfig keeps a rope_theta keyword as a stale top-level key beside
    # rope_parameters (which the model computes with): the rope goes in the native way
    "gpt_neox": (
        "GPTNeoXConfig",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.25},
            "tie_word_embeddings": False,
        },
    ),
    # Phi-2 and StableLM 2: partial rotary embeddings, biases, LayerNorm
    "phi": (
        "PhiConfig",
        {
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
            "tie_word_embeddings": False,
        },
    ),
    "stablelm": (
        "StableLmConfig",
        {
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 40000.0, "partial_rotary_factor": 0.25},
            "use_qkv_bias": True,
            "tie_word_embeddings": False,
        },
    ),
    # The small models users ship most are tied: Llama 3.2 1B/3B (and SmolLM2), with Llama 3's
    # rope scaling; Qwen2.5 0.5B-3B. Llama 3.2's scaling with its original context shrunk to the
    # tiny model's (16 positions, so the short browser prompt reaches where it acts).
    "llama3_2": (
        "LlamaConfig",
        {
            "num_key_value_heads": 2,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "tie_word_embeddings": True,
        },
    ),
    "qwen2_5": ("Qwen2Config", {"num_key_value_heads": 2, "rope_theta": 1000000.0, "tie_word_embeddings": True}),
    # Phi-3.5 mini's long-context rope (longrope): per-frequency factors, short ones up to the
    # original context (4096 there, 32 here, beyond the browser check's sequence) and an
    # attention factor from max / original positions (256 / 32)
    "phi3_5": (
        "Phi3Config",
        {
            "num_key_value_heads": 2,
            # at top level too: transformers 5's Phi3Config puts its own default (4096) there otherwise
            "original_max_position_embeddings": 32,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 20000.0,  # Phi-3.5's is 10000: not the default here, so a fallback shows
                "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 3.0, 4.0, 6.0],
                "long_factor": [1.0, 1.5, 2.5, 4.0, 8.0, 12.0, 24.0, 48.0],
                "original_max_position_embeddings": 32,
            },
            "tie_word_embeddings": False,
        },
    ),
    # Untied, which the installed mlc_llm's starcoder2 loader cannot convert (it takes the
    # embeddings for the output head): for the test that such a checkpoint is refused.
    "starcoder2": (
        "Starcoder2Config",
        {
            "num_key_value_heads": 2,
            "rope_theta": 100000.0,
            "use_bias": True,
            "sliding_window": None,
            "tie_word_embeddings": False,
        },
    ),
}


def make_tiny_model(out: Path, architecture: str = "llama", seed: int = 0, vocab_size: int = 512) -> Path:
    """A tiny random model of `architecture`, saved by the installed transformers in its own format."""
    import torch
    import transformers

    class_name, family = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    config = getattr(transformers, class_name)(
        **TINY_SHAPE,
        **family,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out), safe_serialization=True)
    make_tokenizer(out)
    return out


def make_tiny_llama(out: Path, seed: int = 0, vocab_size: int = 512) -> Path:
    """The selftest's Llama: the family's defaults (rope base 10000, no GQA), untied."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    make_tokenizer(out)
    return out


def make_lora_adapter(
    base: Path, out: Path, seed: int = 1, target_modules=("q_proj", "v_proj"), scale: float = 1.0
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    # init_lora_weights=False: random A and B, so the merge visibly changes the weights.
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if scale != 1.0:  # a stronger fine-tune: enough to move a decisive model's greedy tokens
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(scale)
    peft_model.save_pretrained(str(out))
    return out


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


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
# The quantizations a reference can compute with (as_bundle_holds): both run on a software WebGPU
# adapter, which has no shader-f16.
REFERENCE_QUANTIZATIONS = ("q0f32", "q4f32_1")


def group_quantize_as_mlc_llm(weight):
    """The values a q4f32_1 bundle computes with for `weight` (rows of groups of 32): mlc_llm's
    GroupQuantize._quantize (scale = group max |w| / 7, q = clip(round(w / scale + 7), 0, 14),
    round to nearest even as LLVM's nearbyint), then its _dequantize, (q - 7) * scale, with the
    scale as the tensor cache stores it (bf16-rounded, round_as_f32_bundle_stores)."""
    import torch

    rows, columns = weight.shape
    if columns % Q4_GROUP_SIZE:
        raise ValueError(f"a {tuple(weight.shape)} weight does not split into groups of {Q4_GROUP_SIZE}")
    groups = weight.detach().to(torch.float32).reshape(rows, columns // Q4_GROUP_SIZE, Q4_GROUP_SIZE)
    scale = groups.abs().amax(dim=-1, keepdim=True) / Q4_MAX_INT
    # an all-zero group (the padding token's embedding row) has scale 0, so whatever mlc_llm packs
    # for it dequantizes to 0; dividing by 1 there keeps NaN out
    quantized = torch.clamp(torch.round(groups / torch.where(scale > 0, scale, 1.0) + Q4_MAX_INT), 0, 2 * Q4_MAX_INT)
    stored_scale = scale.to(torch.bfloat16).to(torch.float32)
    return ((quantized - Q4_MAX_INT) * stored_scale).reshape(rows, columns)


def as_bundle_holds(model, quantization: str) -> None:
    """Make `model`'s weights (in place) the values a bundle of `quantization` computes with: for
    q0f32 every weight bf16-rounded; for q4f32_1 every linear and embedding weight group-quantized
    as mlc_llm does (group_quantize_as_mlc_llm), the rest (norms, biases) bf16-rounded."""
    import torch

    if quantization == "q0f32":
        round_as_f32_bundle_stores(model)
        return
    if quantization not in REFERENCE_QUANTIZATIONS:
        raise ValueError(f"no reference for quantization {quantization!r}: {' or '.join(REFERENCE_QUANTIZATIONS)}")
    quantized = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            quantized[id(module.weight)] = module.weight  # a tied head and embedding: once
    with torch.no_grad():
        originals = {key: group_quantize_as_mlc_llm(weight) for key, weight in quantized.items()}
        round_as_f32_bundle_stores(model)
        for key, weight in quantized.items():
            weight.copy_(originals[key].to(weight.dtype))


def greedy_reference(model_dir: Path, prompt: str, steps: int, quantization: str = "q0f32") -> dict:
    """transformers' greedy continuation of `prompt` on the CPU with the weights a bundle of
    `quantization` holds (as_bundle_holds), with the margin by which each chosen token beat the
    runner-up (the smallest margin says how safe an id-for-id comparison is)."""
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
    out: Path, steps: int = 8, min_margin: float = 1.0, architecture: str = "llama", quantization: str = "q0f32"
) -> dict:
    """A tiny model of `architecture` whose greedy continuation is decisive, for comparing a
    browser's tokens with transformers' id for id: its vocabulary is exactly the tokenizer's (no id
    the tokenizer cannot name), its output head is scaled up so the best token beats the runner-up
    by at least `min_margin` logits at every step (float32 on a GPU differs from the CPU by ~1e-4),
    and the continuation holds no end-of-sequence token (so both sides generate all `steps`) and at
    least three different tokens (a stuck repetition would prove little)."""
    import torch
    from transformers import AutoModelForCausalLM

    vocab_size = len(WORDS) + 3
    for seed in range(50):
        model_dir = make_tiny_model(out, architecture, seed=seed, vocab_size=vocab_size)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        with torch.no_grad():
            for parameter in decisive_scale_targets(model):
                parameter.mul_(60.0)
            for parameter, scale in check_model_scales(model):
                parameter.mul_(scale)
        model.save_pretrained(str(model_dir), safe_serialization=True)
        reference = greedy_reference(model_dir, BROWSER_CHECK_PROMPT, steps, quantization)
        chosen = reference["reference_ids"]
        if not (reference["min_margin"] >= min_margin and 2 not in chosen and len(set(chosen)) >= 3):
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
    raise RuntimeError(f"no seed below 50 gives a continuation with margins >= {min_margin}")


def make_browser_check_adapter(
    model_dir: Path, adapter_dir: Path, steps: int = 8, min_margin: float = 1.0, quantization: str = "q0f32"
) -> dict:
    """A LoRA on every linear layer of the browser-check model at `model_dir` whose merge changes
    the greedy tokens, and stays decisive; the reference is transformers' greedy continuation of
    the model merged by llm2wasm's own merge (what `convert --adapter` hands mlc_llm), with the
    weights a bundle of `quantization` holds."""
    import shutil

    from llm2wasm.image.convert.merge import merge_adapter

    base_ids = greedy_reference(model_dir, BROWSER_CHECK_PROMPT, steps, quantization)["reference_ids"]
    for seed in range(1, 50):
        # scale 20: activations in the thousands after the first layer, as the "massive
        # activations" of real LLMs (where the bf16 rounding of an f32 bundle's weights shows)
        make_lora_adapter(model_dir, adapter_dir, seed=seed, target_modules="all-linear", scale=20.0)
        with tempfile.TemporaryDirectory(prefix="llm2wasm-merged-") as tmp:
            merged = Path(tmp) / "merged"
            merge_adapter(model_dir, adapter_dir, merged, Path(tmp) / "merge.log")
            reference = greedy_reference(merged, BROWSER_CHECK_PROMPT, steps, quantization)
        chosen = reference["reference_ids"]
        decisive = reference["min_margin"] >= min_margin and 2 not in chosen and len(set(chosen)) >= 3
        if decisive and chosen != base_ids:
            return {**reference, "adapter_seed": seed, "base_reference_ids": base_ids}
        shutil.rmtree(adapter_dir)
    raise RuntimeError("no adapter seed below 50 changes the greedy tokens and stays decisive")
