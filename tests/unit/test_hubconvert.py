"""`invoke convert org/name[@revision]`: the model fetched on the host from the (stand-in) Hub through
the real `huggingface_hub` client, mounted file by file, its provenance written into the bundle; a
local path that exists wins; what the user can fix exits 2 with the fix; several quantizations are
one fetch and a bundle each, named as WebLLM names its prebuilt models. Docker is never reached:
the task's conversion (llm2wasm.host.run.run_convert_job) is replaced by a recorder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Context, Exit

from llm2wasm.errors import UsageError
from llm2wasm.host import hubconvert, hubfetch
from llm2wasm.host import run as run_module
from llm2wasm.host.convertcommand import outputs_for, quantizations_of
from tests.standins.hub import point_client_at
from tests.standins.hub.server import StandinHub
from tests.unit.test_hubfetch import SHARDS, sharded_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
SECRET = "hf_member_secret_token"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with StandinHub(tmp_path / "store", tokens={SECRET: "member", "hf_reader": "reader"}) as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf-home")
        yield hub


@pytest.fixture
def conversions(monkeypatch):
    """The ConvertJobs the task hands to Docker, recorded instead; each 'succeeds'."""
    jobs = []

    def record(job):
        jobs.append(job)
        job.output.mkdir(parents=True, exist_ok=True)
        return 0

    monkeypatch.setattr(run_module, "run_convert_job", record)
    return jobs


def test_a_hub_id_is_fetched_and_mounted_file_by_file(hub, tmp_path, conversions, monkeypatch):
    commit = hub.seed_repo("org/model", sharded_model())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "dist" / "model"
    tasks.convert(Context(), "org/model", quantization="q4f16_1", output=str(out))
    (job,) = conversions
    assert job.shown_model == f"org/model@{commit}"
    assert sorted(job.model_files) == sorted(
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "model.safetensors.index.json", *SHARDS]
    )  # fmt: skip
    assert job.model_dir == tmp_path / "hf-home" / "hub" / "models--org--model" / "snapshots" / commit
    assert all(path.resolve().is_file() for path in job.model_files.values())
    # what run.py mounts: each file as a regular file of /input/model, never the snapshot's links
    mounts = run_module.model_mounts(job)
    assert {target for _, target, _ in mounts} == {f"/input/model/{name}" for name in job.model_files}
    assert all(not source.is_symlink() and read_only for source, _, read_only in mounts)
    source = json.loads((out / "source.json").read_text())
    assert (source["repo_id"], source["revision"], source["commit"]) == ("org/model", None, commit)
    assert source["license"] == "apache-2.0" and "adapter_merged" not in source
    assert {"path": SHARDS[1], "size": 200, "sha256": sha256(b"\1" * 200)} in source["files"]
    config = next(entry for entry in source["files"] if entry["path"] == "config.json")
    assert config["sha256"] == sha256((job.model_dir / "config.json").read_bytes())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_pinned_revision_is_the_commit_converted(hub, tmp_path, conversions):
    old = hub.seed_repo("org/model", sharded_model(version=1), tag="v1")
    hub.seed_repo("org/model", sharded_model(version=2))
    tasks.convert(Context(), "org/model@v1", quantization="q4f16_1", output=str(tmp_path / "out"))
    assert conversions[0].shown_model == f"org/model@{old}"
    assert json.loads(conversions[0].model_files["config.json"].read_text())["version"] == 1
    source = json.loads((tmp_path / "out" / "source.json").read_text())
    assert (source["revision"], source["commit"]) == ("v1", old)


def test_an_existing_local_folder_wins_over_a_hub_id(hub, tmp_path, conversions, monkeypatch):
    hub.seed_repo("org/model", sharded_model())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "model").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "source.json").write_text('{"repo_id": "org/earlier"}')  # an earlier Hub conversion's
    tasks.convert(Context(), "org/model", quantization="q4f16_1", output="out")
    (job,) = conversions
    assert (job.model_dir, job.model_files, job.shown_model) == (Path("org/model"), None, None)
    assert hub.requests == []  # nothing asked of the Hub
    assert not (tmp_path / "out" / "source.json").exists()  # it would cite a model this bundle is not


def test_a_failed_conversion_records_no_source(hub, tmp_path, monkeypatch):
    hub.seed_repo("org/model", sharded_model())
    monkeypatch.setattr(run_module, "run_convert_job", lambda job: 1)
    with pytest.raises(Exit) as stopped:
        tasks.convert(Context(), "org/model", quantization="q4f16_1", output=str(tmp_path / "out"))
    assert stopped.value.code == 1 and not (tmp_path / "out" / "source.json").exists()


def test_a_merged_adapter_is_recorded_with_the_source(hub, tmp_path, conversions):
    hub.seed_repo("org/model", sharded_model())
    adapter = tmp_path / "lora"
    adapter.mkdir()
    tasks.convert(Context(), "org/model", quantization="q4f16_1", output=str(tmp_path / "out"), adapter=str(adapter))
    assert conversions[0].adapter == adapter
    assert json.loads((tmp_path / "out" / "source.json").read_text())["adapter_merged"] is True


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("org/missing", {}, r"org/missing is not a model on .*check the id"),
        ("org/model@nope", {}, r"no revision 'nope'.*a tag \(v1\)"),
        ("org/gated", {}, r"gated: accept its terms on .*hf auth login.*HF_TOKEN"),
        ("org/pickled", {}, r"only as pickle files .*--allow-pickle"),
        ("org/gguf", {}, r"holds no model weights .*pick the repository of the original weights"),
        ("org/lora", {}, r"is a PEFT adapter, not a model.*--adapter"),
        ("my-model", {}, r"model folder my-model does not exist.*org/name\[@revision\]"),
        ("./models/llama", {}, r"does not exist: give a model folder"),
        ("org/model", {"adapter": "org/lora@v2"}, r"no revision 'v2' in org/lora"),
        ("org/model", {"quantization": None}, r"convert needs --quantization"),
    ],
)
def test_what_the_user_can_fix_exits_2_with_the_fix(hub, tmp_path, conversions, model, options, message):
    hub.seed_repo("org/model", sharded_model(), tag="v1")
    hub.seed_repo("org/gated", sharded_model(), gated="manual", authorized=["member"])
    hub.seed_repo("org/pickled", {"config.json": "{}", "pytorch_model.bin": b"\0" * 8})
    hub.seed_repo("org/gguf", {"config.json": "{}", "model-q4.gguf": b"\0" * 8})
    hub.seed_repo("org/lora", {"adapter_config.json": "{}", "adapter_model.safetensors": b"\0" * 8})
    arguments = {"quantization": "q4f16_1", "output": str(tmp_path / "out"), **options}
    with pytest.raises(Exit) as stopped:
        tasks.convert(Context(), model, **arguments)
    assert stopped.value.code == 2
    assert re.search(message, str(stopped.value.message)), stopped.value.message
    assert conversions == [] and not (tmp_path / "out").exists()


def test_pickle_weights_with_the_explicit_flag(hub, tmp_path, conversions):
    hub.seed_repo("org/pickled", {"config.json": "{}", "pytorch_model.bin": b"\0" * 8})
    tasks.convert(Context(), "org/pickled", quantization="q0f32", output=str(tmp_path / "out"), allow_pickle=True)
    assert sorted(conversions[0].model_files) == ["config.json", "pytorch_model.bin"]


def test_the_command_line_uses_the_clients_token_and_exits_2_without_access(hub, tmp_path):
    """The real `invoke convert`, in its own process: the client's token from HF_TOKEN (a user the
    gated model has not authorized), never shown; it stops before Docker, with the fix."""
    hub.seed_repo("org/gated", sharded_model(), gated="manual", authorized=["member"])
    environment = {**os.environ, "HF_TOKEN": "hf_reader"}
    result = subprocess.run(
        [*INVOKE, "convert", "org/gated", "-q", "q4f16_1", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=environment,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "org/gated is gated and the token in use" in result.stderr
    assert "hf_reader" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_the_cache_serves_a_second_resolution_without_downloading(hub):
    hub.seed_repo("org/model", sharded_model())
    first = hubconvert.resolve_model_source("org/model")
    hub.requests.clear()
    second = hubconvert.resolve_model_source("org/model")
    assert second == first and hub.served(containing="/resolve/") == []
    assert first.from_hub and not hubconvert.resolve_model_source(".").from_hub


def test_the_record_names_the_hub_and_not_this_machine(hub, tmp_path):
    hub.seed_repo("org/model", sharded_model())
    source = hubconvert.resolve_model_source("org/model")
    text = json.dumps(source.provenance)
    assert str(tmp_path) not in text and SECRET not in text
    assert source.provenance["endpoint"] == hub.url
    (tmp_path / "bundle").mkdir()
    written = hubconvert.record_source(tmp_path / "bundle", source)
    assert hubfetch.read_provenance(tmp_path / "bundle") == source.provenance and written.name == "source.json"


def test_an_adapter_that_is_a_folder_or_a_plain_path_is_left_to_the_conversion_checks(tmp_path):
    assert hubconvert.resolve_adapter_source(None) is None
    assert hubconvert.resolve_adapter_source("lora").model_dir == Path("lora")
    assert hubconvert.resolve_adapter_source("./org/lora").model_dir == Path("./org/lora")


ADAPTER_REPO = {
    "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}),
    "adapter_model.safetensors": b"\5" * 64,
    "README.md": "a fine-tune",
    "train.py": "import os",  # never fetched: a repository's code
}


def test_a_hub_adapter_is_fetched_and_mounted_file_by_file_and_cited(hub, tmp_path, conversions):
    model_commit = hub.seed_repo("org/model", sharded_model())
    adapter_commit = hub.seed_repo("someone/lora", ADAPTER_REPO)
    out = tmp_path / "out"
    tasks.convert(Context(), "org/model", quantization="q4f16_1", output=str(out), adapter="someone/lora")
    (job,) = conversions
    assert sorted(job.adapter_files) == ["adapter_config.json", "adapter_model.safetensors"]
    assert job.shown_adapter == f"someone/lora@{adapter_commit}"
    mounts = run_module.folder_mounts(job.adapter, job.adapter_files, "/input/adapter")
    assert {target for _, target, _ in mounts} == {"/input/adapter/adapter_config.json",
                                                   "/input/adapter/adapter_model.safetensors"}  # fmt: skip
    assert all(not source.is_symlink() and read_only for source, _, read_only in mounts)
    source = json.loads((out / "source.json").read_text())
    assert source["commit"] == model_commit and source["adapter_merged"] is True
    assert (source["adapter"]["repo_id"], source["adapter"]["commit"]) == ("someone/lora", adapter_commit)


def test_a_model_given_as_the_adapter_is_refused_naming_the_fix(hub, tmp_path, conversions):
    hub.seed_repo("org/model", sharded_model())
    with pytest.raises(Exit) as refused:
        tasks.convert(Context(), "org/model", quantization="q4f16_1", output=str(tmp_path / "o"), adapter="org/model")
    assert refused.value.code == 2 and "is a model, not a PEFT adapter" in str(refused.value) and not conversions


# -- several quantizations: one fetch, a bundle each (llm2wasm.host.convertcommand) ------------


def test_one_or_several_quantizations_each_once_in_order():
    assert quantizations_of("q4f16_1") == ["q4f16_1"]
    assert quantizations_of(" q4f16_1, q4f32_1,q4f16_1") == ["q4f16_1", "q4f32_1"]


@pytest.mark.parametrize("text", ["q4f16_1,", "q4f16_1,,q0f32", "q4f16_1;q4f32_1", "int4"])
def test_a_list_that_is_not_quantization_names_is_a_usage_error(text):
    with pytest.raises(UsageError, match=r"e\.g\."):
        quantizations_of(text)


def test_one_quantization_writes_out_several_write_webllm_named_bundles_inside(tmp_path):
    assert outputs_for(tmp_path, ["q4f16_1"], "Qwen") == {"q4f16_1": tmp_path}
    assert outputs_for(tmp_path, ["q4f16_1", "q4f32_1"], "Qwen2.5-0.5B-Instruct") == {
        "q4f16_1": tmp_path / "Qwen2.5-0.5B-Instruct-q4f16_1-MLC",
        "q4f32_1": tmp_path / "Qwen2.5-0.5B-Instruct-q4f32_1-MLC",
    }


def test_a_hub_model_is_fetched_once_and_converted_per_quantization(hub, tmp_path, conversions, monkeypatch):
    commit = hub.seed_repo("org/Tiny-Chat", sharded_model())
    fetches = []
    fetch = hubfetch.fetch_model

    def counted(*args, **kwargs):
        fetches.append(args)
        return fetch(*args, **kwargs)

    monkeypatch.setattr(hubfetch, "fetch_model", counted)
    tasks.convert(Context(), "org/Tiny-Chat", quantization="q4f16_1,q4f32_1", output=str(tmp_path / "dist"))
    assert len(fetches) == 1
    assert [(job.quantization, job.output) for job in conversions] == [
        ("q4f16_1", tmp_path / "dist" / "Tiny-Chat-q4f16_1-MLC"),
        ("q4f32_1", tmp_path / "dist" / "Tiny-Chat-q4f32_1-MLC"),
    ]
    assert conversions[0].model_files == conversions[1].model_files  # the same fetched files
    for job in conversions:
        assert json.loads((job.output / "source.json").read_text())["commit"] == commit


def test_a_local_folder_names_the_bundles_after_itself(tmp_path, conversions):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    tasks.convert(Context(), str(model), quantization="q0f32,q4f32_1", output=str(tmp_path / "out"))
    assert [job.output.name for job in conversions] == ["my-model-q0f32-MLC", "my-model-q4f32_1-MLC"]


def test_the_first_failure_stops_the_rest_and_is_the_exit_status(tmp_path, monkeypatch, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    started = []

    def fail(job):
        started.append(job.quantization)
        return 2

    monkeypatch.setattr(run_module, "run_convert_job", fail)
    with pytest.raises(Exit) as stopped:
        tasks.convert(Context(), str(model), quantization="q4f16_1,q4f32_1", output=str(tmp_path / "out"))
    assert stopped.value.code == 2 and started == ["q4f16_1"]
    assert "not converted: q4f32_1" in capsys.readouterr().err


def test_a_model_id_with_several_quantizations_is_refused_before_anything_runs(tmp_path, conversions):
    with pytest.raises(Exit) as refused:
        tasks.convert(Context(), str(tmp_path), quantization="q4f16_1,q4f32_1", output="out", model_id="mine")
    assert refused.value.code == 2 and "drop --model-id" in str(refused.value) and conversions == []
