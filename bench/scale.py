"""Benchmark: what converting real-size models costs, step by step and in memory (issue 28).

`python bench/scale.py [--shapes llama-3.2-1b,...] [--cases q4f16_1,q4f16_1+lora,...]` (on a built
hermetic image) writes, on the host, random models with the sizes of the published configs
(Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B, Qwen2.5-7B; `tiny` and `tiny-qwen2` for a quick run):
bf16 weights drawn from a seeded generator (normal x 0.02, norms 1) and written tensor by tensor
into safetensors shards of at most --shard-gb with model.safetensors.index.json, so that making an
8B model holds one chunk of one tensor in memory, never the model; config.json as published
(architectures, sizes, rope scaling, tied embeddings, torch_dtype bfloat16); the tiny word-level
tokenizer of llm2wasm.image.convert.tiny (made in the image; its 15 tokens are ids below any
vocab_size, which stays the published one, and bos/eos are its ids 1 and 2); and a rank-16 LoRA
adapter on every linear layer in PEFT's format (adapter_model.safetensors, F32 as PEFT saves it,
with adapter_config.json), written the same way.

For each shape and case it runs `invoke convert` as a user does (`--context-window 4096
--prefill-chunk-size 1024`, `--no-lib-cache` so each compile is measured) and records the wall time,
each step's own seconds from the bundle's .llm2wasm/state.json (merge, gen_config, convert_weight,
compile; compile runs beside convert_weight, so the steps add up to more than the wall), which merge
ran (from .llm2wasm/logs/merge.log), the conversion container's peak memory, the bundle's size (the
files served) and the workspace's (.llm2wasm: the merged model, the kept step outputs).

Peak memory: the container is found by the name the host runner gives it
(llm2wasm-convert-<pid of the invoke process>-...) and its memory cgroup read every second while it
runs: the kernel's high-water mark (cgroup v2 memory.peak, v1 memory.max_usage_in_bytes), which
counts page cache (the model's files read through mmap; the kernel reclaims it under the container's
limit), and, polled, the most anonymous memory plus shmem (the container's /tmp is a tmpfs) it held:
what cannot be reclaimed, the figure to compare with a memory limit. The cgroup goes with the
container (--rm), so the last second before it exits is not seen. Without a readable cgroup it polls
`docker stats --no-stream` instead (usage less inactive page cache), and the output says which.

Before a shape it refuses to start when the disk lacks room for the model, the adapter and the
largest conversion's output (or all of them, with --keep). Models and bundles are deleted afterwards
unless --keep. One table per shape is appended to bench/results.md (`--print-only`: printed only).
It is not a test: nothing passes or fails; a conversion that fails is a row with its exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench import INVOKE, ROOT, record  # bench/bench.py, beside this script

# Llama 3.1/3.2's rope scaling as published (factor 32 for 3.2's 1B and 3B, 8 for 3.1's 8B)
LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
         "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "attention_bias": False, "attention_dropout": 0.0,
         "mlp_bias": False, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
         "max_position_embeddings": 131072}  # fmt: skip
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
         "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "attention_dropout": 0.0, "initializer_range": 0.02,
         "use_cache": True, "use_sliding_window": False, "max_position_embeddings": 32768,
         "sliding_window": 131072}  # fmt: skip

# The published configs' sizes (the weights are random). head_dim = hidden_size / heads throughout.
SHAPES = {
    "llama-3.2-1b": {**LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "tie_word_embeddings": True, "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}},
    "llama-3.2-3b": {**LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                     "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "tie_word_embeddings": True, "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}},
    "llama-3.1-8b": {**LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "tie_word_embeddings": False, "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0}},
    "qwen2.5-7b": {**QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_window_layers": 28, "tie_word_embeddings": False},
    # quick runs: Llama 3.2's layout (tied, GQA, llama3 rope scaling) and Qwen2's (q/k/v biases, untied)
    "tiny": {**LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
             "tie_word_embeddings": True, "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}},
    "tiny-qwen2": {**QWEN2, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_window_layers": 2,
                   "tie_word_embeddings": False},
}  # fmt: skip
BIG_SHAPES = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-7b"]
CONV_TEMPLATES = {"llama": "llama-3", "qwen2": "qwen2"}
CASES = ["q4f16_1", "q4f16_1+lora", "q4f32_1", "q4f32_1+lora"]
STEPS = ["merge", "gen_config", "convert_weight", "compile"]
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK, LORA_ALPHA = 16, 32
CHUNK = 1 << 23  # elements drawn at a time: 32 MiB of float32
GB = 1e9


# ---- writing the model: safetensors by hand, one chunk of one tensor in memory at a time


def tensors_of(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every weight as transformers names them; kind: "normal" or "ones"."""
    hidden, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, config["num_key_value_heads"] * head_dim
    bias = config["model_type"] == "qwen2"
    out = [("model.embed_tokens.weight", (config["vocab_size"], hidden), "normal")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,), "ones")]
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out += [(f"{p}self_attn.{name}.weight", (rows, hidden), "normal")]
            if bias:
                out += [(f"{p}self_attn.{name}.bias", (rows,), "normal")]
        out += [
            (p + "self_attn.o_proj.weight", (hidden, q), "normal"),
            (p + "post_attention_layernorm.weight", (hidden,), "ones"),
            (p + "mlp.gate_proj.weight", (inter, hidden), "normal"),
            (p + "mlp.up_proj.weight", (inter, hidden), "normal"),
            (p + "mlp.down_proj.weight", (hidden, inter), "normal"),
        ]
    out += [("model.norm.weight", (hidden,), "ones")]
    if not config["tie_word_embeddings"]:
        out += [("lm_head.weight", (config["vocab_size"], hidden), "normal")]
    return out


def lora_tensors_of(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """PEFT's keys for a LoRA on every linear layer: lora_A (r x in), lora_B (out x r)."""
    out = []
    for name, shape, _ in tensors_of(config):
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEAR:
            rows, cols = shape
            out += [(f"base_model.model.{module}.lora_A.weight", (LORA_RANK, cols), "normal"),
                    (f"base_model.model.{module}.lora_B.weight", (rows, LORA_RANK), "normal")]  # fmt: skip
    return out


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16's bits (round to nearest even), as uint16."""
    bits = values.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: Path, tensors: list, dtype: str, rng: np.random.Generator) -> int:
    """One safetensors file: header first (every offset is known from the shapes), then each tensor's
    bytes drawn and written CHUNK elements at a time. Returns the file's size."""
    width = {"BF16": 2, "F32": 4}[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        size = int(np.prod(shape)) * width
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for _, shape, kind in tensors:
            left = int(np.prod(shape))
            while left:
                n = min(left, CHUNK)
                if kind == "ones":
                    values = np.ones(n, dtype=np.float32)
                else:
                    values = rng.standard_normal(n, dtype=np.float32)
                    values *= 0.02
                handle.write((to_bf16(values) if dtype == "BF16" else values).tobytes())
                left -= n
    return path.stat().st_size


def write_model(folder: Path, config: dict, shard_bytes: int, seed: int) -> None:
    """config.json, the weights in shards of at most shard_bytes (one tensor may exceed it alone),
    and, for more than one shard, model.safetensors.index.json as transformers writes them."""
    folder.mkdir(parents=True)
    shards: list[list] = [[]]
    filled = 0
    for tensor in tensors_of(config):
        size = int(np.prod(tensor[1])) * 2
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(tensor)
        filled += size
    rng = np.random.default_rng(seed)
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0], "BF16", rng)
    else:
        weight_map, total = {}, 0
        for index, shard in enumerate(shards, 1):
            name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(folder / name, shard, "BF16", rng)
            total += sum(int(np.prod(shape)) * 2 for _, shape, _ in shard)
            weight_map.update({tensor[0]: name for tensor in shard})
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    published = {**config, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(published, indent=2))


def write_adapter(folder: Path, config: dict, seed: int) -> None:
    """A rank-16 LoRA on every linear layer, as PEFT saves one (F32; random A and B, so the merge
    changes every targeted weight)."""
    folder.mkdir(parents=True)
    write_safetensors(folder / "adapter_model.safetensors", lora_tensors_of(config), "F32", np.random.default_rng(seed))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
        "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "target_modules": sorted(LINEAR),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


MAKE_TOKENIZER = (
    "from pathlib import Path; from llm2wasm.image.convert.tiny import make_tokenizer; make_tokenizer(Path('/w'))"
)


def make_tokenizer(image: str, folder: Path) -> None:
    """The tiny word-level tokenizer, written by the image's own tokenizers/transformers (the ones
    that read it back)."""
    subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}",
         "-v", f"{folder}:/w", "--entrypoint", "python", image, "-c", MAKE_TOKENIZER],
        check=True, capture_output=True,
    )  # fmt: skip


def params_of(config: dict) -> int:
    return sum(int(np.prod(shape)) for _, shape, _ in tensors_of(config))


# ---- the container's peak memory


def cgroup_dir(container_id: str) -> tuple[Path, int] | None:
    """The container's memory cgroup and its version, for the cgroupfs and systemd drivers."""
    for path, version in (
        (Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope"), 2),
        (Path(f"/sys/fs/cgroup/docker/{container_id}"), 2),
        (Path(f"/sys/fs/cgroup/memory/docker/{container_id}"), 1),
        (Path(f"/sys/fs/cgroup/memory/system.slice/docker-{container_id}.scope"), 1),
    ):
        if (path / ("memory.peak" if version == 2 else "memory.max_usage_in_bytes")).is_file():
            return path, version
    return None


def memory_stat(path: Path) -> dict[str, int]:
    stat = {}
    for line in (path / "memory.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        stat[key] = int(value)
    return stat


UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "kB": 1e3, "MB": 1e6, "GB": 1e9}


class PeakMemory(threading.Thread):
    """Polls, every `interval` seconds, the memory of the container named `prefix`... while it runs."""

    def __init__(self, prefix: str, interval: float = 1.0):
        super().__init__(daemon=True)
        self.prefix, self.interval = prefix, interval
        self.stopped = threading.Event()
        self.kernel_peak = 0  # the cgroup's own high-water mark (page cache included)
        self.anon_peak = 0  # polled: anonymous memory + shmem
        self.method = "not seen (the container ran under a second?)"

    def container_id(self) -> str | None:
        out = subprocess.run(
            ["docker", "ps", "-q", "--no-trunc", "--filter", f"name=^{self.prefix}"], capture_output=True, text=True
        ).stdout.split()
        return out[0] if out else None

    def run(self) -> None:
        container = None
        while not self.stopped.is_set() and container is None:
            container = self.container_id()
            if container is None:
                self.stopped.wait(self.interval)
        if container is None:
            return
        found = cgroup_dir(container)
        while not self.stopped.is_set():
            try:
                if found:
                    self.read_cgroup(*found)
                else:
                    self.read_docker_stats(container)
            except (OSError, ValueError):  # the container (and its cgroup) went away
                return
            self.stopped.wait(self.interval)

    def read_cgroup(self, path: Path, version: int) -> None:
        stat = memory_stat(path)
        if version == 2:
            self.method = "cgroup v2 memory.peak; anon + shmem of memory.stat polled every second"
            self.kernel_peak = max(self.kernel_peak, int((path / "memory.peak").read_text()))
            anon = stat.get("anon", 0) + stat.get("shmem", 0)
        else:
            self.method = (
                "cgroup v1 memory.max_usage_in_bytes; total_rss + total_shmem of memory.stat polled every second"
            )
            self.kernel_peak = max(self.kernel_peak, int((path / "memory.max_usage_in_bytes").read_text()))
            anon = stat.get("total_rss", 0) + stat.get("total_shmem", 0)
        self.anon_peak = max(self.anon_peak, anon)

    def read_docker_stats(self, container: str) -> None:
        self.method = "docker stats --no-stream polled every second (usage less inactive page cache): no cgroup peak"
        out = subprocess.run(
            ["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", container], capture_output=True, text=True
        ).stdout
        match = re.match(r"\s*([0-9.]+)\s*([A-Za-z]+)", out)
        if match and match.group(2) in UNITS:
            self.anon_peak = max(self.anon_peak, int(float(match.group(1)) * UNITS[match.group(2)]))


# ---- sizes and disk


def tree_bytes(folder: Path, seen: set) -> int:
    """Bytes of the files under folder, each inode once (the bundle hard-links the workspace's weights)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            info = os.lstat(os.path.join(root, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


def bundle_sizes(out: Path) -> tuple[int, int]:
    """(what is served: everything outside .llm2wasm, the workspace .llm2wasm beyond that)."""
    seen: set = set()
    served = 0
    for entry in out.iterdir():
        if entry.name == ".llm2wasm":
            continue
        if entry.is_dir():
            served += tree_bytes(entry, seen)
        else:
            info = entry.stat()
            seen.add((info.st_dev, info.st_ino))
            served += info.st_size
    return served, tree_bytes(out / ".llm2wasm", seen)


def disk_needed(config: dict, cases: list[str], keep: bool) -> tuple[int, int]:
    """(model + adapter, the most the conversions need beside them): per conversion the quantized
    weights (4 bits and a scale per 32: about 0.3 of bf16; 0.4 counted) and, with an adapter, the
    merged model (the size of the base), kept in the workspace; 1 GB for the rest."""
    model = params_of(config) * 2
    adapter = sum(int(np.prod(shape)) for _, shape, _ in lora_tensors_of(config)) * 4
    per_case = [int(0.4 * model) + (model if case.endswith("+lora") else 0) + int(GB) for case in cases]
    return model + (adapter if any(c.endswith("+lora") for c in cases) else 0), (
        sum(per_case) if keep else max(per_case)
    )


# ---- one conversion


def convert(args, work: Path, case: str, conv_template: str) -> dict:
    quantization, _, lora = case.partition("+")
    out = work / f"out-{quantization}{'-lora' if lora else ''}"
    log = work / f"{out.name}.log"
    cmd = [*INVOKE, "convert", str(work / "model"), "-q", quantization, "-o", str(out),
           "--conv-template", conv_template, "--context-window", "4096", "--prefill-chunk-size", "1024",
           "--image", args.image, "--no-lib-cache"]  # fmt: skip
    if lora:
        cmd += ["--adapter", str(work / "adapter")] + (["--peft-merge"] if args.peft_merge else [])
    if args.cpu:
        cmd += ["--cpu"]
    started = time.monotonic()
    with open(log, "w") as handle:
        process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        # the host runner names the container llm2wasm-convert-<its pid>-<random>
        peak = PeakMemory(f"llm2wasm-convert-{process.pid}-")
        peak.start()
        status = process.wait()
    wall = time.monotonic() - started
    peak.stopped.set()
    peak.join()
    row = {"case": case, "quantization": quantization, "lora": bool(lora), "status": status, "wall": wall,
           "kernel_peak": peak.kernel_peak, "anon_peak": peak.anon_peak, "method": peak.method}  # fmt: skip
    if status != 0:
        print(f"scale: {case} failed (exit {status}); the end of its output:\n"
              + "\n".join(log.read_text().splitlines()[-30:]), file=sys.stderr)  # fmt: skip
    state_path = out / ".llm2wasm" / "state.json"
    steps = json.loads(state_path.read_text())["steps"] if state_path.is_file() else {}
    row["steps"] = {step: steps[step].get("seconds") for step in STEPS if step in steps}
    merge_log = out / ".llm2wasm" / "logs" / "merge.log"
    if lora and merge_log.is_file():
        last = (merge_log.read_text().strip().splitlines() or [""])[-1]
        row["merge"] = "streaming" if last.startswith("streaming merge") else last.split(";")[0]
    if out.is_dir():
        row["served"], row["workspace"] = bundle_sizes(out)
    print(f"scale: {case}: exit {status}, {wall:.1f} s wall, steps {row['steps']}, peak "
          f"{peak.kernel_peak / GB:.2f} GB (anon + shmem {peak.anon_peak / GB:.2f} GB)", file=sys.stderr)  # fmt: skip
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def cell(value, fmt: str = "{:.1f}") -> str:
    return "—" if value is None else fmt.format(value)


def size(value: float) -> str:
    """Bytes for the text above a table: GB, or MB below one."""
    return f"{value / GB:.2f} GB" if value >= GB else f"{value / 1e6:.1f} MB"


def gigabytes(value: int | None) -> str:
    return f"{value / GB:.2f}" if value else "—"


def table_row(shape: str, row: dict) -> str:
    steps = row["steps"]
    wall = f"{row['wall']:.1f}" + ("" if row["status"] == 0 else f" (exit {row['status']})")
    cells = [
        shape,
        row["quantization"],
        "all-linear r16" if row["lora"] else "none",
        wall,
        *(cell(steps.get(step)) for step in STEPS),
        gigabytes(row["kernel_peak"]),
        gigabytes(row["anon_peak"]),
        gigabytes(row.get("served")),
        gigabytes(row.get("workspace")),
        row.get("merge", "—"),
    ]
    return "| " + " | ".join(cells) + " |"


def run_shape(args, shape: str, cases: list[str]) -> list[str]:
    config = SHAPES[shape]
    root = Path(args.work) if args.work else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    inputs, outputs = disk_needed(config, cases, args.keep)
    free = shutil.disk_usage(root).free
    if free < inputs + outputs:
        raise SystemExit(
            f"scale: {shape} needs about {(inputs + outputs) / GB:.1f} GB free under {root} (model and adapter "
            f"{inputs / GB:.1f} GB, conversions {outputs / GB:.1f} GB{', all kept' if args.keep else ''}); "
            f"it has {free / GB:.1f} GB: free some, or choose another folder with --work"
        )
    work = Path(tempfile.mkdtemp(prefix=f"llm2wasm-bench-scale-{shape}-", dir=root))
    rows = []
    try:
        started = time.monotonic()
        write_model(work / "model", config, int(args.shard_gb * GB), args.seed)
        make_tokenizer(args.image, work / "model")
        if any(case.endswith("+lora") for case in cases):
            write_adapter(work / "adapter", config, args.seed + 1)
        made = time.monotonic() - started
        model_bytes = tree_bytes(work / "model", set())
        adapter_bytes = tree_bytes(work / "adapter", set()) if (work / "adapter").is_dir() else 0
        shards = len(list((work / "model").glob("*.safetensors")))
        print(f"scale: {shape}: model {model_bytes / GB:.2f} GB in {shards} shard(s), adapter "
              f"{adapter_bytes / GB:.3f} GB, made in {made:.0f} s", file=sys.stderr)  # fmt: skip
        conv_template = CONV_TEMPLATES[config["model_type"]]
        for case in cases:
            rows.append(convert(args, work, case, conv_template))
    finally:
        if args.keep:
            print(f"scale: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    methods = sorted({row["method"] for row in rows})
    limit = memory_limit()
    count = params_of(config)
    count_text = f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"
    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({os.cpu_count()} cores): scale, {shape} shape "
        f"({count_text} parameters, random bf16), `invoke convert --no-lib-cache`"
        f"{' --cpu' if args.cpu else ''}{' --peft-merge' if args.peft_merge else ''}",
        "",
        f"Model {size(model_bytes)} on disk in {shards} shard(s), all-linear rank-16 adapter "
        f"{size(adapter_bytes)}, made in {made:.0f} s; free disk asked for {(inputs + outputs) / GB:.1f} GB "
        f"(of {free / GB:.0f} GB). Container memory limit "
        f"{'none read' if limit is None else f'{limit / 2**30:.1f} GiB'}. Peak memory: {'; '.join(methods)}.",
        "",
        "| shape | quantization | adapter | wall s | merge s | gen_config s | convert_weight s | compile s "
        "| peak GB (cgroup, with page cache) | peak anon + shmem GB | bundle GB | workspace GB | merge |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(table_row(shape, row) for row in rows),
        "",
    ]
    return lines


def memory_limit() -> int | None:
    sys.path.insert(0, str(ROOT / "src"))
    from llm2wasm.host.run import default_memory_limit

    return default_memory_limit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(BIG_SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--image", default="llm2wasm:app-hermetic")
    parser.add_argument("--work", help="folder for the models and bundles (default: the system's temporary folder)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest safetensors shard, GB (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the models and bundles (the path is printed)")
    parser.add_argument("--cpu", action="store_true", help="convert without the GPU (invoke convert --cpu)")
    parser.add_argument("--peft-merge", action="store_true", help="merge with peft, not tensor by tensor")
    parser.add_argument("--print-only", action="store_true", help="print the tables, do not append to results.md")
    parser.add_argument(
        "--memory-limit",
        help="the conversion container's memory limit, as Docker spells it (8g): does the conversion fit a "
        "machine of that size? (default: this machine's memory less 1 GiB)",
    )
    args = parser.parse_args()
    if args.memory_limit:  # invoke convert reads it (llm2wasm.host.run.default_memory_limit)
        os.environ["LLM2WASM_MEMORY_LIMIT"] = args.memory_limit
    shapes, cases = args.shapes.split(","), args.cases.split(",")
    for name, chosen, known in (("shape", shapes, SHAPES), ("case", cases, CASES)):
        unknown = [value for value in chosen if value not in known]
        if unknown:
            parser.error(f"unknown {name} {', '.join(unknown)}: choose from {', '.join(known)}")
    for shape in shapes:
        lines = run_shape(args, shape, cases)
        if args.print_only:
            print("\n".join(lines))
        else:
            record(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
