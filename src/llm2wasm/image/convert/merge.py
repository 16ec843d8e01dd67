"""Merge a PEFT adapter into its base model (transformers + peft, imported only here)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from llm2wasm.image.convert.inputfiles import TOKENIZER_NAMES


def merge_dtype(config: dict):
    """The base is loaded in half precision, never quantized: bf16 when the checkpoint is bf16."""
    import torch

    declared = str(config.get("torch_dtype") or config.get("dtype") or "").replace("torch.", "")
    return torch.bfloat16 if declared == "bfloat16" else torch.float16


def merge_adapter(model_dir: Path, adapter_dir: Path, out: Path, log: Path, device: str = "cpu") -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    dtype = merge_dtype(config)
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        print(f"loading {model_dir} as {dtype} on {device}; merging {adapter_dir}")
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, low_cpu_mem_usage=True)
        merged = PeftModel.from_pretrained(base.to(device), str(adapter_dir)).merge_and_unload()
        with torch.no_grad():
            merged.to("cpu").save_pretrained(str(out), safe_serialization=True)
    # Tokenizer files: the base's, then any the adapter brings (a fine-tune may add tokens).
    for source in (model_dir, adapter_dir):
        for name in TOKENIZER_NAMES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    for name in ("generation_config.json",):
        if (model_dir / name).is_file() and not (out / name).exists():
            shutil.copyfile(model_dir / name, out / name)
