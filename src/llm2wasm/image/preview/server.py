"""The preview server: a bundle, the pinned WebLLM and a chat page, on one origin.

Nothing in the bundle is rewritten on disk. Its app-config.json names absolute URLs (WebLLM needs
them); the served copy names the server's public URL (`--public-url`, by default the address it
listens on) instead, and the page says so when that differs from the one the bundle was made for.

A bundle is hostile input. The server hands out only regular files inside it, reached without
following a symlink and outside its hidden folders (`.llm2wasm`), after the request path is
normalised; it answers only to its own public address, so a page of another site that rebinds its
name to this machine (DNS rebinding) gets nothing; it never lists folders nor accepts anything but
GET and HEAD.

With `--record FILE` instead of a bundle, the page runs a published `model_list` entry (what
`publish-bundle` wrote): the served app config holds that entry alone, checked by `record`, and the
browser loads the model from the entry's URLs; no file is served but the page's own.

This module makes and runs the server. Each rule has its module in llm2wasm.image.preview: a
request is answered by `handler`, which files may be served is decided by `bundlefiles`, the app
config is checked and rewritten by `appconfig`, a published entry is checked by `record`, the public
address and Host headers are `addresses`.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.image.preview.addresses import default_public_url, public_address
from llm2wasm.image.preview.appconfig import check_bundle
from llm2wasm.image.preview.handler import PreviewHandler
from llm2wasm.image.preview.record import read_record, record_config

DEFAULT_WEBLLM_DIR = "/opt/llm2wasm/webllm"


def webllm_dir() -> Path:
    return Path(os.environ.get("LLM2WASM_WEBLLM_DIR", DEFAULT_WEBLLM_DIR))


def port_in_use(host: str, port: int) -> UsageError:
    return UsageError(
        f"port {port} on {host} is in use: pass another with --port (e.g. --port {port + 1}), "
        "or stop what is listening there"
    )


def make_server(
    bundle: Path | None,
    host: str,
    port: int,
    webllm: Path | None = None,
    public_url: str | None = None,
    record: Path | None = None,
) -> ThreadingHTTPServer:
    """The server of a bundle, or (bundle None) of the published entry in the file `record`."""
    if (bundle is None) == (record is None):
        raise UsageError("preview serves a bundle (OUT) or a published entry (--record FILE): give one of them")
    config = check_bundle(bundle) if bundle is not None else record_config(read_record(record))
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
            "bundle": bundle.resolve() if bundle is not None else None,
            "config": config,
            "webllm": webllm or webllm_dir(),
            "public_url": url,
            "public_host": public_host,
            "public_port": public_port,
        },
    )
    return server


def run_preview(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle) if args.bundle else None
    record = Path(args.record) if args.record else None
    server = make_server(bundle, args.host, args.port, public_url=args.public_url, record=record)
    if not (webllm_dir() / "lib" / "index.js").is_file():
        print(f"llm2wasm: warning: WebLLM not found in {webllm_dir()}: the page cannot load", file=sys.stderr)
    shown = server.RequestHandlerClass.public_url
    what = bundle if bundle is not None else f"the published entry {record}"
    print(f"llm2wasm preview: {what} on {shown} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def serve_in_thread(
    bundle: Path | None,
    host: str = "127.0.0.1",
    port: int = 0,
    webllm: Path | None = None,
    public_url: str | None = None,
    record: Path | None = None,
):
    """For tests: a running server and its thread."""
    server = make_server(bundle, host, port, webllm, public_url, record)
    # a short poll: shutdown() waits for it, once per test
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def add_preview_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="OUT", nargs="?", help="a bundle made by `llm2wasm convert`")
    parser.add_argument(
        "--record",
        metavar="FILE",
        help="instead of OUT: a published model_list entry (webllm-model-record.json of `publish-bundle`); "
        "the page loads the model from its URLs",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--public-url",
        help="the address the browser opens, http://HOST:PORT/ (default: http://HOST:PORT/ of --host and --port, "
        "127.0.0.1 for 0.0.0.0); the served app config names it, and requests for any other host are refused",
    )
    parser.set_defaults(run=run_preview)
