"""A tiny random Llama and LoRA adapter, made locally (no hub): for `llm2wasm selftest` and tests."""

from __future__ import annotations

from pathlib import Path

WORDS = ["the", "a", "model", "runs", "in", "browser", "with", "webgpu", "and", "wasm", "hello", "world"]


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    tokenizer.save_pretrained(str(out))
    return tokenizer


def make_tiny_llama(out: Path, seed: int = 0, vocab_size: int = 512) -> Path:
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


def make_lora_adapter(base: Path, out: Path, seed: int = 1, target_modules=("q_proj", "v_proj")) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    # init_lora_weights=False: random A and B, so the merge visibly changes the weights.
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=list(target_modules), init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(out))
    return out


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()
