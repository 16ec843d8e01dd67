"""Argument parsing for `llm2wasm convert` and `llm2wasm selftest`."""

from __future__ import annotations

import argparse
import importlib.util

from llm2wasm.errors import UsageError, exit_status
from llm2wasm.image.convert.inputs import DEFAULT_LINK_OPT, LINK_OPT_LEVELS


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="Hugging Face model folder (config.json, weights, tokenizer)"
    )
    parser.add_argument("--quantization", "-q", required=True, help="mlc_llm quantization, e.g. q4f16_1")
    parser.add_argument(
        "--conv-template",
        help="mlc_llm conversation template (default: the one that renders like the model's chat template)",
    )
    parser.add_argument(
        "--strict-template",
        action="store_true",
        help="refuse a --conv-template that renders differently from the model's own chat template",
    )
    parser.add_argument("--adapter", metavar="PEFT_DIR", help="PEFT adapter to merge into the model first")
    parser.add_argument(
        "--peft-merge",
        action="store_true",
        help="merge --adapter with transformers + peft, the whole model in memory, instead of the streaming "
        "merge (tensor by tensor, the default); what the streaming merge does not cover falls back to peft by itself",
    )
    parser.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="run even when the estimate of the memory the conversion needs exceeds what this machine or the "
        "container's limit has (docs/CONVERT.md); the estimate is said either way",
    )
    parser.add_argument("--model-id", help="model_id in the WebLLM app config (default: OUT's name)")
    parser.add_argument("--prefill-chunk-size", type=int, help="prefill chunk size (1024 avoids WebGPU buffer limits)")
    parser.add_argument("--context-window", type=int, help="context window size")
    parser.add_argument("--base-url", help="absolute URL the bundle will be served from (WebLLM needs absolute URLs)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing, different OUT")
    parser.add_argument(
        "--link-opt",
        choices=LINK_OPT_LEVELS,
        default=DEFAULT_LINK_OPT,
        help="binaryen's optimisation of the linked library (emcc -O level): O2, the default, links in about "
        "half the time of O3 (TVM's own level) for a library a few percent larger",
    )
    parser.add_argument(
        "--no-wgsl-repair",
        action="store_true",
        help="fail on TVM's read_write buffer defect instead of declaring never-written buffers read-only",
    )
    parser.add_argument(
        "--no-lib-cache",
        action="store_true",
        help="compile the library even when the library cache ($LLM2WASM_LIB_CACHE) holds one of the same "
        "shape, settings and tools (docs/CONVERT.md); nor add it there",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the merge and weight conversion run (default auto: the GPU when the container has one)",
    )
    parser.add_argument("--output", "-o", required=True, metavar="OUT", help="output folder for the bundle")
    parser.set_defaults(run=_run_convert)


def add_selftest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep", metavar="DIR", help="keep the selftest's model and bundle in DIR")
    parser.set_defaults(run=_run_selftest)


def convert_parser() -> argparse.ArgumentParser:
    """The parser of `llm2wasm convert` alone: the one llm2wasm.image.cli adds as its `convert` step."""
    parser = argparse.ArgumentParser(prog="llm2wasm convert")
    add_convert_arguments(parser)
    return parser


def convert_main(argv: list[str]) -> int:
    """`llm2wasm convert ARGV...` run in this process as llm2wasm.image.cli.main runs it: same arguments,
    messages and exit status. For what cli itself reaches (a batch item, the selftest), which so
    need not import cli back."""
    from llm2wasm.image.hostpaths import show_host_paths_on_stderr

    show_host_paths_on_stderr()
    args = convert_parser().parse_args(argv)
    return exit_status(lambda: args.run(args))


def require_the_image(command: str) -> None:
    """`convert` and `selftest` run mlc_llm, which only the image has. Run elsewhere (the toolkit's
    .venv installs the same `llm2wasm` command), say where they run instead of a ModuleNotFoundError
    from deep inside the pipeline. In the image, on a read-only root, give emscripten a cache it
    can write to (llm2wasm.image.convert.emcache) before anything links."""
    from llm2wasm.image.convert.emcache import ensure_writable_cache

    ensure_writable_cache()
    if importlib.util.find_spec("mlc_llm") is None:
        raise UsageError(
            f"`llm2wasm {command}` runs inside the llm2wasm image, which has mlc_llm (this Python has not). "
            "On this machine run it through the image: invoke convert MODEL_DIR -q q4f16_1 -o OUT --profile PROFILE "
            "(PROFILE: stable with an NVIDIA GPU, cpu without one, hermetic without internet; docs/CONVERT.md)"
        )


def _run_convert(args: argparse.Namespace) -> int:
    require_the_image("convert")
    from llm2wasm.image.convert.pipeline import run_convert

    return run_convert(args)


def _run_selftest(args: argparse.Namespace) -> int:
    require_the_image("selftest")
    from llm2wasm.image.convert.selftest import run_selftest

    return run_selftest(args, convert=convert_main)
