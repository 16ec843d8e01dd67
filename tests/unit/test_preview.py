"""The preview server on a bundle-shaped folder (no model needed): what it serves, what it refuses."""

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.host import run
from llm2wasm.image.preview.appconfig import check_bundle, served_config
from llm2wasm.image.preview.server import make_server, serve_in_thread

SECRET = b"SECRET-OUTSIDE-THE-BUNDLE"
STATE = b'{"private": "STATE-OF-THE-CONVERSION"}'


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


def relink(bundle: Path, relative: str) -> None:
    """The file moved out of the bundle, a symlink to it in its place (which the server would not follow)."""
    path = bundle / relative
    elsewhere = bundle.parent / f"elsewhere-{path.name}"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)


def fetch(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers["Content-Type"]


def raw(url: str, path: str, host: str | None = None, method: str = "GET", hosts: tuple[str, ...] = ()):
    """One request with the path exactly as given (no client-side normalisation) and this Host
    header (by default the address's; `hosts`: several); returns (status, body, headers)."""
    address = url.split("/")[2]
    connection = http.client.HTTPConnection(address, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for value in hosts or ((host or address),):
            connection.putheader("Host", value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read(), response.headers
    finally:
        connection.close()


def start(tmp_path: Path, public_url: str | None = None):
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / ".llm2wasm" / "state.json").write_bytes(STATE)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    (bundle / "leak.txt").symlink_to(outside / "secret.txt")  # a symlink out of the bundle
    (bundle / "linked").symlink_to(outside)  # a folder symlink on the way to a file
    (bundle / "lib" / "alias.wasm").symlink_to("tiny.wasm")  # even one that stays inside
    (bundle / "page.html").write_text("<script>alert(1)</script>")
    os.mkfifo(bundle / "pipe")
    webllm = tmp_path / "webllm"
    (webllm / "lib").mkdir(parents=True)
    (webllm / "lib" / "index.js").write_text("export const stub = 1;\n")
    (webllm / "package.json").write_text(json.dumps({"version": "0.2.84"}))
    return serve_in_thread(bundle, port=0, webllm=webllm, public_url=public_url)[0]


@pytest.fixture
def served(tmp_path):
    server = start(tmp_path)
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
        (lambda b: relink(b, "lib/tiny.wasm"), "lib/tiny.wasm not found: the app config names it"),
        (lambda b: relink(b, "app-config.json"), "app-config.json not found"),
        (lambda b: relink(b, "model/resolve/main/params_shard_0.bin"), "params_shard_0.bin not found"),
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


@pytest.mark.parametrize(
    "path",
    [
        "/.llm2wasm/state.json",
        "/./.llm2wasm/state.json",
        "//.llm2wasm//state.json",
        "/lib/../.llm2wasm/state.json",
        "/%2e/%2ellm2wasm/state.json",
        "/%2Ellm2wasm%2Fstate.json",
        "/lib%5c..%5c.llm2wasm%5cstate.json",
        "/lib\\..\\.llm2wasm\\state.json",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/lib/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2f..%2fetc%2fpasswd",
        "//etc/passwd",
        "/%2f%2fetc/passwd",
    ],
)
def test_no_spelling_of_a_path_reaches_hidden_state_or_leaves_the_bundle(served, path):
    status, body, _ = raw(served, path)
    assert status == 404, (path, status, body)
    assert b"STATE-OF-THE-CONVERSION" not in body and b"root:" not in body


@pytest.mark.parametrize(
    "path", ["/lib/./tiny.wasm", "/model/../lib/tiny.wasm", "//lib//tiny.wasm", "/lib%2ftiny.wasm"]
)
def test_normalised_spellings_of_a_bundle_file_are_served(served, path):
    status, body, headers = raw(served, path)
    assert status == 200 and body == b"\0asm\x01\0\0\0" and headers["Content-Type"] == "application/wasm"


@pytest.mark.parametrize("path", ["/%ff", "/lib/%00tiny.wasm", "/a%0d%0aSet-Cookie:%20x=1"])
def test_a_path_that_is_not_text_is_a_bad_request(served, path):
    status, body, headers = raw(served, path)
    assert status == 400 and "Set-Cookie" not in headers and b"Set-Cookie" not in body


@pytest.mark.parametrize(
    "path,why",
    [
        ("/leak.txt", "leak.txt is a symlink"),  # to a file outside the bundle
        ("/linked/secret.txt", "linked is a symlink"),  # a folder symlink on the way
        ("/lib/alias.wasm", "lib/alias.wasm is a symlink"),  # even one to a file inside
    ],
)
def test_symlinks_are_refused_and_the_log_says_why(served, path, why, capfd, monkeypatch):
    monkeypatch.delenv("LLM2WASM_PREVIEW_QUIET", raising=False)
    status, body, _ = raw(served, path)
    assert status == 404 and SECRET not in body and b"\0asm" not in body
    assert b"not followed" in body
    err = capfd.readouterr().err
    assert any(why in line and "refused" in line for line in err.splitlines()), err


def test_folders_are_not_listed_and_a_fifo_is_not_opened(served):
    for path in ("/", "/lib/", "/lib", "/model/resolve/main/"):
        status, body, _ = raw(served, path)
        assert b"tiny.wasm" not in body and b"params_shard_0.bin" not in body, path
        assert status == (200 if path == "/" else 404), path  # "/" is the chat page, not a listing
    started = time.monotonic()
    status, _, _ = raw(served, "/pipe")  # opening a FIFO for reading would wait for a writer
    assert status == 404 and time.monotonic() - started < 5


def test_bundle_files_cannot_become_pages_of_this_origin(served):
    status, _, headers = raw(served, "/page.html")
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    assert headers["X-Content-Type-Options"] == "nosniff" and "sandbox" in headers["Content-Security-Policy"]


def test_only_get_and_head(served):
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        status, _, headers = raw(served, "/app-config.json", method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
    status, body, headers = raw(served, "/lib/tiny.wasm", method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == "8"


def test_another_host_gets_nothing_and_never_shapes_the_config(served):
    """DNS rebinding: a page of evil.example whose name now points here asks with its own Host."""
    port = served.split(":")[2].rstrip("/")
    for host in ("evil.example:8000", f"evil.example:{port}", "evil.example", f"127.0.0.1:{int(port) + 1}", "a b"):
        for path in ("/app-config.json", "/preview-info.json", "/", "/lib/tiny.wasm"):
            status, body, _ = raw(served, path, host=host)
            assert status == 421 and b"evil" not in body and b"asm" not in body, (host, path)
    status, body, _ = raw(served, "/app-config.json", hosts=(f"127.0.0.1:{port}", "evil.example:8000"))
    assert status == 421 and b"evil" not in body
    assert raw(served, "/app-config.json", hosts=("",))[0] == 421
    config = json.loads(raw(served, "/app-config.json")[1])
    assert config["model_list"][0]["model_lib"] == f"http://127.0.0.1:{port}/lib/tiny.wasm"


def test_localhost_is_sent_to_the_public_url(served):
    port = served.split(":")[2].rstrip("/")
    for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        status, _, headers = raw(served, "/./lib/tiny.wasm?x=1", host=host)
        assert status == 307 and headers["Location"] == f"{served}lib/tiny.wasm", host


def test_the_config_names_the_public_url_only(tmp_path):
    """What `invoke preview` runs: the server listens on one port, the browser opens another
    (Docker publishes it), and the Host header it sends is the public URL's."""
    server = start(tmp_path, public_url="http://Preview.Example:9123")
    try:
        served = f"http://127.0.0.1:{server.server_address[1]}/"
        status, body, _ = raw(served, "/app-config.json", host="preview.example:9123")
        assert status == 200
        assert json.loads(body)["model_list"][0]["model_lib"] == "http://preview.example:9123/lib/tiny.wasm"
        info = json.loads(raw(served, "/preview-info.json", host="preview.example:9123")[1])
        assert info["served_base"] == "http://preview.example:9123/" and info["rewritten"] is True
        assert raw(served, "/app-config.json")[0] == 421  # its listening address is not its public one
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:8000/", "http://127.0.0.1:8000/sub/", "http://u@h:1/", "127.0.0.1"])
def test_a_bad_public_url_is_a_usage_error(tmp_path, url):
    with pytest.raises(UsageError, match="--public-url"):
        make_server(make_bundle(tmp_path / "bundle"), "127.0.0.1", 0, public_url=url)


def test_the_preview_container_is_confined(tmp_path, monkeypatch):
    monkeypatch.setattr(run.docker, "image_id", lambda ref: "sha256:0")
    monkeypatch.setattr(run.docker, "docker_bin", lambda: "docker")
    bundle = make_bundle(tmp_path / "bun:dle")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = run.preview_command(run.PreviewJob(image="app", bundle=bundle, port=port))
    text = " ".join(command)
    for flags in ("--init", "--cap-drop ALL", "--security-opt no-new-privileges", "--pids-limit 256",
                  "--read-only", "--tmpfs /tmp", f"-p 127.0.0.1:{port}:8000"):  # fmt: skip
        assert flags in text, flags
    assert command[command.index("--public-url") + 1] == f"http://127.0.0.1:{port}/"
    assert f"source={bundle},target=/bundle,readonly" in text  # a `:` in the path is no volume spec
    everywhere = run.preview_command(run.PreviewJob(image="app", bundle=bundle, port=port, host="0.0.0.0"))
    assert everywhere[everywhere.index("--public-url") + 1] == f"http://127.0.0.1:{port}/"
    lan = run.PreviewJob(image="app", bundle=bundle, port=port, host="0.0.0.0", public_url="http://box.lan:8000")
    command = run.preview_command(lan)
    assert command[command.index("--public-url") + 1] == "http://box.lan:8000/"
