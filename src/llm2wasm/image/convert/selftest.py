"""`llm2wasm selftest`: a tiny random Llama + LoRA adapter, converted end to end on the CPU.

It proves the whole stack of the image it runs in: the PEFT merge, mlc_llm's gen_config,
convert_weight and compile, emcc and the TVM web runtime. The merge is checked numerically (the
merged model's logits equal those of the base with the adapter applied); the bundle is checked for
what WebLLM reads (tensor-cache.json and its shards, the app config) and the library for being a
real WebGPU model library (its size, its imports of TVM's FFI callbacks, its WGSL kernels). An f32
quantization, so the bundle runs on a WebGPU adapter without shader-f16 (software ones included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from llm2wasm.errors import UsageError

PROMPT_IDS = [1, 3, 4, 5, 6, 7, 8, 9]
SELFTEST_QUANTIZATION = "q4f32_1"
SELFTEST_MODEL_ID = f"tiny-llama-lora-{SELFTEST_QUANTIZATION}"


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

    from llm2wasm.image.convert.reference import logits

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base_logits = logits(base, PROMPT_IDS)
    with_adapter = logits(PeftModel.from_pretrained(base, str(adapter_dir)), PROMPT_IDS)
    merged = logits(AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32), PROMPT_IDS)
    check((with_adapter - base_logits).abs().max().item() > 1e-3, "the adapter changes the base model's logits")
    difference = (merged - with_adapter).abs().max().item()
    check(difference < 2e-2, f"merged logits equal base+adapter logits (max difference {difference:.2e}, fp16 merge)")


def check_tensor_cache(weights: Path, num_layers: int) -> None:
    """Every parameter is listed, and every shard it names exists with the bytes it claims."""
    cache = json.loads((weights / "tensor-cache.json").read_text())
    names = []
    for shard in cache["records"]:
        path = weights / shard["dataPath"]
        check(path.is_file(), f"shard {shard['dataPath']} exists")
        check(path.stat().st_size == shard["nbytes"], f"shard {shard['dataPath']} holds {shard['nbytes']} bytes")
        for record in shard["records"]:
            check_quiet(
                record["byteOffset"] + record["nbytes"] <= shard["nbytes"], f"{record['name']} lies in its shard"
            )
            names.append(record["name"])
    expected = ["model.norm.weight", *(f"model.layers.{i}.input_layernorm.weight" for i in range(num_layers))]
    missing = [name for name in expected if name not in names]
    layers = all(any(name.startswith(f"model.layers.{i}.self_attn.") for name in names) for i in range(num_layers))
    check(
        not missing and layers and any(n.startswith("lm_head.") for n in names),
        f"tensor-cache.json lists all {len(names)} parameters",
    )


def check_quiet(condition: bool, message: str) -> None:
    if not condition:
        raise SelftestFailed(message)


def check_library(wasm: Path) -> None:
    """A real WebGPU model library, not a placeholder: how we tell."""
    from llm2wasm.image.convert.wasm_lib import inspect_library

    facts = inspect_library(wasm)
    check(facts.size > 1_000_000, f"the model library is a wasm module of {facts.size / 1e6:.1f} MB")
    check(
        {"env.TVMFFIWasmSafeCall", "env.TVMFFIWasmFunctionDeleter"} <= set(facts.ffi_imports),
        f"it imports TVM's FFI callbacks from WebLLM's runtime ({', '.join(facts.ffi_imports)})",
    )
    check("TVMBackendAllocWorkspace" in facts.exports, f"it exports the TVM runtime ({len(facts.exports)} functions)")
    attention = [k for k in facts.kernels if "paged_kv" in k]
    check(
        len(facts.kernels) >= 20 and attention,
        f"it carries {len(facts.kernels)} WGSL compute kernels, paged-KV attention among them",
    )


def check_bundle(out: Path, model_id: str, num_layers: int) -> None:
    app = json.loads((out / "app-config.json").read_text())
    record = app["model_list"][0]
    check(
        record["model_id"] == model_id and record["model_lib"].endswith(f"lib/{model_id}.wasm"),
        "app-config.json names the model and its library",
    )
    check("required_features" not in record, "an f32 quantization asks for no shader-f16")
    check(
        record.get("vram_required_MB", 0) > 0,
        f"compile's memory figures reach the app config ({record.get('vram_required_MB')} MB)",
    )
    weights = out / "model" / "resolve" / "main"
    for name in ("mlc-chat-config.json", "tensor-cache.json", "tokenizer.json"):
        check((weights / name).is_file(), f"model/resolve/main/{name} written")
    check_tensor_cache(weights, num_layers)
    check_library(out / "lib" / f"{model_id}.wasm")


def run_selftest(args: argparse.Namespace, convert: Callable[[list[str]], int]) -> int:
    """`convert` runs `llm2wasm convert` (llm2wasm.image.convert.command.convert_main, passed in: that
    module runs this one)."""
    from llm2wasm.image.convert.tiny import make_lora_adapter, make_tiny_llama

    started = time.monotonic()
    workdir = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="llm2wasm-selftest-"))
    if args.keep and workdir.exists() and any(workdir.iterdir()):
        raise UsageError(f"--keep folder {workdir} is not empty: pass a new folder")
    try:
        print("selftest: making a tiny random Llama and a LoRA adapter", file=sys.stderr)
        model = make_tiny_llama(workdir / "tiny-llama")
        adapter = make_lora_adapter(model, workdir / "tiny-lora")
        out = workdir / "bundle"
        status = convert(
            [
                str(model),
                "--adapter",
                str(adapter),
                "--quantization",
                SELFTEST_QUANTIZATION,
                "--conv-template",
                "llama-2",
                "--model-id",
                SELFTEST_MODEL_ID,
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
        check_bundle(
            out, SELFTEST_MODEL_ID, num_layers=json.loads((model / "config.json").read_text())["num_hidden_layers"]
        )
    except SelftestFailed as failure:
        print(f"selftest FAILED: {failure}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"selftest passed in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0
