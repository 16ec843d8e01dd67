"""One conversion at a time per output folder.

Two conversions into one folder destroy each other's work (each clears the other's in-progress
temporaries and replaces its bundle), so a conversion holds an exclusive lock on the folder itself
(flock on the directory: no lock file to go stale, released by the kernel when the process dies,
and seen across containers that mount the same folder). Who holds it is written beside the state,
so the one refused can be told which process to wait for.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llm2wasm.errors import UsageError

OWNER_FILE = Path(".llm2wasm") / "owner.json"
# the pid of the `invoke convert` / `invoke batch` that started the container, so the message
# names a process the user can see on the host
HOST_PID_VARIABLE = "LLM2WASM_HOST_PID"


def describe(owner: dict) -> str:
    parts = [f"pid {owner.get('pid')} in {owner.get('host')}"]
    if owner.get("host_pid"):
        parts.append(f"started by pid {owner['host_pid']} on the host")
    if owner.get("started"):
        parts.append("since " + time.strftime("%H:%M:%S", time.localtime(owner["started"])))
    return ", ".join(parts)


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    output.mkdir(parents=True, exist_ok=True)
    handle = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = describe(json.loads((output / OWNER_FILE).read_text()))
            except (OSError, ValueError):
                who = "its owner is not recorded yet"
            raise UsageError(
                f"{output} is being written by another conversion ({who}): wait for it to finish or stop it, "
                "or choose another output folder"
            ) from None
        owner = output / OWNER_FILE
        owner.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        if os.environ.get(HOST_PID_VARIABLE, "").isdigit():
            record["host_pid"] = int(os.environ[HOST_PID_VARIABLE])
        owner.write_text(json.dumps(record))
        try:
            yield
        finally:
            owner.unlink(missing_ok=True)
    finally:
        os.close(handle)  # releases the lock
