"""The preview server's public address, and the Host headers that name it.

The server answers only to its own public address (DNS rebinding defence): what a `--public-url`
may be, the default one for a listening address, and the (host, port) a Host header names are
parsed here, apart from the handler that acts on them (a redirect, or 421).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from llm2wasm.errors import UsageError

# Names a browser on this machine may use for the public address's port; they are sent there.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
HOST_HEADER = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::(?P<port>[0-9]{1,5}))?")


def public_address(url: str) -> tuple[str, str, int]:
    """(the URL as served, its host, its port) of a public URL: http(s)://HOST[:PORT]/ only."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or "@" in parts.netloc
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise UsageError(f"--public-url {url!r}: give the address the browser opens, http://HOST:PORT/")
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{parts.netloc.lower()}/", parts.hostname, port or default


def default_public_url(host: str, port: int) -> str:
    """Where a browser on this machine reaches a server listening on host:port."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def host_header(value: str | None, default_port: int) -> tuple[str, int] | None:
    """(host, port) that a Host header names; None when it is not one."""
    match = HOST_HEADER.fullmatch(value or "")
    if match is None:
        return None
    port = int(match["port"]) if match["port"] else default_port
    return (match["v6"] or match["name"]).lower(), port
