"""Benchmark: the second fine-tune of a base with and without the library cache (issue 30).

`python bench/libcache.py` (on a built hermetic image) makes, in the image, a random model with the
shape of Llama-3.2-1B (bf16, tied embeddings, GQA; `--shape tiny` for a quick run) and two LoRA
adapters on every linear layer, then times three `invoke convert --adapter` runs, as a user runs them:

1. fine-tune A into its own folder with an empty library cache (it compiles and files the library);
2. fine-tune B into another folder with that cache (it reuses A's library);
3. fine-tune B again into a third folder with `--no-lib-cache` (it compiles).

It prints wall time and the compile step's own time for each, and the ratio of 2 to 3, and appends
them to bench/results.md. It is not a test: nothing passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import INVOKE, ROOT, record  # bench/bench.py, beside this script

# Llama-3.2-1B's published config (sizes only; the weights are random)
SHAPES = {
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=4096,
    ),
}  # fmt: skip

MAKE = """
import json, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from llm2wasm.image.convert.tiny import make_lora_adapter, make_tokenizer

shape = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)  # as the published checkpoint: half the memory of float32
model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0))
model.save_pretrained("/w/base", safe_serialization=True)
make_tokenizer(Path("/w/base"))
del model
for seed, name in ((1, "tune-a"), (2, "tune-b")):
    make_lora_adapter(Path("/w/base"), Path("/w") / name, seed=seed, target_modules="all-linear")
"""


def make_models(image: str, work: Path, shape: dict) -> float:
    started = time.monotonic()
    subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}",
         "-v", f"{work}:/w", "--entrypoint", "python", image, "-c", MAKE, json.dumps(shape)],
        check=True,
    )  # fmt: skip
    return time.monotonic() - started


def convert(image: str, work: Path, tune: str, out: str, quantization: str, *cache: str) -> tuple[float, dict]:
    """Wall seconds of `invoke convert` and its compile step's record."""
    started = time.monotonic()
    subprocess.run(
        [*INVOKE, "convert", str(work / "base"), "--adapter", str(work / tune), "-q", quantization,
         "-o", str(work / out), "--conv-template", "llama-3", "--context-window", "4096",
         "--prefill-chunk-size", "1024", "--image", image, *cache],
        check=True, cwd=ROOT,
    )  # fmt: skip
    seconds = time.monotonic() - started
    state = json.loads((work / out / ".llm2wasm" / "state.json").read_text())
    return seconds, state["steps"]["compile"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--image", default="llm2wasm:app-hermetic")
    parser.add_argument("--quantization", default="q4f16_1")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm2wasm-bench-libcache-"))
    cache = str(work / "libraries")
    try:
        made = make_models(args.image, work, SHAPES[args.shape])
        q = args.quantization
        runs = {
            "fine-tune A, empty cache (compiles, files the library)": convert(
                args.image, work, "tune-a", "a", q, "--lib-cache", cache
            ),
            "fine-tune B, A's library in the cache (reuses it)": convert(
                args.image, work, "tune-b", "b", q, "--lib-cache", cache
            ),
            "fine-tune B, --no-lib-cache (compiles)": convert(args.image, work, "tune-b", "b2", q, "--no-lib-cache"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with_cache, without = (runs[name][0] for name in list(runs)[1:])
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({os.cpu_count()} cores): library cache, "
        f"Llama-3.2-1B shape ({args.shape}), {q}, all-linear LoRA, `invoke convert --adapter`",
        "",
        f"Models and adapters made in {made:.0f} s.",
        "",
        "| run | wall s | compile step s | library |",
        "| --- | --- | --- | --- |",
    ]
    for name, (seconds, compiled) in runs.items():
        compile_seconds = compiled.get("seconds", float("nan"))
        reused = "reused" if compiled.get("library_cache", {}).get("hit") else "compiled"
        lines.append(f"| {name} | {seconds:.1f} | {compile_seconds:.1f} | {reused} |")
    lines += ["", f"Second fine-tune with the cache / without: **{with_cache / without:.2f}x** the wall time."]
    return record(lines)


if __name__ == "__main__":
    sys.exit(main())
