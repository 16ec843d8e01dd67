"""One request to the preview server: the chat page, the served app config, the page's info, the
pinned WebLLM, or a file of the bundle; everything else refused with a status that says why. Serving
a published entry (`bundle` None), it serves no file but the page's: the model is the entry's URLs'.

Only answering: which files may be served is llm2wasm.image.preview.bundlefiles, the app config
llm2wasm.image.preview.appconfig, the public address llm2wasm.image.preview.addresses; the server
(llm2wasm.image.preview.server) makes a subclass of PreviewHandler bound to one bundle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib import resources
from pathlib import Path
from urllib.parse import quote, unquote

from llm2wasm.image.preview.addresses import LOOPBACK_NAMES, host_header
from llm2wasm.image.preview.appconfig import bundle_base, served_config
from llm2wasm.image.preview.bundlefiles import Refused, open_regular, path_segments, read_regular
from llm2wasm.image.preview.record import weights_url

# The chat page: package data of llm2wasm.image.preview (pyproject.toml), read with importlib.resources
# so that it is found however the package is installed.
PAGE_FILES = {"/": "page.html", "/index.html": "page.html", "/preview.js": "preview.js"}
# Bundle files get only these types (anything else is octet-stream): a bundle's .html or .svg
# must not become a page of this origin.
TYPES = {
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".json": "application/json",
    ".bin": "application/octet-stream",
    ".txt": "text/plain; charset=utf-8",
}
# A file of the bundle that a browser renders (should one be opened directly) is sandboxed: an
# opaque origin, no scripts. Fetches of wasm and weights ignore these headers.
BUNDLE_FILE_HEADERS = {"Content-Security-Policy": "sandbox; default-src 'none'"}


class PreviewHandler(BaseHTTPRequestHandler):
    bundle: Path | None  # None: the config is a published entry's (llm2wasm.image.preview.record)
    config: dict
    webllm: Path
    public_url: str
    public_host: str
    public_port: int

    def log_message(self, format, *args):
        if os.environ.get("LLM2WASM_PREVIEW_QUIET") != "1":
            super().log_message(format, *args)

    def served_base(self) -> str:
        # Never the request's Host: the page's URLs must not be whatever name the request used.
        return self.public_url

    def send_bytes(
        self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK, headers: dict | None = None
    ) -> None:
        self.send_response(status)
        self.send_headers(content_type, len(body), headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_headers(self, content_type: str, length: int, headers: dict | None = None) -> None:
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def not_found(self, path: str, what: str) -> None:
        self.send_bytes(f"404: {path} not found ({what})\n".encode(), "text/plain; charset=utf-8", HTTPStatus.NOT_FOUND)

    def refuse(self, path: str, refused: Refused) -> None:
        if refused.reason:
            self.log_message("refused %s: %s", path, refused.reason)
        if refused.status == HTTPStatus.NOT_FOUND:
            return self.not_found(path, refused.what)
        body = f"{refused.status.value}: {refused.what}\n".encode()
        return self.send_bytes(body, "text/plain; charset=utf-8", refused.status)

    def not_allowed(self):
        self.send_bytes(b"405: only GET and HEAD\n", "text/plain; charset=utf-8", HTTPStatus.METHOD_NOT_ALLOWED,
                        {"Allow": "GET, HEAD"})  # fmt: skip

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = not_allowed

    def right_host(self, path: str) -> bool:
        """Whether the request is for this server's public address. Another name for it (a DNS
        rebinding page's, or a LAN name) gets 421 and nothing of the bundle; localhost and the
        loopback addresses on the public port are sent to the public URL, the one origin the
        served app config names."""
        values = self.headers.get_all("Host") or []
        named = host_header(values[0], self.public_port) if len(values) == 1 else None
        if named == (self.public_host, self.public_port):
            return True
        if named is not None and named[0] in LOOPBACK_NAMES and named[1] == self.public_port:
            self.send_response(HTTPStatus.TEMPORARY_REDIRECT)
            self.send_header("Location", self.public_url + quote(path.lstrip("/")))
            self.send_headers("text/plain; charset=utf-8", 0)
            return False
        self.log_message("refused %s: Host %r is not %s (DNS rebinding defence)", path, values, self.public_url)
        body = f"421: this server answers only at {self.public_url}: open that (or pass --public-url)\n"
        self.send_bytes(body.encode(), "text/plain; charset=utf-8", HTTPStatus.MISDIRECTED_REQUEST)
        return False

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        refused = None
        try:
            segments = path_segments(self.path)
        except Refused as error:
            if error.status != HTTPStatus.NOT_FOUND:
                return self.refuse("(the request path)", error)
            refused, segments = error, []
        path = "/" + "/".join(segments)
        if not self.right_host(path):
            return None
        if refused is not None:
            return self.refuse(unquote(self.path.split("?", 1)[0]), refused)
        if path in PAGE_FILES:
            body = resources.files("llm2wasm.image.preview").joinpath(PAGE_FILES[path]).read_bytes()
            return self.send_bytes(body, TYPES.get(Path(PAGE_FILES[path]).suffix, "text/html; charset=utf-8"))
        if path == "/app-config.json":
            served = self.config if self.bundle is None else served_config(self.config, self.served_base())[0]
            return self.send_bytes(json.dumps(served).encode(), "application/json")
        if path == "/preview-info.json":
            return self.send_bytes(json.dumps(self.info()).encode(), "application/json")
        if segments[0] == "webllm" and len(segments) > 1:
            try:
                return self.send_file(self.webllm / "lib", segments[-1:], "text/javascript")
            except Refused:
                return self.not_found(path, f"WebLLM is not installed in {self.webllm}")
        if self.bundle is None:
            return self.not_found(path, "this preview runs a published entry: its files are at its own URLs")
        content_type = TYPES.get(Path(segments[-1]).suffix, "application/octet-stream")
        try:
            return self.send_file(self.bundle, segments, content_type)
        except Refused as refused:
            return self.refuse(path, refused)

    def send_file(self, root: Path, segments: list[str], content_type: str) -> None:
        fd, info = open_regular(root, segments)
        with os.fdopen(fd, "rb") as file:
            self.send_response(HTTPStatus.OK)
            self.send_headers(content_type, info.st_size, BUNDLE_FILE_HEADERS if root == self.bundle else None)
            if self.command != "HEAD":
                # a browser that goes away (a reload) needs no answer
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    shutil.copyfileobj(file, self.wfile, 1 << 20)  # weight shards: not read whole into memory

    def conversation(self) -> dict | None:
        """The bundle's conversation template as the chat mode shows it (None: completions only; for a
        published entry the page reads it from the entry's mlc-chat-config.json itself)."""
        if self.bundle is None:
            return None
        try:
            chat_config = json.loads(read_regular(self.bundle, "model/resolve/main/mlc-chat-config.json"))
        except (Refused, json.JSONDecodeError, UnicodeDecodeError):
            return None
        conv = chat_config.get("conv_template") if isinstance(chat_config, dict) else None
        if not isinstance(conv, dict):
            return None
        keys = ("name", "system_message", "stop_str", "stop_token_ids")
        return {key: conv.get(key) for key in keys}

    def info(self) -> dict:
        record = self.config["model_list"][0]
        version = None
        package = self.webllm / "package.json"
        if package.is_file():
            version = json.loads(package.read_text()).get("version")
        if self.bundle is None:
            return {
                "model_id": record["model_id"],
                "conversation": None,
                "required_features": record.get("required_features", []),
                "published": True,
                "weights_url": weights_url(record["model"]),
                "model_lib": record["model_lib"],
                "served_base": self.served_base(),
                "rewritten": False,
                "webllm_version": version,
            }
        original = bundle_base(record)
        return {
            "model_id": record["model_id"],
            "conversation": self.conversation(),
            "required_features": record.get("required_features", []),
            "bundle_base": original,
            "served_base": self.served_base(),
            "rewritten": original != self.served_base(),
            "webllm_version": version,
        }
