"""STAND-IN for `python -m mlc_llm` (mlc-llm v0.20.0 python/mlc_llm/__main__.py and cli/*.py).

Argument errors exit 2 with the message on stderr (argparse); errors after parsing are uncaught
exceptions (exit 1), as upstream. Test hooks (stand-in only): MLC_LLM_STANDIN_LOG names a file that
gets one JSON line when a call starts and one when it ends; MLC_LLM_STANDIN_DELAY (seconds) makes
convert_weight and compile take that long, so tests can see them overlap or kill one midway.
"""

import argparse
import hashlib
import json
import os
import sys
import time

from .interface.gen_config import CONV_TEMPLATES, gen_config
from .quantization import QUANTIZATION

SUBCOMMANDS = ["compile", "convert_weight", "gen_config", "chat", "serve", "package", "calibrate", "router"]
SHARD_LIMIT = 32 * 1024 * 1024
BITS = {"q0f16": 16, "q0bf16": 16, "q0f32": 32, "q4f32_1": 4.5}


def record(argv, event):
    log = os.environ.get("MLC_LLM_STANDIN_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(json.dumps({"event": event, "argv": argv, "cwd": os.getcwd(), "time": time.time()}) + "\n")


def config_file(path):
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"Cannot find model config: {path}")
    return path


def cmd_gen_config(argv):
    parser = argparse.ArgumentParser("MLC LLM Configuration Generator")
    parser.add_argument("config")
    parser.add_argument("--quantization", required=True, choices=list(QUANTIZATION))
    parser.add_argument("--model-type", default="auto")
    parser.add_argument("--conv-template", required=True, choices=sorted(CONV_TEMPLATES))
    parser.add_argument("--context-window-size", type=int)
    parser.add_argument("--sliding-window-size", type=int)
    parser.add_argument("--prefill-chunk-size", type=int)
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--output", "-o", required=True)
    args = parser.parse_args(argv)
    gen_config(
        config_file(args.config),
        args.quantization,
        args.conv_template,
        args.output,
        args.context_window_size,
        args.prefill_chunk_size,
        args.sliding_window_size,
        args.max_batch_size,
        args.model_type,
    )


def weight_files(source):
    names = sorted(os.listdir(source))
    safetensors = [n for n in names if n.endswith(".safetensors")]
    if safetensors:
        return "huggingface-safetensor", safetensors
    bins = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
    if bins:
        return "huggingface-torch", bins
    raise ValueError(f"Cannot find weights in {source}: no *.safetensors or pytorch_model*.bin")


def cmd_convert_weight(argv):
    parser = argparse.ArgumentParser("MLC AutoLLM Quantization Framework")
    parser.add_argument("config")
    parser.add_argument("--quantization", required=True, choices=list(QUANTIZATION))
    parser.add_argument("--model-type", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--source")
    parser.add_argument(
        "--source-format", default="auto", choices=["auto", "huggingface-torch", "huggingface-safetensor", "awq"]
    )
    parser.add_argument("--output", "-o", required=True)
    args = parser.parse_args(argv)
    config = config_file(args.config)
    source = os.path.dirname(config)
    _, files = weight_files(source)
    # Upstream's side effect: a single model.safetensors gets an index file written beside it,
    # in the SOURCE folder (fails on a read-only mount).
    if files == ["model.safetensors"]:
        from safetensors import safe_open

        with safe_open(os.path.join(source, "model.safetensors"), "np") as handle:
            weight_map = {key: "model.safetensors" for key in handle.keys()}
        with open(os.path.join(source, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    os.makedirs(args.output, exist_ok=True)
    payload = b"".join(open(os.path.join(source, name), "rb").read() for name in files)
    shards, offset = [], 0
    while offset < len(payload) or not shards:
        chunk = payload[offset : offset + SHARD_LIMIT]
        name = f"params_shard_{len(shards)}.bin"
        with open(os.path.join(args.output, name), "wb") as handle:
            handle.write(chunk)
        shards.append(
            {
                "dataPath": name,
                "format": "raw-shard",
                "nbytes": len(chunk),
                "records": [
                    {
                        "name": f"standin.param_{len(shards)}",
                        "shape": [len(chunk)],
                        "dtype": "uint8",
                        "format": "raw",
                        "nbytes": len(chunk),
                        "byteOffset": 0,
                    }
                ],
                "md5sum": hashlib.md5(chunk).hexdigest(),
            }
        )
        offset += SHARD_LIMIT
    bits = BITS.get(args.quantization, 4.0)
    cache = {
        "metadata": {"ParamSize": len(payload) // 2, "ParamBytes": len(payload), "BitsPerParam": bits},
        "records": shards,
    }
    with open(os.path.join(args.output, "tensor-cache.json"), "w") as handle:
        json.dump(cache, handle)
    print(f"[stand-in] Parameter size after quantization: {len(payload) / 2**30:.3f} GB", file=sys.stderr)


def find_mlc_wasm_runtime():
    candidates = [os.path.join("web", "dist", "wasm")]
    if os.environ.get("MLC_LLM_SOURCE_DIR"):
        candidates.append(os.path.join(os.environ["MLC_LLM_SOURCE_DIR"], "web", "dist", "wasm"))
    for directory in candidates:
        path = os.path.join(directory, "mlc_wasm_runtime.bc")
        if os.path.isfile(path):
            return path
    raise RuntimeError(
        "Cannot find library: mlc_wasm_runtime.bc\n"
        f"Make sure you have run `./web/prep_emcc_deps.sh` and `export MLC_LLM_SOURCE_DIR=/path/to/mlc-llm` "
        f"so that we can locate the file. We tried to look up the following possible locations:\n{candidates}"
    )


def cmd_compile(argv):
    parser = argparse.ArgumentParser("MLC LLM Compiler")
    parser.add_argument("model")
    parser.add_argument("--quantization", choices=list(QUANTIZATION))
    parser.add_argument("--model-type", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--host", default="auto")
    parser.add_argument("--opt", default="O2")
    parser.add_argument("--system-lib-prefix", default="auto")
    parser.add_argument("--output", "-o", required=True)
    parser.add_argument("--overrides", default="")
    parser.add_argument("--enable-subgroups", action="store_true")
    parser.add_argument("--debug-dump")
    args = parser.parse_args(argv)
    if not args.output.endswith(".wasm") and args.device == "webgpu":
        parser.error("argument --output/-o: for webgpu the output must end in .wasm")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        parser.error(f"argument --output/-o: directory does not exist: {os.path.dirname(args.output)}")
    model = args.model
    if os.path.isdir(model):
        model = os.path.join(model, "mlc-chat-config.json")
    with open(model) as handle:
        chat_config = json.load(handle)
    if args.device != "webgpu":
        raise RuntimeError(f"stand-in mlc_llm compiles only --device webgpu, not {args.device}")
    mlc_runtime = find_mlc_wasm_runtime()
    # Link through the real (patched) TVM helper, which calls emcc with TVM's three runtime .bc.
    from tvm.support.emcc import create_tvmjs_wasm

    obj = args.output + ".standin-model.bc"
    with open(obj, "w") as handle:
        handle.write(f"stand-in model object for {chat_config.get('model_type')}\n")
    try:
        create_tvmjs_wasm(args.output, [obj], libs=[mlc_runtime])
    finally:
        os.remove(obj)
    params = chat_config["model_config"].get("hidden_size", 64) * chat_config["model_config"].get(
        "num_hidden_layers", 2
    )
    esc = "\x1b[92m"
    end = "\x1b[0m"
    print(
        f"[stand-in] {esc}Total memory usage without KV cache:{end} {params / 1000 + 100:.2f} MB "
        f"(Parameters: {params / 1000:.2f} MB. Temporary buffer: 100.00 MB)",
        file=sys.stderr,
    )
    print(f"[stand-in] {esc}KV cache size:{end} 0.06 MB per token in the context window", file=sys.stderr)
    print(f"[stand-in] {esc}Total memory usage with a 4K KV cache:{end} {params / 1000 + 356:.2f} MB", file=sys.stderr)


def main(argv):
    parser = argparse.ArgumentParser("MLC LLM Command Line Interface.")
    parser.add_argument("subcommand", choices=SUBCOMMANDS, help="Subcommand to to run. (choices: %(choices)s)")
    if not argv or argv[0] in {"-h", "--help"}:
        parser.print_help()
        return 0
    parsed = parser.parse_args(argv[:1])
    record(argv, "start")
    handlers = {"gen_config": cmd_gen_config, "convert_weight": cmd_convert_weight, "compile": cmd_compile}
    if parsed.subcommand not in handlers:
        raise NotImplementedError(f"the stand-in mlc_llm does not implement {parsed.subcommand}")
    if parsed.subcommand in {"convert_weight", "compile"}:
        time.sleep(float(os.environ.get("MLC_LLM_STANDIN_DELAY", "0")))
    handlers[parsed.subcommand](argv[1:])
    record(argv, "end")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
