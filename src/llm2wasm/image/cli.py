"""The `llm2wasm` command inside the image: convert, selftest, preview."""

from __future__ import annotations

import argparse
import sys

from llm2wasm import __version__
from llm2wasm.errors import exit_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm2wasm",
        description="Convert a Hugging Face model (optionally with a PEFT adapter) into a WebLLM bundle.",
    )
    parser.add_argument("--version", action="version", version=f"llm2wasm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from llm2wasm.image.convert.command import add_convert_arguments, add_selftest_arguments

    add_convert_arguments(sub.add_parser("convert", help="convert a model folder into a WebLLM bundle"))
    add_selftest_arguments(sub.add_parser("selftest", help="convert a tiny random Llama + LoRA end to end"))
    from llm2wasm.image.preview.server import add_preview_arguments

    add_preview_arguments(sub.add_parser("preview", help="serve a bundle with a chat page that runs it in WebLLM"))
    from llm2wasm.image.batch.command import add_batch_arguments

    add_batch_arguments(sub.add_parser("batch", help="many conversions from one spec (models.toml), item by item"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from llm2wasm.image.hostpaths import show_host_paths_on_stderr

    show_host_paths_on_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return exit_status(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
