"""`invoke publish-bundle OUT --repo user/name`, end to end against the stand-in Hub through the real
`huggingface_hub` client: a dry run sends nothing, a publish sends the bundle once, a second one sends
nothing new, the printed model_list entry's absolute URLs resolve on the Hub, the card names the
tools the bundle recorded; what the user can fix exits 2 with the fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download
from invoke import Context, Exit

from llm2wasm.host import hubpublishcommand
from llm2wasm.host.pins import resolve_profile
from tests.standins.hub import point_client_at
from tests.standins.hub.server import StandinHub
from tests.unit.test_hubpublish import LIBRARY, MODEL_ID, make_bundle

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
REPO = "tester/Tiny-Llama-q4f16_1-MLC"
TOOLS = {
    "gen_config": {"llm2wasm": "0.1.0 (aaaaaaaaaaaa)", "mlc_llm": "mlc-llm 0.19.0", "transformers": "x"},
    "compile": {
        "llm2wasm": "0.1.0 (0123456789ab)",
        "mlc_llm": "mlc-llm 0.20.0",
        "tvm": "apache-tvm 0.26.0",
        "tvm_ffi": "apache-tvm-ffi 0.1.0",
        "emcc": "3.1.56 (abcdef)",
        "web_runtime": "MLC_LLM_COMMIT=79d603f0 TVM_COMMIT=1234abcd",
    },
    "convert_weight": {"llm2wasm": "0.1.0 (0123456789ab)", "torch": "absent"},
}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with StandinHub(tmp_path / "store", tokens={"hf_writer": "tester", "hf_other": "someone"}) as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf-home")
        yield hub


@pytest.fixture
def bundle(tmp_path) -> Path:
    out = make_bundle(tmp_path / "out")
    state = {"llm2wasm": "0.1.0", "steps": {step: {"key": "k", "tools": tools} for step, tools in TOOLS.items()}}
    (out / ".llm2wasm" / "state.json").write_text(json.dumps(state))
    return out


def webllm_pin() -> str:
    return resolve_profile("stable")["webllm_version"]


def test_the_card_versions_are_what_the_bundle_recorded(bundle, tmp_path):
    assert hubpublishcommand.bundle_versions(bundle, "0.2.84") == {
        "llm2wasm": "0.1.0 (0123456789ab)",  # the compile step's, the last one read
        "mlc_llm": "mlc-llm 0.20.0",
        "tvm": "apache-tvm 0.26.0",
        "web_runtime": "MLC_LLM_COMMIT=79d603f0 TVM_COMMIT=1234abcd",
        "emscripten": "3.1.56 (abcdef)",
        "webllm": "0.2.84",
    }
    (bundle / ".llm2wasm" / "state.json").write_text('{"llm2wasm": "0.0.9"}')
    assert hubpublishcommand.bundle_versions(bundle) == {"llm2wasm": "0.0.9"}
    assert hubpublishcommand.bundle_versions(tmp_path / "nowhere") == {}


def test_a_dry_run_sends_nothing_and_needs_no_token(hub, bundle, capsys):
    tasks.publish_bundle(Context(), str(bundle), repo=REPO, dry_run=True)
    out = capsys.readouterr().out
    assert f"would publish to {REPO}" in out and LIBRARY in out
    assert f"dry run: nothing sent. Published, the entry would be at {hub.url}/{REPO}/resolve/main/" in out
    assert f'"model_lib": "{hub.url}/{REPO}/resolve/main/{LIBRARY}"' in out
    assert {method for method, _ in hub.requests} == {"GET"}  # the repository's file list only
    assert not HfApi(endpoint=hub.url).repo_exists(REPO)


def run_invoke(*arguments: str, token: str | None = "hf_writer") -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name != "HF_TOKEN"}
    if token:
        environment["HF_TOKEN"] = token
    return subprocess.run([*INVOKE, *arguments], capture_output=True, text=True, timeout=120, env=environment)


def test_publish_then_publish_again_sends_nothing_new(hub, bundle):
    first = run_invoke("publish-bundle", str(bundle), "--repo", REPO, "--endpoint", hub.url)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"to {hub.url}/{REPO} (commit " in first.stdout
    assert "hf_writer" not in first.stdout + first.stderr
    printed = json.loads(first.stdout[first.stdout.index("{") :])
    published = json.loads(Path(hf_hub_download(REPO, "webllm-model-record.json")).read_text())
    assert printed == published
    assert published["model"] == f"{hub.url}/{REPO}/resolve/main/"
    assert published["model_lib"] == f"{hub.url}/{REPO}/resolve/main/{LIBRARY}"
    assert published["required_features"] == ["shader-f16"] and published["model_id"] == MODEL_ID
    # the absolute URLs resolve on the Hub, for a page of another origin (CORS)
    weights = bundle / "model" / "resolve" / "main"
    for url, expected in [
        (published["model_lib"], (bundle / "lib" / f"{MODEL_ID}.wasm").read_bytes()),
        (published["model"] + "mlc-chat-config.json", (weights / "mlc-chat-config.json").read_bytes()),
        (published["model"] + "params_shard_0.bin", (weights / "params_shard_0.bin").read_bytes()),
    ]:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Origin": "http://app.example"})) as answer:
            assert answer.headers["Access-Control-Allow-Origin"] == "*" and answer.read() == expected
    card = Path(hf_hub_download(REPO, "README.md")).read_text()
    for version in ("mlc-llm 0.20.0", "apache-tvm 0.26.0", "3.1.56 (abcdef)", TOOLS["compile"]["web_runtime"]):
        assert f"`{version}`" in card
    assert f"| WebLLM (tested with) | `{webllm_pin()}` |" in card
    assert "base_model: org/Tiny-Llama" in card and "base_model_relation: quantized" in card
    commit = HfApi(endpoint=hub.url).model_info(REPO).sha
    hub.requests.clear()
    again = run_invoke("publish-bundle", str(bundle), "--repo", REPO)  # the endpoint from HF_ENDPOINT
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"already holds this bundle (commit {commit}): nothing sent" in again.stdout
    assert hub.served("PUT") == [] and hub.served("POST", "/commit/") == []
    assert HfApi(endpoint=hub.url).model_info(REPO).sha == commit


def test_a_merged_adapter_is_a_finetune_of_the_base_model(hub, bundle):
    source = json.loads((bundle / "source.json").read_text())
    (bundle / "source.json").write_text(json.dumps({**source, "adapter_merged": True}))
    result = hubpublishcommand.publish_command(bundle, REPO, dry_run=True)
    card = next(upload.content for upload in result.uploads if upload.path_in_repo == "README.md").decode()
    assert "base_model: org/Tiny-Llama" in card
    assert "base_model_relation: finetune" in card and "with a PEFT adapter merged in" in card


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("incomplete", r"is not a complete bundle: app-config.json is missing.*Convert it again"),
        ("no token", r"publishing needs a Hugging Face token with write access: .*hf auth login.*HF_TOKEN"),
        ("bad repo", r"'Tiny' is not a repository id to publish to"),
        ("no repo", r"publish-bundle needs --repo"),
        ("not allowed", rf"the token in use cannot write to {REPO}: use one of tester"),
        ("not a folder", r"is not a folder: give the output folder of a conversion"),
    ],
)
def test_what_the_user_can_fix_exits_2_with_the_fix(hub, bundle, monkeypatch, tmp_path, case, message):
    arguments = {"repo": REPO}
    if case == "incomplete":
        (bundle / "app-config.json").unlink()  # a conversion that did not finish
    if case == "bad repo":
        arguments["repo"] = "Tiny"
    if case == "no repo":
        arguments = {}
    if case == "not allowed":
        monkeypatch.setenv("HF_TOKEN", "hf_other")
    elif case != "no token":
        monkeypatch.setenv("HF_TOKEN", "hf_writer")
    folder = tmp_path / "nothing" if case == "not a folder" else bundle
    with pytest.raises(Exit) as stopped:
        tasks.publish_bundle(Context(), str(folder), **arguments)
    assert stopped.value.code == 2
    assert re.search(message, str(stopped.value.message)), stopped.value.message
    assert hub.served("PUT") == [] and hub.served("POST", "/commit/") == []


def test_the_command_line_without_a_token_exits_2(hub, bundle):
    result = run_invoke("publish-bundle", str(bundle), "--repo", REPO, token=None)
    assert result.returncode == 2
    assert "publishing needs a Hugging Face token" in result.stderr and "--dry-run" in result.stderr
