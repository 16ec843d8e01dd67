"""From a model on the Hub to a published model that the real WebLLM loads from the Hub (issue 27),
with the real hermetic chain, the real `huggingface_hub` client and the real WebLLM in Chromium.

A tiny browser-check Llama and a fine-tune of it (a LoRA merged in: the same shape, other greedy
tokens) are made in the app image, with transformers' greedy tokens of each. The stand-in Hub
(tests/standins/hub, in this process, on 127.0.0.1) holds them as two commits of `org/tiny`: the
base tagged `v1`, the fine-tune on `main`. `invoke convert org/tiny` (main) and `invoke convert
org/tiny@v1` fetch on the host through HF_ENDPOINT (the conversions share a library cache: the second
reuses the first's library); `invoke publish-bundle --endpoint` publishes each bundle to its own
repository of the stand-in. Each published `webllm-model-record.json`, downloaded from the stand-in as
a user would, is all the page gets (`llm2wasm preview --record`, no bundle served): WebLLM fetches the
library and weights from the stand-in's resolve/ URLs, with CORS, and generates the tokens of the
revision each conversion asked for, in one Chromium. Only the two models and one compile are paid.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest

from tests.browser import chromium_path, run_in_one_browser
from tests.conftest import INVOKE, ROOT, run_app
from tests.standins.hub import child_environment, client_environment, files_of
from tests.standins.hub.server import StandinHub

STEPS = 8
WRITE_TOKEN = "hf_round_trip_writer"
SOURCE = "org/tiny"
MAKE = f"""
import json
from pathlib import Path
from llm2wasm.image.convert.checkmodels import make_browser_check_adapter, make_browser_check_model
from llm2wasm.image.convert.merge import merge_adapter
base = make_browser_check_model(Path("/work/v1"), steps={STEPS})
tuned = make_browser_check_adapter(Path("/work/v1"), Path("/work/adapter"), steps={STEPS})
merge_adapter(Path("/work/v1"), Path("/work/adapter"), Path("/work/v2"), Path("/work/merge.log"))
Path("/work/references.json").write_text(json.dumps({{"v1": base, "v2": tuned}}))
"""
# (what the conversion names, the output folder = model id, the repository it is published to)
ROWS = {
    "main": (SOURCE, "tiny-q0f32-MLC", "user/tiny-q0f32-MLC"),
    "v1": (f"{SOURCE}@v1", "tiny-v1-q0f32-MLC", "user/tiny-v1-q0f32-MLC"),
}
CARD = "---\nlicense: apache-2.0\n---\n\n# tiny\n\nA tiny Llama for llm2wasm's tests.\n"


def task(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """An invoke task as a user runs it, its Hub client pointed at the stand-in (no login of this machine's)."""
    environment = child_environment(env)
    return subprocess.run([*INVOKE, *args], capture_output=True, text=True, cwd=ROOT, timeout=3600, env=environment)


@pytest.fixture(scope="module")
def round_trip(hermetic_chain, tmp_path_factory):
    """Both revisions converted from the stand-in and published to it; the stand-in serves on."""
    work = tmp_path_factory.mktemp("hub-round-trip")
    made = run_app("-c", MAKE, mounts={work: "/work"}, entrypoint="python")
    assert made.returncode == 0, made.stderr
    references = json.loads((work / "references.json").read_text())
    with StandinHub(work / "hub", tokens={WRITE_TOKEN: "user"}) as hub:
        commits = {"v1": hub.seed_repo(SOURCE, {**files_of(work / "v1"), "README.md": CARD}, tag="v1")}
        commits["main"] = hub.seed_repo(SOURCE, files_of(work / "v2"), message="the fine-tune")
        environment = client_environment(hub.url, work / "hf-home")
        results = {}
        for row, (model, folder, repo) in ROWS.items():
            out = work / "out" / folder
            converted = task(
                "convert", model, "-q", "q0f32", "-o", str(out), "--conv-template", "chatml",
                "--context-window", "256", "--prefill-chunk-size", "64", "--profile", "hermetic",
                "--lib-cache", str(work / "libraries"), env=environment,
            )  # fmt: skip
            assert converted.returncode == 0, converted.stderr[-4000:]
            published = task(
                "publish-bundle", str(out), "--repo", repo, "--endpoint", hub.url, "--profile", "hermetic",
                env={**environment, "HF_TOKEN": WRITE_TOKEN},
            )  # fmt: skip
            assert published.returncode == 0, published.stdout + published.stderr
            # the entry as a user gets it: downloaded from the published repository
            url = f"{hub.url}/{repo}/resolve/main/webllm-model-record.json"
            with urllib.request.urlopen(url, timeout=30) as response:
                record_file = work / "records" / f"{row}.json"
                record_file.parent.mkdir(exist_ok=True)
                record_file.write_bytes(response.read())
            results[row] = {"out": out, "converted": converted, "published": published, "record": record_file}
        yield hub, commits, references, results


def printed_record(stdout: str) -> dict:
    """The model_list entry publish-bundle printed after its 'model_list entry (...)' line."""
    return json.loads(stdout.split("add it to your WebLLM app config (docs/HUB.md):\n", 1)[1])


def test_each_revision_is_fetched_converted_and_cites_its_commit(round_trip):
    hub, commits, _, results = round_trip
    assert commits["main"] != commits["v1"]
    for row, (_, _, repo) in ROWS.items():
        result = results[row]
        assert f"org/tiny@{commits[row]}" in result["converted"].stderr  # messages name the resolved commit
        source = json.loads((result["out"] / "source.json").read_text())
        assert source["repo_id"] == SOURCE and source["commit"] == commits[row]
        assert source["revision"] == {"main": None, "v1": "v1"}[row]  # as asked; the commit pins it
        with urllib.request.urlopen(f"{hub.url}/{repo}/resolve/main/README.md", timeout=30) as response:
            card = response.read().decode()
        assert "base_model: org/tiny\nbase_model_relation: quantized" in card
        assert f"(commit `{commits[row]}`)" in card and "license: apache-2.0" in card
        assert printed_record(result["published"].stdout) == json.loads(result["record"].read_text())


def test_webllm_given_only_the_published_entries_generates_each_revisions_tokens(round_trip):
    if chromium_path() is None:
        pytest.fail("Debian's chromium is not installed: run `bash .ci/setup.sh` as root")
    hub, _, references, results = round_trip
    records = {row: json.loads(results[row]["record"].read_text()) for row in ROWS}
    for row, (_, folder, repo) in ROWS.items():
        base = f"{hub.url}/{repo}/resolve/main/"  # WebLLM's own library naming: <model>-<quant>_cs<chunk>
        assert records[row]["model"] == base
        assert records[row]["model_lib"] == f"{base}{folder.removesuffix('-MLC')}_cs64-webgpu.wasm"
    before = len(hub.requests)
    run = run_in_one_browser(references["v1"]["prompt"], STEPS, records=[results[row]["record"] for row in ROWS])
    assert not run.preview_errors and not run.page_errors, (run.preview_errors, run.page_errors)
    assert not run.webgpu_errors, "\n".join(run.webgpu_errors[:5])
    assert not run.foreign_requests, run.foreign_requests
    assert references["v1"]["reference_ids"] != references["v2"]["reference_ids"]
    # main is the fine-tune (v2), @v1 the base
    wanted = [references["v2"]["reference_ids"], references["v1"]["reference_ids"]]
    assert [result["tokenIds"] for result in run.results] == wanted
    # the browser read each model from the stand-in Hub's resolve/ URLs (the preview serves no model file)
    fetched = [path for method, path in hub.requests[before:] if method == "GET"]
    for row, (_, _, repo) in ROWS.items():
        for name in (records[row]["model_lib"].rsplit("/", 1)[1], "tensor-cache.json", "params_shard_0.bin"):
            assert f"/{repo}/resolve/main/{name}" in fetched, (name, fetched)


def test_the_second_conversion_reused_the_first_ones_library(round_trip):
    """The base and its fine-tune have one shape: the round trip pays for one compile."""
    _, _, _, results = round_trip
    assert "library: reused from the library cache" in results["v1"]["converted"].stderr
