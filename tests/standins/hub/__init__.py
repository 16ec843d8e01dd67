"""A stand-in Hugging Face Hub for tests that cannot reach huggingface.co.

server.py says what it implements and what it does not; store.py keeps the repositories, routes.py
answers the HTTP calls. The server needs only the standard library; `point_client_at` (for the
tests) configures the real `huggingface_hub` client to use it.
"""

from __future__ import annotations

import os
from pathlib import Path

# What a client must not bring from the calling environment: a login, offline mode, another token file.
CLIENT_UNSET = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")


def client_environment(endpoint: str, home: Path) -> dict[str, str]:
    """The environment that points a `huggingface_hub` client in a child process (`invoke convert
    org/name`, `invoke publish-bundle`) at `endpoint`, with its own home under `home`. The caller
    drops CLIENT_UNSET from what it passes on (and adds HF_TOKEN where the child should have one)."""
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
    }


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment less CLIENT_UNSET (no login of this machine's reaches the child),
    with `extra` on top (client_environment's variables, and HF_TOKEN where the child should have one)."""
    return {k: v for k, v in os.environ.items() if k not in CLIENT_UNSET} | extra


def files_of(folder: Path) -> dict[str, Path]:
    """The regular files directly in `folder`, by name: what seed_repo commits from a made model."""
    return {path.name: path for path in sorted(folder.iterdir()) if path.is_file()}


def point_client_at(monkeypatch, endpoint: str, home: Path) -> None:
    """Make the installed `huggingface_hub` client, in this test, talk to `endpoint` with its own
    home under `home`: no stored login, no HF_TOKEN, no telemetry, no Xet, not offline.

    The client reads its environment once, at import, into `huggingface_hub.constants`: the
    variables are set for child processes and the constants patched for this one."""
    from huggingface_hub import constants

    cache = home / "hub"
    for name, value in client_environment(endpoint, home).items():
        monkeypatch.setenv(name, value)
    for name in CLIENT_UNSET:
        monkeypatch.delenv(name, raising=False)
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
