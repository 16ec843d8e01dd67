"""`llm2wasm selftest`: a tiny random Llama + LoRA adapter, converted end to end on the CPU.

In the real image this proves the whole stack (merge, mlc_llm, emcc, TVM web runtime); in the
hermetic test image it runs against the stand-in mlc_llm. The PEFT merge is checked for real:
the merged model's logits must equal those of the base with the adapter applied.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UsageError

PROMPT_IDS = [1, 3, 4, 5, 6, 7, 8, 9]


class SelftestFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SelftestFailed(message)
    print(f"  ok: {message}", file=sys.stderr)


def check_merge(model_dir: Path, adapter_dir: Path, merged_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .tiny import logits

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base_logits = logits(base, PROMPT_IDS)
    with_adapter = logits(PeftModel.from_pretrained(base, str(adapter_dir)), PROMPT_IDS)
    merged = logits(AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32), PROMPT_IDS)
    check((with_adapter - base_logits).abs().max().item() > 1e-3, "the adapter changes the base model's logits")
    difference = (merged - with_adapter).abs().max().item()
    check(difference < 2e-2, f"merged logits equal base+adapter logits (max difference {difference:.2e}, fp16 merge)")


def check_bundle(out: Path, model_id: str) -> None:
    app = json.loads((out / "app-config.json").read_text())
    record = app["model_list"][0]
    check(
        record["model_id"] == model_id and record["model_lib"].endswith(f"lib/{model_id}.wasm"),
        "app-config.json names the model and its library",
    )
    check(record.get("required_features") == ["shader-f16"], "f16 quantization asks for shader-f16")
    weights = out / "model" / "resolve" / "main"
    for name in ("mlc-chat-config.json", "tensor-cache.json", "tokenizer.json"):
        check((weights / name).is_file(), f"model/resolve/main/{name} written")
    check(any(weights.glob("params_shard_*.bin")), "weight shards written")
    check((out / "lib" / f"{model_id}.wasm").read_bytes()[:4] == b"\0asm", "the model library is a wasm module")


def run_selftest(args: argparse.Namespace) -> int:
    from ..cli import main as cli_main
    from .tiny import make_lora_adapter, make_tiny_llama

    started = time.monotonic()
    workdir = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="llm2wasm-selftest-"))
    if args.keep and workdir.exists() and any(workdir.iterdir()):
        raise UsageError(f"--keep folder {workdir} is not empty: pass a new folder")
    try:
        print("selftest: making a tiny random Llama and a LoRA adapter", file=sys.stderr)
        model = make_tiny_llama(workdir / "tiny-llama")
        adapter = make_lora_adapter(model, workdir / "tiny-lora")
        out = workdir / "bundle"
        status = cli_main(
            [
                "convert",
                str(model),
                "--adapter",
                str(adapter),
                "--quantization",
                "q4f16_1",
                "--conv-template",
                "llama-2",
                "--model-id",
                "tiny-llama-lora-q4f16_1",
                "--prefill-chunk-size",
                "128",
                "--context-window",
                "256",
                "-o",
                str(out),
            ]
        )
        check(status == 0, "llm2wasm convert finished")
        check_merge(model, adapter, out / ".llm2wasm" / "merge" / "model")
        check_bundle(out, "tiny-llama-lora-q4f16_1")
    except SelftestFailed as failure:
        print(f"selftest FAILED: {failure}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"selftest passed in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0
