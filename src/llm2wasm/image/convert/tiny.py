"""Tiny random checkpoints, made locally (no hub): a word-level tokenizer, a model of each family
of the architecture matrix (or the selftest's Llama), a LoRA adapter; for `llm2wasm selftest` and tests.

Only making them: transformers' reference outputs are llm2wasm.image.convert.reference, and the
models made decisive for the browser and chat checks llm2wasm.image.convert.checkmodels.
"""

from __future__ import annotations

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


def make_tokenizer(out: Path, chat: bool = False, size: int | None = None):
    """A word-level tokenizer over WORDS (and, for a chat model, ChatML's markers and roles with a
    ChatML chat template): a vocabulary this small keeps SwiftShader's sampler compile short. With
    `size`, filler words (w<id>) after those make it `size` tokens: a realistic vocabulary (SmolLM's
    49,152), every id one the tokenizer can name, for timing what a vocabulary's size costs a runner."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>", *WORDS, *((CHAT_SPECIAL + CHAT_WORDS) if chat else [])]
    if size is not None:
        if size < len(tokens):
            raise ValueError(f"a tokenizer of {size} tokens cannot hold the {len(tokens)} words it needs")
        tokens += [f"w{index}" for index in range(len(tokens), size)]
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


def make_tiny_model(
    out: Path, architecture: str = "llama", seed: int = 0, vocab_size: int = 512, tokenizer_size: int | None = None
) -> Path:
    """A tiny random model of `architecture`, saved by the installed transformers in its own format;
    its tokenizer is make_tokenizer's, of `tokenizer_size` tokens when given."""
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
    make_tokenizer(out, size=tokenizer_size)
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
