"""The preview server: a bundle, the pinned WebLLM and a chat page, on one origin.

Nothing in the bundle is rewritten on disk. Its app-config.json names absolute URLs (WebLLM needs
them); when the bundle was made for another address than the one the page is served from, the
served copy has its base URL replaced, and the page says so.
"""

from __future__ import annotations

import argparse
import errno
import json
import mimetypes
import os
import sys
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import UsageError

DEFAULT_WEBLLM_DIR = "/opt/llm2wasm/webllm"
PAGE_FILES = {"/": "page.html", "/index.html": "page.html", "/preview.js": "preview.js"}
TYPES = {
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".json": "application/json",
    ".bin": "application/octet-stream",
}


def webllm_dir() -> Path:
    return Path(os.environ.get("LLM2WASM_WEBLLM_DIR", DEFAULT_WEBLLM_DIR))


def check_bundle(out: Path) -> dict:
    """The bundle's app config, after checking that everything it names is there (exit 2 otherwise)."""
    if not out.is_dir():
        raise UsageError(f"{out} is not a folder: pass the output folder of `llm2wasm convert`")
    config_path = out / "app-config.json"
    if not config_path.is_file():
        raise UsageError(f"{config_path} not found: {out} is not a bundle made by `llm2wasm convert`")
    try:
        config = json.loads(config_path.read_text())
        record = config["model_list"][0]
        base = bundle_base(record)
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise UsageError(f"{config_path} is not a WebLLM app config with one model ({exc}): convert again") from None
    library = out / record["model_lib"][len(base) :]
    if not library.is_file():
        raise UsageError(f"{library} not found: the app config names it as the model library (model_lib)")
    weights = out / record["model"][len(base) :] / "resolve" / "main"
    for name in ("mlc-chat-config.json", "tensor-cache.json"):
        if not (weights / name).is_file():
            raise UsageError(f"{weights / name} not found: WebLLM fetches it for model {record['model_id']!r}")
    cache = json.loads((weights / "tensor-cache.json").read_text())
    for shard in cache.get("records", []):
        if not (weights / shard["dataPath"]).is_file():
            raise UsageError(f"{weights / shard['dataPath']} not found: tensor-cache.json lists it")
    return config


def bundle_base(record: dict) -> str:
    """The base URL the bundle was made for: what model_lib and model share before lib/ and model/."""
    lib = record["model_lib"]
    marker = lib.rfind("/lib/")
    if marker < 0 or not record["model"].startswith(lib[: marker + 1]):
        raise ValueError("model_lib and model do not share a base URL")
    return lib[: marker + 1]


def served_config(config: dict, served_base: str) -> tuple[dict, str]:
    """The app config with its base replaced by the one the page is served from."""
    served = json.loads(json.dumps(config))
    original = bundle_base(served["model_list"][0])
    for record in served["model_list"]:
        for key in ("model", "model_lib"):
            if record[key].startswith(original):
                record[key] = served_base + record[key][len(original) :]
    return served, original


class PreviewHandler(SimpleHTTPRequestHandler):
    bundle: Path
    config: dict
    webllm: Path

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(self.bundle), **kwargs)

    def log_message(self, format, *args):
        if os.environ.get("LLM2WASM_PREVIEW_QUIET") != "1":
            super().log_message(format, *args)

    def served_base(self) -> str:
        return f"http://{self.headers.get('Host') or self.server.server_address[0]}/"

    def send_bytes(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def not_found(self, path: str, what: str) -> None:
        self.send_bytes(f"404: {path} not found ({what})\n".encode(), "text/plain; charset=utf-8", HTTPStatus.NOT_FOUND)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = unquote(urlsplit(self.path).path)
        if path in PAGE_FILES:
            body = resources.files("llm2wasm.preview").joinpath(PAGE_FILES[path]).read_bytes()
            return self.send_bytes(body, TYPES.get(Path(PAGE_FILES[path]).suffix, "text/html; charset=utf-8"))
        if path == "/app-config.json":
            served, _ = served_config(self.config, self.served_base())
            return self.send_bytes(json.dumps(served).encode(), "application/json")
        if path == "/preview-info.json":
            return self.send_bytes(json.dumps(self.info()).encode(), "application/json")
        if path.startswith("/webllm/"):
            target = self.webllm / "lib" / Path(path).name
            if not target.is_file():
                return self.not_found(path, f"WebLLM is not installed in {self.webllm}")
            return self.send_bytes(target.read_bytes(), "text/javascript")
        parts = [part for part in path.split("/") if part]
        if ".." in parts or (parts and parts[0] == ".llm2wasm"):
            return self.not_found(path, "outside the bundle")
        target = self.bundle.joinpath(*parts)
        if not target.is_file():
            return self.not_found(path, f"not in the bundle {self.bundle}")
        return self.send_bytes(
            target.read_bytes(),
            TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream",
        )

    def conversation(self) -> dict | None:
        """The bundle's conversation template as the chat mode shows it (None: completions only)."""
        try:
            chat_config = json.loads((self.bundle / "model" / "resolve" / "main" / "mlc-chat-config.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        conv = chat_config.get("conv_template")
        if not isinstance(conv, dict):
            return None
        keys = ("name", "system_message", "stop_str", "stop_token_ids")
        return {key: conv.get(key) for key in keys}

    def info(self) -> dict:
        record = self.config["model_list"][0]
        original = bundle_base(record)
        version = None
        package = self.webllm / "package.json"
        if package.is_file():
            version = json.loads(package.read_text()).get("version")
        return {
            "model_id": record["model_id"],
            "conversation": self.conversation(),
            "required_features": record.get("required_features", []),
            "bundle_base": original,
            "served_base": self.served_base(),
            "rewritten": original != self.served_base(),
            "webllm_version": version,
        }


def port_in_use(host: str, port: int) -> UsageError:
    return UsageError(
        f"port {port} on {host} is in use: pass another with --port (e.g. --port {port + 1}), "
        "or stop what is listening there"
    )


def make_server(bundle: Path, host: str, port: int, webllm: Path | None = None) -> ThreadingHTTPServer:
    config = check_bundle(bundle)
    handler = type(
        "BundleHandler",
        (PreviewHandler,),
        {"bundle": bundle.resolve(), "config": config, "webllm": webllm or webllm_dir()},
    )
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise port_in_use(host, port) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"cannot listen on {host}: it is not an address of this machine (--host)") from None
        raise


def run_preview(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    server = make_server(bundle, args.host, args.port)
    if not (webllm_dir() / "lib" / "index.js").is_file():
        print(f"llm2wasm: warning: WebLLM not found in {webllm_dir()}: the page cannot load", file=sys.stderr)
    shown = args.public_url or f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}/"
    print(f"llm2wasm preview: {bundle} on {shown} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def serve_in_thread(bundle: Path, host: str = "127.0.0.1", port: int = 0, webllm: Path | None = None):
    """For tests: a running server and its thread."""
    server = make_server(bundle, host, port, webllm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def add_preview_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="OUT", help="a bundle made by `llm2wasm convert`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--public-url", help=argparse.SUPPRESS)  # what `invoke preview` publishes
    parser.set_defaults(run=run_preview)
