"""What a conversion tells the terminal while it runs, and how it runs a step's command.

Every step runs its tool with the output in the step's log, not on the terminal: the terminal gets
one line per step and a heartbeat while a long step runs, and a failed step shows the log's last
lines (StepFailed). Separate from the steps themselves (llm2wasm.image.convert.steps) and their
bookkeeping (llm2wasm.image.convert.workspace), which both report through it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from llm2wasm.image.hostpaths import host_paths

HEARTBEAT_SECONDS = 30.0
# Weight conversion and compilation run in two threads at once: a line is printed whole, and
# state.json (llm2wasm.image.convert.workspace) is rewritten by one of them at a time.
print_lock = threading.Lock()


def say(message: str) -> None:
    with print_lock:
        print(message, file=sys.stderr, flush=True)


class StepFailed(Exception):
    def __init__(self, step: str, log: Path):
        self.step, self.log = step, log
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""
        super().__init__(f"step {step} failed; last lines of {log}:\n{tail}")


def run_logged(
    step: str, cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> None:
    """Run a step's command, output to its log, a heartbeat on the terminal while it runs. The log
    keeps the tool's own words, container paths and all; its second line says which host folder each
    mounted path is (what the terminal shows instead: llm2wasm.image.hostpaths)."""
    started = time.monotonic()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        mounted = host_paths()
        if mounted:
            handle.write(
                "# paths here are the container's: "
                + "; ".join(f"{c} is {h}" for c, h in sorted(mounted.items()))
                + "\n"
            )
        handle.flush()
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        while True:
            try:
                status = proc.wait(timeout=HEARTBEAT_SECONDS)
                break
            except subprocess.TimeoutExpired:
                say(f"  … {step} running, {time.monotonic() - started:.0f}s so far (log: {log})")
    if status != 0:
        raise StepFailed(step, log)
