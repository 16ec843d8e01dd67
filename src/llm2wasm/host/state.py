"""Which image IDs passed which checks: an unchanged layer is not verified again."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

from llm2wasm.host.layers import ancestors, get_layer
from llm2wasm.host.pins import PROJECT_ROOT, Profile

STATE_DIR = PROJECT_ROOT / ".llm2wasm"


def checks_digest(layer: str, profile: Profile, selftest: bool = True) -> str:
    """Changes when a check that applies to the layer, or any pin, changes. An image verified with
    its selftest skipped (`--no-selftest`) gets another digest: publish, which asks for the full
    one, refuses it."""
    digest = hashlib.sha256()
    if not selftest and get_layer(layer).selftest:
        digest.update(b"selftest skipped")
    files = [PROJECT_ROOT / "verify" / "conftest.py", PROJECT_ROOT / "src" / "llm2wasm" / "host" / "checks.py"]
    files += [step.check_module for step in ancestors(layer)]
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(json.dumps(profile.pins, sort_keys=True).encode())
    return digest.hexdigest()


class VerifiedImages:
    """Per profile, keyed by layer and image ID: an image that passed a layer's checks passed them,
    whatever it is tagged as, and a failing image never erases the record of another one."""

    def __init__(self, profile: str, state_dir: Path = STATE_DIR):
        self.path = state_dir / "state" / f"{profile}.json"
        # layers of two branches are verified at the same time
        self._lock = threading.Lock()
        try:
            self.records = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.records = {}

    @staticmethod
    def _key(layer: str, image_id: str) -> str:
        return f"{layer}@{image_id}"

    def is_verified(self, layer: str, image_id: str, digest: str) -> bool:
        record = self.records.get(self._key(layer, image_id))
        return bool(record) and record["checks_digest"] == digest

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records, indent=2))
        tmp.replace(self.path)

    def record(self, layer: str, image_id: str, digest: str) -> None:
        with self._lock:
            self.records[self._key(layer, image_id)] = {
                "checks_digest": digest,
                "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self._save()

    def forget(self, layer: str, image_id: str) -> None:
        with self._lock:
            if self.records.pop(self._key(layer, image_id), None) is not None:
                self._save()
