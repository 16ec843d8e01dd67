"""The preview server on a bundle-shaped folder (no model needed): what it serves, what it refuses."""

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.preview.server import check_bundle, make_server, serve_in_thread, served_config


def make_bundle(root: Path, base: str = "http://localhost:8000/") -> Path:
    weights = root / "model" / "resolve" / "main"
    weights.mkdir(parents=True)
    (weights / "mlc-chat-config.json").write_text("{}")
    (weights / "params_shard_0.bin").write_bytes(b"\0" * 16)
    (weights / "tensor-cache.json").write_text(json.dumps({"records": [{"dataPath": "params_shard_0.bin"}]}))
    (root / "lib").mkdir()
    (root / "lib" / "tiny.wasm").write_bytes(b"\0asm\x01\0\0\0")
    record = {"model": f"{base}model/", "model_id": "tiny", "model_lib": f"{base}lib/tiny.wasm"}
    (root / "app-config.json").write_text(json.dumps({"model_list": [record]}))
    (root / ".llm2wasm").mkdir()
    (root / ".llm2wasm" / "state.json").write_text("{}")
    return root


def fetch(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers["Content-Type"]


@pytest.fixture
def served(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    webllm = tmp_path / "webllm"
    (webllm / "lib").mkdir(parents=True)
    (webllm / "lib" / "index.js").write_text("export const stub = 1;\n")
    (webllm / "package.json").write_text(json.dumps({"version": "0.2.84"}))
    server, _ = serve_in_thread(bundle, port=0, webllm=webllm)
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_serves_page_bundle_and_webllm(served):
    status, body, kind = fetch(served)
    assert status == 200 and b"llm2wasm preview" in body and kind.startswith("text/html")
    status, body, kind = fetch(served + "lib/tiny.wasm")
    assert status == 200 and body[:4] == b"\0asm" and kind == "application/wasm"  # instantiateStreaming needs it
    assert fetch(served + "webllm/index.js")[0] == 200
    assert fetch(served + "preview.js")[2] == "text/javascript"


def test_app_config_base_replaced_only_when_served_elsewhere(served):
    config = json.loads(fetch(served + "app-config.json")[1])
    assert config["model_list"][0]["model_lib"] == served + "lib/tiny.wasm"
    info = json.loads(fetch(served + "preview-info.json")[1])
    assert info["rewritten"] is True and info["bundle_base"] == "http://localhost:8000/"
    assert info["webllm_version"] == "0.2.84"
    config = {"model_list": [{"model": "http://a/model/", "model_id": "x", "model_lib": "http://a/lib/x.wasm"}]}
    same, original = served_config(config, "http://a/")
    assert same == config and original == "http://a/"


def test_nothing_on_disk_is_rewritten(served, tmp_path):
    fetch(served + "app-config.json")
    on_disk = json.loads((tmp_path / "bundle" / "app-config.json").read_text())
    assert on_disk["model_list"][0]["model_lib"] == "http://localhost:8000/lib/tiny.wasm"


def test_404_names_the_file_and_private_state_is_not_served(served):
    status, body, _ = fetch(served + "model/resolve/main/params_shard_9.bin")
    assert status == 404 and b"/model/resolve/main/params_shard_9.bin not found" in body
    assert fetch(served + ".llm2wasm/state.json")[0] == 404
    assert fetch(served + "lib/../../etc/passwd")[0] == 404


@pytest.mark.parametrize(
    "breakage,message",
    [
        (lambda b: (b / "app-config.json").unlink(), "app-config.json not found"),
        (lambda b: (b / "lib" / "tiny.wasm").unlink(), "lib/tiny.wasm not found: the app config names it"),
        (lambda b: (b / "model/resolve/main/params_shard_0.bin").unlink(), "params_shard_0.bin not found"),
        (lambda b: (b / "app-config.json").write_text("{"), "is not a WebLLM app config"),
    ],
)
def test_not_a_bundle_is_a_usage_error_naming_the_file(tmp_path, breakage, message):
    bundle = make_bundle(tmp_path / "bundle")
    breakage(bundle)
    with pytest.raises(UsageError) as error:
        check_bundle(bundle)
    assert message in str(error.value) and error.value.exit_code == 2


def test_port_in_use_names_the_fix(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is in use: pass another with --port"):
            make_server(bundle, "127.0.0.1", port)
