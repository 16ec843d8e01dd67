"""Merge a PEFT adapter into its base model: a LoRA tensor by tensor (the plan is
llm2wasm.image.convert.streammerge), else transformers + peft on the whole model (imported only here)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from llm2wasm.image.convert.inputfiles import TOKENIZER_NAMES
from llm2wasm.image.convert.streammerge import LoraChange, MergePlan, Unsupported, peak_memory_mib, plan_merge

MERGE_METHODS = ("auto", "peft")  # auto: streaming where it covers the adapter, else peft


def merge_dtype(config: dict):
    """The base is loaded in half precision, never quantized: bf16 when the checkpoint is bf16."""
    import torch

    declared = str(config.get("torch_dtype") or config.get("dtype") or "").replace("torch.", "")
    return torch.bfloat16 if declared == "bfloat16" else torch.float16


def merge_adapter(
    model_dir: Path, adapter_dir: Path, out: Path, log: Path, device: str = "cpu", method: str = "auto"
) -> str:
    """Merge and write the merged model to `out`; returns the line that says which merge ran, why,
    and the process's peak memory (also the last line of `log`)."""
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method {method!r} is not one of {MERGE_METHODS}")
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        plan, reason = None, "--peft-merge"
        if method == "auto":
            try:
                plan = plan_merge(model_dir, adapter_dir)
            except Unsupported as why:
                reason = f"not streamed: {why}"
        if plan is not None:
            print(f"streaming merge of {adapter_dir} into {model_dir} on {device}: {plan.summary()}")
            stream_merge(plan, model_dir, out, device)
            what = f"streaming merge, tensor by tensor on {device}: {plan.summary()}"
        else:
            peft_merge(model_dir, adapter_dir, out, device)
            what = f"peft merge (whole model on {device}; {reason})"
        line = f"{what}; peak memory {peak_memory_mib():,.0f} MiB"
        print(line)
    # Tokenizer files: the base's, then any the adapter brings (a fine-tune may add tokens).
    for source in (model_dir, adapter_dir):
        for name in TOKENIZER_NAMES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    for name in ("generation_config.json",):
        if (model_dir / name).is_file() and not (out / name).exists():
            shutil.copyfile(model_dir / name, out / name)
    return line


def peft_merge(model_dir: Path, adapter_dir: Path, out: Path, device: str) -> None:
    """transformers + peft: the whole model loaded in half precision, merge_and_unload, save_pretrained."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    dtype = merge_dtype(config)
    print(f"loading {model_dir} as {dtype} on {device}; merging {adapter_dir}")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, low_cpu_mem_usage=True)
    merged = PeftModel.from_pretrained(base.to(device), str(adapter_dir)).merge_and_unload()
    with torch.no_grad():
        merged.to("cpu").save_pretrained(str(out), safe_serialization=True)


def stream_merge(plan: MergePlan, model_dir: Path, out: Path, device: str) -> None:
    """Each shard copied as it is (same header, names, dtypes and offsets), then each changed tensor
    overwritten in place by its merged bytes: one tensor in memory at a time. config.json is the
    base's unchanged (the tensors keep their dtypes), the index too (the shards keep their sizes)."""
    from safetensors import safe_open

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / "config.json", out / "config.json")
    if plan.index is not None:
        shutil.copyfile(plan.index, out / plan.index.name)
    with safe_open(str(plan.adapter_file), framework="pt") as adapter:
        for name, source in plan.shards.items():
            shutil.copyfile(source, out / name)  # copy_file_range / sendfile: no copy in memory
            with safe_open(str(source), framework="pt") as shard:
                header_length, offsets = data_offsets(source)
                changed = [key for key in offsets if key in plan.changes]
                with open(out / name, "r+b") as handle:
                    for key in changed:
                        merged = merged_tensor(shard.get_tensor(key), plan.changes[key], adapter, device)
                        begin, end = offsets[key]
                        raw = tensor_bytes(merged)
                        if len(raw) != end - begin:
                            raise RuntimeError(f"{key}: {len(raw)} bytes merged for {end - begin} in {name}")
                        handle.seek(8 + header_length + begin)
                        handle.write(raw)
            print(f"  {name}: {len(changed)} tensors merged; peak memory {peak_memory_mib():,.0f} MiB")


def data_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """The header's length and each tensor's byte range after it."""
    import json
    import struct

    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return length, {key: tuple(value["data_offsets"]) for key, value in header.items() if key != "__metadata__"}


def merged_tensor(weight, change: LoraChange | str, adapter, device: str):
    """W + scaling * B @ A in float32 on `device`, back in W's dtype on the CPU; or the adapter's
    whole tensor (modules_to_save) in W's dtype."""
    import torch

    if isinstance(change, str):
        return adapter.get_tensor(change).to(weight.dtype)
    with torch.no_grad():
        a = adapter.get_tensor(change.a_key).to(device, torch.float32)
        b = adapter.get_tensor(change.b_key).to(device, torch.float32)
        delta = b @ a
        if change.fan_in_fan_out:
            delta = delta.T
        merged = weight.to(device, torch.float32).add_(delta.mul_(change.scaling))
        return merged.to(weight.dtype).cpu()


def tensor_bytes(tensor) -> memoryview:
    """A tensor's bytes as safetensors stores them (little-endian, row-major)."""
    import torch

    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
