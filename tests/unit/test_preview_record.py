"""`preview --record FILE`: a published model_list entry as hostile input (checked field by field,
exit 2 with the fix), the app config made from it, the server that serves the page and no file,
and the container that gets the entry alone, read-only."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.host import run
from llm2wasm.image.preview.record import MAX_RECORD_BYTES, check_record, read_record, record_config, weights_url
from llm2wasm.image.preview.server import serve_in_thread

BASE = "https://huggingface.co/you/tiny-q0f32-MLC/resolve/main/"
RECORD = {
    "model": BASE,
    "model_id": "tiny-q0f32-MLC",
    "model_lib": BASE + "tiny-q0f32_cs64-webgpu.wasm",
    "vram_required_MB": 12.5,
    "low_resource_required": True,
    "required_features": ["shader-f16"],
    "overrides": {"context_window_size": 256, "prefill_chunk_size": 64},
}


def checked(value) -> dict:
    return check_record(json.dumps(value).encode())


def test_a_published_entry_is_kept_as_it_is():
    assert checked(RECORD) == RECORD
    assert record_config(checked(RECORD)) == {"model_list": [RECORD]}
    plain = {key: RECORD[key] for key in ("model", "model_id", "model_lib")}
    assert checked({**plain, "model_type": 0, "buffer_size_required_bytes": 1 << 28}) == {
        **plain,
        "model_type": 0,
        "buffer_size_required_bytes": 1 << 28,
    }


def test_the_weights_url_is_webllms():
    assert weights_url(BASE) == BASE  # a published entry names its revision
    assert weights_url("http://127.0.0.1:8000/model/") == "http://127.0.0.1:8000/model/resolve/main/"
    assert weights_url("https://hf.co/you/m") == "https://hf.co/you/m/resolve/main/"
    assert weights_url("https://hf.co/you/m/resolve/0123abc/") == "https://hf.co/you/m/resolve/0123abc/"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "file:///etc/"}, "model 'file:///etc/' is not an http:// or https:// URL with a host"),
        ({"model_lib": "javascript:alert(1)"}, "is not an http:// or https:// URL with a host"),
        ({"model": "https://user:pw@hf.co/you/m/"}, "holds credentials"),
        ({"model_lib": BASE + "a.wasm#x"}, "has a fragment"),
        ({"model": BASE + "?download=1"}, "has a query"),
        ({"model_lib": BASE}, "names a folder, not the model library's .wasm file"),
        ({"model": "https://hf.co/a b/"}, "holds spaces or control characters"),
        ({"model": "https://" + "a" * 3000 + "/"}, "is over 2048 characters"),
        ({"model": "http://127.0.0.1:99999/"}, "is not an http:// or https:// URL with a host"),
        ({"model": 5}, "is not a URL"),
        ({"model_id": "../../etc"}, "is not a model id"),
        ({"model_id": "<script>"}, "is not a model id"),
        ({"vram_required_MB": -1}, "vram_required_MB is '-1', not a number of 0 or more"),
        ({"vram_required_MB": "big"}, "not a number of 0 or more"),
        ({"low_resource_required": "yes"}, "not true or false"),
        ({"buffer_size_required_bytes": 1.5}, "not a whole number"),
        ({"required_features": "shader-f16"}, "not a list of WebGPU feature names"),
        ({"required_features": ["<img>"]}, "not a list of WebGPU feature names"),
        ({"model_type": 7}, "not one of WebLLM's model types"),
        ({"overrides": [1]}, "not an object of chat config settings"),
        ({"overrides": {"Bad Key": 1}}, "not an object of chat config settings"),
        ({"script": "alert(1)"}, "has field(s) WebLLM's ModelRecord does not hold: 'script'"),
    ],
)
def test_a_bad_entry_exits_2_naming_the_field_and_the_fix(change, message):
    with pytest.raises(UsageError) as error:
        checked({**RECORD, **change})
    assert message in str(error.value)
    assert error.value.exit_code == 2
    assert "remove the others" in str(error.value) or "publish-bundle" in str(error.value)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"not json", "is not JSON"),
        (b"\xff\xfe", "is not JSON"),
        (b"[" * 100_00 + b"]" * 100_00, "is not JSON"),  # nested beyond the parser's recursion
        (b"[1]", "is not a JSON object"),
        (json.dumps({"model_list": [RECORD]}).encode(), "is an app config, not one entry"),
        (json.dumps({"model_id": "m"}).encode(), "has no model, model_lib"),
        (b" " * (MAX_RECORD_BYTES + 1), "is over 64 KiB"),
    ],
)
def test_what_is_not_an_entry_exits_2(data, message):
    with pytest.raises(UsageError, match=message):
        check_record(data)


def test_the_file_is_read_as_a_regular_file_without_following_a_link(tmp_path):
    good = tmp_path / "webllm-model-record.json"
    good.write_text(json.dumps(RECORD))
    assert read_record(good) == RECORD
    (tmp_path / "link.json").symlink_to(good)
    with pytest.raises(UsageError, match="is a symbolic link"):
        read_record(tmp_path / "link.json")
    with pytest.raises(UsageError, match="is not a regular file"):
        read_record(tmp_path)
    os.mkfifo(tmp_path / "pipe")  # opened without blocking, then refused
    with pytest.raises(UsageError, match="is not a regular file"):
        read_record(tmp_path / "pipe")
    with pytest.raises(UsageError, match="No such file"):
        read_record(tmp_path / "missing.json")


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_server_hands_the_page_the_entry_and_serves_no_file(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({**RECORD, "model_id": "tiny"}))
    (tmp_path / "secret.txt").write_text("SECRET")
    server, thread = serve_in_thread(None, record=tmp_path / "r.json", webllm=tmp_path / "webllm")
    url = server.RequestHandlerClass.public_url
    try:
        status, body = fetch(url + "app-config.json")
        assert status == 200 and json.loads(body) == {"model_list": [{**RECORD, "model_id": "tiny"}]}
        status, body = fetch(url + "preview-info.json")
        info = json.loads(body)
        assert info["published"] is True and info["weights_url"] == BASE and info["rewritten"] is False
        assert info["model_lib"] == RECORD["model_lib"] and info["required_features"] == ["shader-f16"]
        assert fetch(url)[0] == 200
        for path in ("r.json", "secret.txt", "lib/tiny.wasm", "model/resolve/main/tensor-cache.json"):
            status, body = fetch(url + path)
            assert status == 404 and b"published entry" in body, path
        request = urllib.request.Request(url + "app-config.json", method="POST", data=b"x")
        assert fetch_request(request) == 405
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def fetch_request(request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_server_takes_a_bundle_or_an_entry(tmp_path):
    with pytest.raises(UsageError, match="give one of them"):
        serve_in_thread(None)
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(UsageError, match="has no model, model_id, model_lib"):
        serve_in_thread(None, record=tmp_path / "r.json")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_preview_container_gets_the_entry_alone_read_only(tmp_path, monkeypatch):
    monkeypatch.setattr(run.docker, "image_id", lambda ref: "sha256:0")
    monkeypatch.setattr(run.docker, "docker_bin", lambda: "docker")
    record = tmp_path / "a:b" / "webllm-model-record.json"
    record.parent.mkdir()
    record.write_text(json.dumps(RECORD))
    port = free_port()
    command = run.preview_command(run.PreviewJob(image="app", bundle=None, record=record, port=port))
    text = " ".join(command)
    for flags in ("--cap-drop ALL", "--read-only", f"-p 127.0.0.1:{port}:8000", "--pids-limit 256"):
        assert flags in text, flags
    assert f"source={record},target={run.CONTAINER_RECORD},readonly" in text
    assert command[command.index("preview") + 1 :][:2] == ["--record", run.CONTAINER_RECORD]
    assert "/bundle" not in text
    record.write_text(json.dumps({**RECORD, "model": "ftp://x/"}))  # refused here, before Docker
    with pytest.raises(UsageError, match="not an http:// or https:// URL"):
        run.preview_command(run.PreviewJob(image="app", bundle=None, record=record, port=port))


def test_invoke_preview_takes_a_record_file_in_place_of_the_bundle(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from invoke import Context

    import tasks

    jobs = []
    monkeypatch.setattr(run, "run_preview_job", lambda job: jobs.append(job) or 0)
    record = tmp_path / "webllm-model-record.json"
    record.write_text(json.dumps(RECORD))
    for given in (record, tmp_path):
        with pytest.raises(SystemExit):
            tasks.preview(Context(), str(given), port=8123)
    assert (jobs[0].record, jobs[0].bundle) == (record, None)
    assert (jobs[1].record, jobs[1].bundle) == (None, tmp_path)
