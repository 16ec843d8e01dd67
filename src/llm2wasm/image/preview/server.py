"""The preview server: a bundle, the pinned WebLLM and a chat page, on one origin.

Nothing in the bundle is rewritten on disk. Its app-config.json names absolute URLs (WebLLM needs
them); the served copy names the server's public URL (`--public-url`, by default the address it
listens on) instead, and the page says so when that differs from the one the bundle was made for.

A bundle is hostile input. The server hands out only regular files inside it, reached without
following a symlink and outside its hidden folders (`.llm2wasm`), after the request path is
normalised; it answers only to its own public address, so a page of another site that rebinds its
name to this machine (DNS rebinding) gets nothing; it never lists folders nor accepts anything but
GET and HEAD.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import stat
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from llm2wasm.errors import UsageError

DEFAULT_WEBLLM_DIR = "/opt/llm2wasm/webllm"
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
# Names a browser on this machine may use for the public address's port; they are sent there.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
HOST_HEADER = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::(?P<port>[0-9]{1,5}))?")
# A file of the bundle that a browser renders (should one be opened directly) is sandboxed: an
# opaque origin, no scripts. Fetches of wasm and weights ignore these headers.
BUNDLE_FILE_HEADERS = {"Content-Security-Policy": "sandbox; default-src 'none'"}


class Refused(Exception):
    """A request (or a file the app config names) that is not served; `reason` is for the log."""

    def __init__(self, status: HTTPStatus, what: str, reason: str | None = None):
        super().__init__(what)
        self.status, self.what, self.reason = status, what, reason


def webllm_dir() -> Path:
    return Path(os.environ.get("LLM2WASM_WEBLLM_DIR", DEFAULT_WEBLLM_DIR))


def path_segments(raw: str) -> list[str]:
    """The request path (or a path the app config names, with a leading /) as segments: decoded
    once, `\\` taken for `/`, empty and `.` segments dropped, `..` applied. Raises Refused: 400
    for what is not a path, 404 for one that leaves the root or has a hidden segment. Everything
    after this sees only the segments, so no spelling of a path reaches a file another does not."""
    if not raw.startswith("/"):
        raise Refused(HTTPStatus.BAD_REQUEST, "not a path", f"request target {raw[:80]!r} is not a path")
    try:
        decoded = unquote(raw.split("?", 1)[0].split("#", 1)[0], errors="strict")
    except UnicodeDecodeError:
        raise Refused(HTTPStatus.BAD_REQUEST, "not UTF-8", "the path is not UTF-8 once decoded") from None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded):
        raise Refused(HTTPStatus.BAD_REQUEST, "control characters", "the path holds control characters")
    segments: list[str] = []
    for segment in decoded.replace("\\", "/").split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise Refused(HTTPStatus.NOT_FOUND, "outside the bundle", "the path leaves the bundle")
            segments.pop()
        else:
            segments.append(segment)
    if any(segment.startswith(".") for segment in segments):
        raise Refused(HTTPStatus.NOT_FOUND, "a hidden file", "the path has a hidden segment (.llm2wasm and the like)")
    return segments


def open_regular(root: Path, segments: list[str]) -> tuple[int, os.stat_result]:
    """An open descriptor of the regular file at `segments` under `root`, and its stat. Each
    segment is looked up in the folder opened before it, and none is followed if it is a symlink
    (lstat, then O_NOFOLLOW, then fstat of what was opened): a symlink anywhere on the way, a
    folder, a device or a pipe is refused (Refused, 404), whatever it points at."""
    if not segments:
        raise Refused(HTTPStatus.NOT_FOUND, "a folder: no listings", "folders are not listed")
    shown = "/".join(segments)
    try:
        folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise Refused(HTTPStatus.NOT_FOUND, f"{root} is not there", f"{root}: {error.strerror}") from None
    try:
        for index, name in enumerate(segments):
            last = index == len(segments) - 1
            try:
                info = os.lstat(name, dir_fd=folder)
            except FileNotFoundError:
                raise Refused(HTTPStatus.NOT_FOUND, f"not in the bundle {root}") from None
            except OSError as error:
                raise Refused(HTTPStatus.NOT_FOUND, "not readable", f"{shown}: {error.strerror}") from None
            if stat.S_ISLNK(info.st_mode):
                target = "/".join([*segments[:index], name])
                try:
                    points_at = os.readlink(name, dir_fd=folder)
                except OSError:
                    points_at = "?"
                raise Refused(
                    HTTPStatus.NOT_FOUND,
                    "a symlink in the bundle: not followed",
                    f"{target} is a symlink (to {points_at!r}): only regular files are served",
                )
            if not last:
                if not stat.S_ISDIR(info.st_mode):
                    raise Refused(HTTPStatus.NOT_FOUND, f"not in the bundle {root}")
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            elif stat.S_ISDIR(info.st_mode):
                raise Refused(HTTPStatus.NOT_FOUND, "a folder: no listings", f"{shown} is a folder: not listed")
            elif not stat.S_ISREG(info.st_mode):
                raise Refused(HTTPStatus.NOT_FOUND, "not a regular file", f"{shown} is not a regular file")
            else:
                # O_NONBLOCK: a FIFO swapped in after the lstat must not hang the server
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            try:
                opened = os.open(name, flags, dir_fd=folder)
            except OSError as error:
                # ELOOP/ENOTDIR: it became a symlink after the lstat
                raise Refused(HTTPStatus.NOT_FOUND, "not readable", f"{shown}: {error.strerror}") from None
            now = os.fstat(opened)
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino) or (last and not stat.S_ISREG(now.st_mode)):
                os.close(opened)
                raise Refused(HTTPStatus.NOT_FOUND, "changed while opened", f"{shown} changed while it was opened")
            os.close(folder)
            folder = opened
        result, folder = folder, -1
        return result, now
    finally:
        if folder >= 0:
            os.close(folder)


def read_regular(root: Path, relative: str) -> bytes:
    """The bytes of a regular file of the bundle, found as a request for it would be."""
    fd, _ = open_regular(root, path_segments("/" + relative))
    with os.fdopen(fd, "rb") as file:
        return file.read()


def is_regular(root: Path, relative: str) -> bool:
    try:
        os.close(open_regular(root, path_segments("/" + relative))[0])
    except Refused:
        return False
    return True


def check_bundle(out: Path) -> dict:
    """The bundle's app config, after checking that everything it names is there, as the server
    will serve it: regular files, no symlinks, nothing hidden or outside (exit 2 otherwise)."""
    if not out.is_dir():
        raise UsageError(f"{out} is not a folder: pass the output folder of `llm2wasm convert`")
    config_path = out / "app-config.json"
    if not is_regular(out, "app-config.json"):
        raise UsageError(f"{config_path} not found: {out} is not a bundle made by `llm2wasm convert`")
    try:
        config = json.loads(read_regular(out, "app-config.json"))
        record = config["model_list"][0]
        base = bundle_base(record)
        lib_path, model_path = record["model_lib"][len(base) :], record["model"][len(base) :]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise UsageError(f"{config_path} is not a WebLLM app config with one model ({exc}): convert again") from None
    if not is_regular(out, lib_path):
        raise UsageError(f"{out / lib_path} not found: the app config names it as the model library (model_lib)")
    weights = f"{model_path.rstrip('/')}/resolve/main"
    for name in ("mlc-chat-config.json", "tensor-cache.json"):
        if not is_regular(out, f"{weights}/{name}"):
            raise UsageError(f"{out / weights / name} not found: WebLLM fetches it for model {record['model_id']!r}")
    try:
        cache = json.loads(read_regular(out, f"{weights}/tensor-cache.json"))
        shards = [shard["dataPath"] for shard in cache.get("records", [])]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as exc:
        cache_path = out / weights / "tensor-cache.json"
        raise UsageError(f"{cache_path} is not a tensor cache ({exc}): convert again") from None
    for shard in shards:
        if not isinstance(shard, str) or not is_regular(out, f"{weights}/{shard}"):
            raise UsageError(f"{out / weights / str(shard)} not found: tensor-cache.json lists it")
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


class PreviewHandler(BaseHTTPRequestHandler):
    bundle: Path
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
            served, _ = served_config(self.config, self.served_base())
            return self.send_bytes(json.dumps(served).encode(), "application/json")
        if path == "/preview-info.json":
            return self.send_bytes(json.dumps(self.info()).encode(), "application/json")
        if segments[0] == "webllm" and len(segments) > 1:
            try:
                return self.send_file(self.webllm / "lib", segments[-1:], "text/javascript")
            except Refused:
                return self.not_found(path, f"WebLLM is not installed in {self.webllm}")
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
        """The bundle's conversation template as the chat mode shows it (None: completions only)."""
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


def make_server(
    bundle: Path, host: str, port: int, webllm: Path | None = None, public_url: str | None = None
) -> ThreadingHTTPServer:
    config = check_bundle(bundle)
    if public_url is not None:
        public_address(public_url)  # a bad --public-url stops before the port is taken
    try:
        server = ThreadingHTTPServer((host, port), PreviewHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise port_in_use(host, port) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"cannot listen on {host}: it is not an address of this machine (--host)") from None
        raise
    url, public_host, public_port = public_address(public_url or default_public_url(host, server.server_address[1]))
    server.RequestHandlerClass = type(
        "BundleHandler",
        (PreviewHandler,),
        {
            "bundle": bundle.resolve(),
            "config": config,
            "webllm": webllm or webllm_dir(),
            "public_url": url,
            "public_host": public_host,
            "public_port": public_port,
        },
    )
    return server


def run_preview(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    server = make_server(bundle, args.host, args.port, public_url=args.public_url)
    if not (webllm_dir() / "lib" / "index.js").is_file():
        print(f"llm2wasm: warning: WebLLM not found in {webllm_dir()}: the page cannot load", file=sys.stderr)
    shown = server.RequestHandlerClass.public_url
    print(f"llm2wasm preview: {bundle} on {shown} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def serve_in_thread(
    bundle: Path, host: str = "127.0.0.1", port: int = 0, webllm: Path | None = None, public_url: str | None = None
):
    """For tests: a running server and its thread."""
    server = make_server(bundle, host, port, webllm, public_url)
    # a short poll: shutdown() waits for it, once per test
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def add_preview_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="OUT", help="a bundle made by `llm2wasm convert`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--public-url",
        help="the address the browser opens, http://HOST:PORT/ (default: http://HOST:PORT/ of --host and --port, "
        "127.0.0.1 for 0.0.0.0); the served app config names it, and requests for any other host are refused",
    )
    parser.set_defaults(run=run_preview)
