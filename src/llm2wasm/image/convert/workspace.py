"""OUT/.llm2wasm: what a conversion keeps between runs so that a re-run resumes.

Every step writes into a temporary folder under OUT/.llm2wasm/ and is moved into place only when
it finished; OUT/.llm2wasm/state.json records each finished step with a key of its inputs and of
the tools it ran (key_of; the keys themselves are llm2wasm.image.convert.converter.step_keys). A
step whose record and output are there with the same key is done. Kept apart from the steps so that
the record's layout is in one place, read by the converter and by the check of a previous bundle
before anything runs (llm2wasm.image.convert.pipeline).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from llm2wasm import __version__
from llm2wasm.image.convert.progress import print_lock

STATE_DIR = ".llm2wasm"
STATE_FILE = "state.json"


def remove(path: Path) -> None:
    """Remove a file, a symlink (not what it points at) or a folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def is_previous_bundle(output: Path) -> bool:
    return (output / STATE_DIR / STATE_FILE).is_file()


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Workspace:
    """OUT/.llm2wasm: finished step outputs, their keys, logs and in-progress temporaries."""

    def __init__(self, output: Path):
        self.root = output / STATE_DIR
        self.state_path = self.root / STATE_FILE
        self.logs = self.root / "logs"
        try:
            self.state = json.loads(self.state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.state = {"llm2wasm": __version__}
        self.state.setdefault("steps", {})

    def prepare(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob("tmp-*"):  # an interrupted step's partial output
            remove(leftover)
        self.save()

    def save(self) -> None:
        with print_lock:
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, indent=2))
            tmp.replace(self.state_path)

    def done(self, step: str, key: str) -> bool:
        record = self.state["steps"].get(step)
        return bool(record) and record["key"] == key and (self.root / step).exists()

    def finish(self, step: str, key: str, tmp: Path, seconds: float, extra: dict | None = None) -> None:
        target = self.root / step
        if target.exists():
            remove(target)
        tmp.replace(target)
        self.state["steps"][step] = {"key": key, "seconds": round(seconds, 2), **(extra or {})}
        self.save()

    def temp_dir(self, step: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"tmp-{step}-", dir=self.root))
