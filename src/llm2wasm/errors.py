"""Errors the command line turns into a message and an exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix. Exit status 2."""

    exit_code = 2


class BuildFailed(Exception):
    """A layer failed to build or failed its checks. Exit status 1."""

    exit_code = 1

    def __init__(self, layer: str, reason: str, output: str = ""):
        self.layer = layer
        self.reason = reason
        self.output = output
        super().__init__(f"layer {layer!r}: {reason}")


def exit_status(run: Callable[[], int | None]) -> int:
    """Run an `llm2wasm` command: its exit status, or a UsageError's message and status, or 130 on Ctrl-C."""
    try:
        return int(run() or 0)
    except UsageError as error:
        print(f"llm2wasm: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("llm2wasm: interrupted; a re-run resumes after the last finished step", file=sys.stderr)
        return 130
