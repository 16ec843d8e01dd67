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


BROWSER_CHECK_PROMPT = "hello world the model runs in"


def greedy_reference(model_dir: Path, prompt: str, steps: int) -> dict:
    """transformers' greedy continuation of `prompt` on the CPU, with the margin by which each chosen
    token beat the runner-up (the smallest margin says how safe an id-for-id comparison is)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    generated, margins = [], []
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            scores = model(torch.tensor([sequence])).logits[0, -1].float()
            top = torch.topk(scores, 2)
            generated.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            sequence.append(generated[-1])
    return {"prompt": prompt, "prompt_ids": ids, "reference_ids": generated, "min_margin": min(margins)}


def make_browser_check_model(out: Path, steps: int = 8, min_margin: float = 1.0) -> dict:
    """A tiny Llama whose greedy continuation is decisive, for comparing a browser's tokens with
    transformers' id for id: its vocabulary is exactly the tokenizer's (no id the tokenizer cannot
    name), its output head is scaled up so the best token beats the runner-up by at least
    `min_margin` logits at every step (float32 on a GPU differs from the CPU by ~1e-4), and the
    continuation holds no end-of-sequence token (so both sides generate all `steps`) and at least
    three different tokens (a stuck repetition would prove little)."""
    import torch
    from transformers import AutoModelForCausalLM

    vocab_size = len(WORDS) + 3
    for seed in range(50):
        model_dir = make_tiny_llama(out, seed=seed, vocab_size=vocab_size)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        with torch.no_grad():
            model.lm_head.weight.mul_(60.0)
        model.save_pretrained(str(model_dir), safe_serialization=True)
        reference = greedy_reference(model_dir, BROWSER_CHECK_PROMPT, steps)
        chosen = reference["reference_ids"]
        if reference["min_margin"] >= min_margin and 2 not in chosen and len(set(chosen)) >= 3:
            return {**reference, "seed": seed}
    raise RuntimeError(f"no seed below 50 gives a continuation with margins >= {min_margin}")
