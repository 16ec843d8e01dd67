"""The one pin file: every upstream version and source, grouped in profiles.

``images/pins.toml`` holds profiles; a profile may ``extends`` another. ``resolve_profile``
flattens one profile and applies command-line overrides (``KEY=VALUE``), refusing unknown keys
so a typo cannot silently build the default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm2wasm.errors import UsageError

PROJECT_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_PIN_FILE = PROJECT_ROOT / "images" / "pins.toml"

# Keys that describe the profile rather than pin an upstream thing.
META_KEYS = {"extends", "description"}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    pins: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.pins[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.pins.get(key, default)

    @property
    def cuda(self) -> bool:
        return bool(self.pins.get("cuda", False))

    @property
    def cuda_major(self) -> int | None:
        """The CUDA major version the MLC wheels are built for: variant cu128 -> 12, cu130 -> 13."""
        variant = str(self.pins.get("variant", ""))
        if not self.cuda or not variant.startswith("cu") or not variant[2:].isdigit():
            return None
        return int(variant[2:-1])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "pins": dict(self.pins)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        return cls(name=data["name"], description=data["description"], pins=dict(data["pins"]))


def load_pin_file(path: Path = DEFAULT_PIN_FILE) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"pin file {path} not found: run from a checkout of llm2wasm or pass --pins") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"pin file {path} is not valid TOML: {exc}") from None
    profiles = data.get("profiles")
    if not isinstance(profiles, dict) or not profiles:
        raise UsageError(f"pin file {path} has no [profiles.NAME] tables")
    return profiles


def profile_names(path: Path = DEFAULT_PIN_FILE) -> list[str]:
    return list(load_pin_file(path))


def _flatten(profiles: dict[str, dict[str, Any]], name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name not in profiles:
        known = ", ".join(sorted(profiles))
        raise UsageError(f"unknown profile {name!r}: choose one of {known}")
    if name in seen:
        raise UsageError(f"profiles extend each other in a loop: {' -> '.join((*seen, name))}")
    table = profiles[name]
    parent = table.get("extends")
    merged = _flatten(profiles, parent, (*seen, name)) if parent else {}
    merged.update({k: v for k, v in table.items() if k != "extends"})
    return merged


def parse_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"override {text!r} is not KEY=VALUE: write e.g. --set emsdk_version=3.1.56")
    return key.strip(), value.strip()


def _coerce(key: str, value: str, current: Any) -> Any:
    if isinstance(current, bool):
        lowered = value.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise UsageError(f"pin {key!r} is true or false, not {value!r}: write --set {key}=true")
    return value


def resolve_profile(name: str, overrides: list[str] | tuple[str, ...] = (), path: Path = DEFAULT_PIN_FILE) -> Profile:
    profiles = load_pin_file(path)
    merged = _flatten(profiles, name)
    for text in overrides:
        key, value = parse_override(text)
        if key in META_KEYS or key not in merged:
            known = ", ".join(sorted(k for k in merged if k not in META_KEYS))
            raise UsageError(f"unknown pin {key!r} in --set {text}: pins of profile {name!r} are {known}")
        merged[key] = _coerce(key, value, merged[key])
    description = str(merged.pop("description", ""))
    return Profile(name=name, description=description, pins=merged)
