"""llm2wasm.host.hubpublish: a bundle folder -> a Hub model repository laid out like WebLLM's prebuilt
models, with a model card and a ready model_list entry; through the real client, to the stand-in Hub."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi, hf_hub_download

from llm2wasm.errors import UsageError
from llm2wasm.host import hubpublish
from tests.standins.hub import point_client_at
from tests.standins.hub.server import StandinHub

MODEL_ID = "Tiny-Llama-q4f16_1-MLC"
REPO = "tester/Tiny-Llama-q4f16_1-MLC"
LIBRARY = "Tiny-Llama-q4f16_1_cs1k-webgpu.wasm"  # WebLLM's naming: <model>-<quant>_cs<chunk>-webgpu.wasm
VERSIONS = {"llm2wasm": "0.1.0", "mlc_llm": "79d603f0", "tvm": "0.26.0", "emscripten": "3.1.6", "webllm": "0.2.84"}
SOURCE = {
    "repo_id": "org/Tiny-Llama",
    "revision": None,
    "commit": "c" * 40,
    "endpoint": "https://huggingface.co",
    "files": [{"path": "model.safetensors", "size": 10}],
    "license": "apache-2.0",
}
WEIGHT_FILES = {
    "mlc-chat-config.json",
    "tensor-cache.json",
    "params_shard_0.bin",
    "params_shard_1.bin",
    "tokenizer.json",
}


def make_bundle(out: Path, quantization: str = "q4f16_1", model_id: str = MODEL_ID, source: dict | None = SOURCE):
    """A bundle as llm2wasm.image.convert.bundle writes it, in miniature."""
    weights = out / "model" / "resolve" / "main"
    weights.mkdir(parents=True)
    chat = {"quantization": quantization, "prefill_chunk_size": 1024, "context_window_size": 2048}
    (weights / "mlc-chat-config.json").write_text(json.dumps(chat))
    shards = {"params_shard_0.bin": bytes(range(256)) * 4, "params_shard_1.bin": b"\7" * 300}
    for name, content in shards.items():
        (weights / name).write_bytes(content)
    records = [{"dataPath": name, "nbytes": len(content), "records": []} for name, content in shards.items()]
    (weights / "tensor-cache.json").write_text(json.dumps({"metadata": {}, "records": records}))
    (weights / "tokenizer.json").write_text('{"model": {}}')
    (out / "lib").mkdir()
    (out / "lib" / f"{model_id}.wasm").write_bytes(b"\0asm\1\0\0\0" + b"\0" * 64)
    record = {
        "model": "http://127.0.0.1:8000/model/",
        "model_id": model_id,
        "model_lib": f"http://127.0.0.1:8000/lib/{model_id}.wasm",
        "overrides": {"context_window_size": 2048},
        "vram_required_MB": 123.45,
        "low_resource_required": True,
    }
    (out / "app-config.json").write_text(json.dumps({"model_list": [record]}))
    (out / "README.md").write_text("# how to serve this folder locally\n")
    (out / ".llm2wasm" / "logs").mkdir(parents=True)
    (out / ".llm2wasm" / "state.json").write_text("{}")
    (out / ".llm2wasm" / "source").symlink_to("/nonexistent")  # the converter's state may hold links
    if source is not None:
        (out / "source.json").write_text(json.dumps(source))
    return out


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "out")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with StandinHub(tmp_path / "store", tokens={"hf_writer": "tester", "hf_other": "someone"}) as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf-home")
        yield hub


def publish(hub, bundle, **options):
    return hubpublish.publish_bundle(bundle, REPO, versions=VERSIONS, token="hf_writer", endpoint=hub.url, **options)


@pytest.mark.parametrize(
    ("model_id", "quantization", "chunk", "expected"),
    [
        ("Llama-3.2-1B-Instruct-q4f32_1-MLC", "q4f32_1", 1024, "Llama-3.2-1B-Instruct-q4f32_1_cs1k-webgpu.wasm"),
        ("SmolLM2-135M-Instruct-q0f16-MLC", "q0f16", 2048, "SmolLM2-135M-Instruct-q0f16_cs2k-webgpu.wasm"),
        ("my-model", "q4f16_1", 512, "my-model-q4f16_1_cs512-webgpu.wasm"),
        ("my-model", "q0f32", None, "my-model-q0f32-webgpu.wasm"),
    ],
)
def test_the_library_is_named_as_webllm_names_its_own(model_id, quantization, chunk, expected):
    assert hubpublish.wasm_file_name(model_id, quantization, chunk) == expected


def test_the_record_has_absolute_urls_and_what_webllm_reads(bundle, tmp_path):
    read = hubpublish.read_bundle(bundle)
    record = hubpublish.published_record(read, REPO, "https://user:pw@huggingface.co/", "main", LIBRARY)
    assert record == {
        "model": f"https://huggingface.co/{REPO}/resolve/main/",
        "model_id": MODEL_ID,
        "model_lib": f"https://huggingface.co/{REPO}/resolve/main/{LIBRARY}",
        "vram_required_MB": 123.45,
        "low_resource_required": True,
        "overrides": {"context_window_size": 2048},
        "required_features": ["shader-f16"],
    }
    f32 = hubpublish.read_bundle(make_bundle(tmp_path / "f32", "q4f32_1", "Tiny-q4f32_1-MLC"))
    assert "required_features" not in hubpublish.published_record(f32, REPO, "https://hf.co", "main", "x.wasm")


def damage(bundle: Path, how: str) -> None:
    weights = bundle / "model" / "resolve" / "main"
    if how == "no app config":
        (bundle / "app-config.json").unlink()
    elif how == "two models":
        config = json.loads((bundle / "app-config.json").read_text())
        (bundle / "app-config.json").write_text(json.dumps({"model_list": config["model_list"] * 2}))
    elif how == "no wasm":
        (bundle / "lib" / f"{MODEL_ID}.wasm").unlink()
    elif how == "not wasm":
        (bundle / "lib" / f"{MODEL_ID}.wasm").write_bytes(b"<html>")
    elif how == "no tensor cache":
        (weights / "tensor-cache.json").unlink()
    elif how == "missing shard":
        (weights / "params_shard_1.bin").unlink()
    elif how == "short shard":
        (weights / "params_shard_1.bin").write_bytes(b"\7")
    elif how == "linked shard":
        (weights / "params_shard_1.bin").unlink()
        (weights / "params_shard_1.bin").symlink_to("/etc/passwd")
    elif how == "linked readme":
        (bundle / "README.md").unlink()
        (bundle / "README.md").symlink_to("/etc/hostname")


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("no app config", "app-config.json is missing"),
        ("two models", "exactly one model"),
        ("no wasm", "is missing \\(the model library\\)"),
        ("not wasm", "not a wasm module"),
        ("no tensor cache", "no tensor-cache.json or ndarray-cache.json"),
        ("missing shard", "params_shard_1.bin is missing"),
        ("short shard", "holds 1 bytes, tensor-cache.json says 300"),
        ("linked shard", "symbolic link"),
        ("linked readme", "symbolic link"),
    ],
)
def test_an_incomplete_or_linked_bundle_is_refused(bundle, how, message):
    damage(bundle, how)
    with pytest.raises(UsageError, match=message):
        hubpublish.read_bundle(bundle)


def test_an_older_ndarray_cache_is_a_tensor_cache_too(bundle):
    weights = bundle / "model" / "resolve" / "main"
    (weights / "tensor-cache.json").rename(weights / "ndarray-cache.json")
    assert "ndarray-cache.json" in hubpublish.read_bundle(bundle).weights


@pytest.mark.parametrize("repo_id", ["Tiny", "a/b/c", "tester/bad--name", "tester/x.git", "tester/-x"])
def test_an_invalid_repo_id_is_refused(bundle, repo_id):
    with pytest.raises(UsageError, match="not a repository id"):
        hubpublish.publish_bundle(bundle, repo_id, dry_run=True)


def test_a_dry_run_says_what_would_be_sent_and_sends_nothing(hub, bundle, capsys):
    result = publish(hub, bundle, dry_run=True)
    assert result.commit is None
    names = [upload.path_in_repo for upload in result.uploads]
    assert set(names) == WEIGHT_FILES | {LIBRARY, "README.md", "webllm-model-record.json", "source.json"}
    assert {upload.status for upload in result.uploads} == {"new"}
    shown = capsys.readouterr().out
    assert f"would publish to {REPO}" in shown and LIBRARY in shown and "9 file(s)" in shown
    assert [method for method, _ in hub.requests] == ["GET"]  # the repository's file list, nothing else
    card = next(upload.content for upload in result.uploads if upload.path_in_repo == "README.md")
    assert b"how to serve this folder locally" not in card  # the card replaces the bundle's README


def test_publishes_a_repository_webllm_loads_from(hub, bundle, tmp_path):
    result = publish(hub, bundle)
    api = HfApi(endpoint=hub.url)
    assert api.model_info(REPO).sha == result.commit
    assert set(api.list_repo_files(REPO)) == WEIGHT_FILES | {
        ".gitattributes",
        LIBRARY,
        "README.md",
        "webllm-model-record.json",
        "source.json",
    }
    record = json.loads(Path(hf_hub_download(REPO, "webllm-model-record.json")).read_text())
    assert record == result.record and record["model"] == f"{hub.url}/{REPO}/resolve/main/"
    # what WebLLM fetches, from the record's own URLs, as a page on another origin would
    for url in (record["model"] + "mlc-chat-config.json", record["model"] + "params_shard_1.bin", record["model_lib"]):
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Origin": "http://app.example"})) as answer:
            assert answer.headers["Access-Control-Allow-Origin"] == "*"
            assert answer.read() == (
                (bundle / "lib" / f"{MODEL_ID}.wasm").read_bytes()
                if url.endswith(".wasm")
                else (bundle / "model" / "resolve" / "main" / url.rsplit("/", 1)[-1]).read_bytes()
            )
    card = Path(hf_hub_download(REPO, "README.md")).read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == {
        "library_name": "mlc-llm",
        "base_model": "org/Tiny-Llama",
        "base_model_relation": "quantized",
        "license": "apache-2.0",
        "tags": ["mlc-llm", "web-llm", "q4f16_1"],
    }
    assert api.model_info(REPO).card_data.base_model == "org/Tiny-Llama"
    for version in VERSIONS.values():
        assert f"`{version}`" in card
    assert json.dumps(record, indent=2) in card and "shader-f16" in card
    assert json.loads(Path(hf_hub_download(REPO, "source.json")).read_text()) == SOURCE


def test_publishing_again_sends_only_what_changed(hub, bundle, capsys):
    first = publish(hub, bundle)
    hub.requests.clear()
    again = publish(hub, bundle)
    assert again.commit == first.commit  # nothing changed: no new commit
    assert {upload.status for upload in again.uploads} == {"unchanged"}
    assert hub.served("PUT") == [] and hub.served("POST", "/commit/") == []
    shard = bundle / "model" / "resolve" / "main" / "params_shard_0.bin"
    shard.write_bytes(bytes(reversed(shard.read_bytes())))  # same size, new content
    hub.requests.clear()
    third = publish(hub, bundle)
    changed = {upload.path_in_repo for upload in third.uploads if upload.status != "unchanged"}
    assert changed == {"params_shard_0.bin"}
    assert third.commit != first.commit and len(hub.served("PUT", "/lfs-upload/")) == 1
    assert "1 file(s)" in capsys.readouterr().out


def test_without_provenance_the_card_names_no_base_model(hub, tmp_path):
    bundle = make_bundle(tmp_path / "local", source=None)
    result = publish(hub, bundle, license="mit", dry_run=True)
    card = next(upload.content for upload in result.uploads if upload.path_in_repo == "README.md").decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in meta and "base_model_relation" not in meta and meta["license"] == "mit"
    assert "source.json" not in [upload.path_in_repo for upload in result.uploads]


def test_publishing_needs_a_token_that_can_write_there(hub, bundle, monkeypatch):
    with pytest.raises(UsageError, match=r"needs a valid login.*hf auth login.*HF_TOKEN"):
        hubpublish.publish_bundle(bundle, REPO, endpoint=hub.url)
    with pytest.raises(UsageError, match=f"the token in use cannot write to {REPO}"):
        hubpublish.publish_bundle(bundle, REPO, endpoint=hub.url, token="hf_other")
    monkeypatch.setenv("HF_TOKEN", "hf_writer")  # the client's own token resolution
    assert hubpublish.publish_bundle(bundle, REPO, endpoint=hub.url).commit is not None


def test_the_state_folder_is_never_read_or_sent(hub, bundle):
    # make_bundle leaves a symbolic link in .llm2wasm/: read anywhere else in a bundle, it is refused
    assert (bundle / ".llm2wasm" / "source").is_symlink()
    result = publish(hub, bundle, dry_run=True)
    assert not any(".llm2wasm" in upload.path_in_repo or "state" in upload.path_in_repo for upload in result.uploads)
