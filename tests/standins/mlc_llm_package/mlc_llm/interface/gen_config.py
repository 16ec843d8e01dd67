"""STAND-IN for mlc_llm.interface.gen_config: CONV_TEMPLATES and the gen_config step."""

import json
import os
import shutil

# A subset of upstream's CONV_TEMPLATES (54 names at v0.20.0), enough for the tests.
CONV_TEMPLATES = {
    "llama-2",
    "llama-3",
    "llama-3_1",
    "chatml",
    "chatml_nosystem",
    "qwen2",
    "qwen3",
    "mistral_default",
    "phi-2",
    "phi-3",
    "gemma_instruction",
    "gemma3_instruction",
    "redpajama_chat",
    "tinyllama_v1_0",
    "stablelm-2",
    "smollm",
    "deepseek_v3",
    "LM",
}

TOKENIZER_FILES = [
    "tokenizer.model",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer_config.json",
]


def gen_config(
    config_path,
    quantization,
    conv_template,
    output,
    context_window_size=None,
    prefill_chunk_size=None,
    sliding_window_size=None,
    max_batch_size=128,
    model_type="auto",
):
    with open(config_path) as handle:
        model_config = json.load(handle)
    source = os.path.dirname(config_path)
    os.makedirs(output, exist_ok=True)
    context = context_window_size or model_config.get("max_position_embeddings", 2048)
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(output, name))
            copied.append(name)
    chat_config = {
        "version": "0.1.0",
        "model_type": model_config.get("model_type") if model_type == "auto" else model_type,
        "quantization": quantization,
        "model_config": model_config,
        "vocab_size": model_config.get("vocab_size"),
        "context_window_size": context,
        "sliding_window_size": sliding_window_size or -1,
        "prefill_chunk_size": prefill_chunk_size or min(context, 2048),
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "active_vocab_size": model_config.get("vocab_size"),
        "temperature": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "top_p": 1.0,
        "tokenizer_files": copied,
        "tokenizer_info": {
            "token_postproc_method": "byte_fallback",
            "prepend_space_in_encode": False,
            "strip_space_in_decode": False,
        },
        "conv_template": {"name": conv_template},
        "pad_token_id": model_config.get("pad_token_id", 0),
        "bos_token_id": model_config.get("bos_token_id", 1),
        "eos_token_id": model_config.get("eos_token_id", 2),
        "model_task": "chat",
        "embedding_metadata": None,
    }
    with open(os.path.join(output, "mlc-chat-config.json"), "w") as handle:
        json.dump(chat_config, handle, indent=2)
