"""A batch spec naming Hub models (`hub = "org/name[@revision]"`, `adapter_hub =`): the spec accepts
them and refuses ids the Hub cannot have; `invoke batch` fetches each distinct id once on the host,
from the (stand-in) Hub through the real `huggingface_hub` client, before any item runs, mounts the
fetched files one by one into the item's container and records source.json in the bundle; a fetch
refusal stops the batch with exit 2 before any container starts. The GitHub workflow and the
Kubernetes Job, which have no step that could fetch, refuse Hub items with the command that fetches
them into the folder they read. Docker is never reached: the item's container is played in this
process (test_batchrun's way)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.host import batchrun, docker, hubfetch
from llm2wasm.image.batch import github, k8s
from llm2wasm.image.batch.spec import parse_spec
from llm2wasm.image.batch.status import RUN_ID_VARIABLE, read_status, run_item, settings_digest
from llm2wasm.image.convert import command
from llm2wasm.image.hostpaths import HOST_PATHS_VARIABLE
from tests.standins.hub import point_client_at
from tests.standins.hub.server import StandinHub
from tests.unit.test_batch_status import make_bundle
from tests.unit.test_batchrun import mounted
from tests.unit.test_hubconvert import ADAPTER_REPO
from tests.unit.test_hubfetch import SHARDS, sharded_model

IMAGE = "llm2wasm:app-hermetic"
SPEC = """
[defaults]
quantizations = ["q4f16_1", "q4f32_1"]

[[model]]
hub = "org/model"

[[model]]
hub = "org/model@v1"
model_id = "model-v1"
adapter_hub = "someone/lora"
quantizations = ["q4f16_1"]

[[model]]
hub = "org/model"
model_id = "model-again"
quantizations = ["q0f32"]
"""
FETCHED = sorted(
    ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
     "model.safetensors.index.json", *SHARDS]
)  # fmt: skip


def spec_of(text: str, root: Path):
    return parse_spec(text, root / "models.toml", check_paths=False)


# --- the spec ------------------------------------------------------------------------------------------


def test_hub_items_are_named_after_the_repository_and_keep_the_id_as_written(tmp_path):
    items = spec_of(SPEC, tmp_path).items
    assert [(item.model_id, item.hub, item.path) for item in items] == [
        ("model-q4f16_1", "org/model", None),
        ("model-q4f32_1", "org/model", None),
        ("model-v1-q4f16_1", "org/model@v1", None),
        ("model-again-q0f32", "org/model", None),
    ]
    assert (items[2].adapter_hub, items[2].adapter, items[2].adapter_named) == ("someone/lora", None, "someone/lora")
    assert items[0].model == "org/model" and items[0].adapter_named is None


def test_a_folder_item_and_a_hub_item_live_in_one_spec(tmp_path):
    (tmp_path / "models" / "llama").mkdir(parents=True)
    text = SPEC + '\n[[model]]\npath = "models/llama"\nadapter_hub = "someone/lora@v2"\n'
    spec = parse_spec(text, tmp_path / "models.toml")
    assert [(item.model, item.adapter_named) for item in spec.items[-2:]] == [
        ("models/llama", "someone/lora@v2"),
        ("models/llama", "someone/lora@v2"),
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            'hub = "Qwen2.5-0.5B-Instruct"',
            r"hub 'Qwen2.5-0.5B-Instruct' is not org/name\[@revision\].*; write "
            r'e.g. hub = "Qwen/Qwen2.5-0.5B-Instruct" or hub = "Qwen/Qwen2.5-0.5B-Instruct@main"',
        ),
        ('hub = "org/team/model"', r"is not org/name\[@revision\]"),
        ('hub = "org/my model"', r"is not org/name\[@revision\]"),
        ('hub = "org/model@"', r"has no revision the Hub can have after '@' \(''\)"),
        ('hub = "org/model@../main"', r"has no revision the Hub can have"),
        ('hub = "org/mo--del"', r"has '--', '..' or a '.git' ending"),
        ("hub = 7", r"hub 7 is not a string"),
        ('hub = "org/model"\nadapter_hub = "lora"', r"adapter_hub 'lora' is not org/name.*adapter_hub = \"org/"),
        ('hub = "org/model"\npath = "models/model"', r"give path \(a folder\) or hub \(a Hub id\), not both"),
        ('hub = "org/model"\nadapter = "a"\nadapter_hub = "o/a"', r"give adapter \(a folder\) or adapter_hub"),
        ('model_id = "x"', r'path is missing: .* or a Hub model, hub = "Qwen/Qwen2.5-0.5B-Instruct"'),
    ],
)
def test_what_is_not_a_hub_id_is_refused_with_exit_2_naming_the_fix(tmp_path, entry, message):
    text = f'[defaults]\nquantizations = ["q4f16_1"]\n\n[[model]]\n{entry}\n'
    with pytest.raises(UsageError) as refused:
        spec_of(text, tmp_path)
    assert refused.value.exit_code == 2
    assert re.search(message, str(refused.value)), refused.value


def test_hub_keys_are_per_model_not_defaults(tmp_path):
    text = '[defaults]\nhub = "org/model"\nquantizations = ["q4f16_1"]\n\n[[model]]\nhub = "org/model"\n'
    with pytest.raises(UsageError, match=r"\[defaults\]: unknown key 'hub'"):
        spec_of(text, tmp_path)


def test_a_folder_items_settings_digest_is_what_it_was_before_hub_items(tmp_path):
    """An earlier run's ok records of folder items keep counting: hub fields that are unset stay out."""
    (tmp_path / "models" / "llama").mkdir(parents=True)
    spec = parse_spec('[[model]]\npath = "models/llama"\nquantizations = ["q0f32"]\n', tmp_path / "models.toml")
    # the digest as llm2wasm computed it before: every field but index, entry and resources, and base_url
    before = {"path": "models/llama", "quantization": "q0f32", "model_id": "llama-q0f32", "adapter": None,
              "conv_template": None, "context_window": None, "prefill_chunk_size": None, "link_opt": None,
              "base_url": spec.base_url}  # fmt: skip
    expected = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert settings_digest(spec, spec.items[0]) == expected
    # a Hub item's digest names its id: another revision is another bundle
    pinned, repinned = spec_of(SPEC, tmp_path).items[2], spec_of(SPEC.replace("@v1", "@v2"), tmp_path).items[2]
    assert settings_digest(spec, pinned) != settings_digest(spec, repinned)


# --- the item command in the image -----------------------------------------------------------------------


def test_a_hub_item_reads_the_folder_it_was_fetched_into(tmp_path):
    item = spec_of(SPEC, tmp_path).items[2]
    argv = item.convert_argv(Path("/batch"), Path("/output"), "http://x/", Path("/input/model"), Path("/input/adapter"))
    assert argv[0] == "/input/model"
    assert argv[argv.index("--adapter") + 1] == "/input/adapter"
    assert argv[argv.index("--model-id") + 1] == "model-v1-q4f16_1"


def test_a_hub_item_in_a_container_nobody_fetched_for_is_refused_before_it_is_marked(tmp_path):
    spec = spec_of(SPEC, tmp_path)
    with pytest.raises(UsageError) as refused:
        run_item(spec, 0, tmp_path / "out")
    message = str(refused.value)
    assert "names the Hub model org/model, and an item's container has no network" in message
    assert "`invoke batch`" in message and "--fetched-model" in message
    assert 'hf download org/model --local-dir models/model, then path = "models/model"' in message
    assert read_status(tmp_path / "out", 0) is None  # not recorded as a failed conversion
    with pytest.raises(UsageError, match=r"Hub adapter someone/lora.*--fetched-adapter"):
        run_item(spec, 2, tmp_path / "out", fetched_model=tmp_path)
    with pytest.raises(UsageError, match=r"item 0's adapter is not a Hub adapter: it takes no fetched folder"):
        run_item(spec, 0, tmp_path / "out", fetched_model=tmp_path, fetched_adapter=tmp_path)


# --- engines without a step that could fetch ----------------------------------------------------------------


def test_the_github_matrix_refuses_hub_items_with_the_fetch_commands(tmp_path):
    with pytest.raises(UsageError) as refused:
        github.matrix(spec_of(SPEC, tmp_path))
    message = str(refused.value)
    assert refused.value.exit_code == 2 and "the GitHub workflow" in message and "without network" in message
    assert 'model 0: hf download org/model --local-dir models/model, then path = "models/model"' in message
    assert "model 1: hf download org/model --revision v1 --local-dir models/model, then path" in message
    assert 'model 1: hf download someone/lora --local-dir adapters/lora, then adapter = "adapters/lora"' in message
    assert message.count("model 0:") == 1  # one line per entry, not per quantization
    assert "`invoke batch`, which fetches on the host" in message


def test_the_kubernetes_job_refuses_hub_items_saying_to_put_them_on_the_claim(tmp_path):
    spec = spec_of(SPEC, tmp_path)
    with pytest.raises(UsageError) as refused:
        k8s.kubernetes_manifests(spec, SPEC, image=IMAGE, claim="models")
    message = str(refused.value)
    assert "a Kubernetes Job (its pods read the claim)" in message
    assert "hf download org/model --revision v1 --local-dir models/model" in message


def test_folder_specs_still_make_a_matrix_and_a_job(tmp_path):
    text = '[[model]]\npath = "models/llama"\nquantizations = ["q0f32"]\n'
    spec = spec_of(text, tmp_path)
    assert github.matrix(spec)["include"][0]["model_id"] == "llama-q0f32"
    assert k8s.kubernetes_manifests(spec, text, image=IMAGE, claim="models")[-1]["kind"] == "Job"


def test_invoke_batch_matrix_and_k8s_refuse_hub_items(tmp_path):
    (tmp_path / "models.toml").write_text(SPEC)
    for engine in ({"matrix": True}, {"k8s": True}):
        with pytest.raises(UsageError, match="has no step that fetches from the Hub"):
            batchrun.batch_command(tmp_path / "models.toml", None, IMAGE, **engine)


# --- `invoke batch`: fetched once on the host, mounted file by file, recorded ----------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with StandinHub(tmp_path / "store") as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf-home")
        yield hub


@pytest.fixture
def ship(tmp_path, monkeypatch):
    """The spec's folder, the image 'built', and docker's binary named."""
    (tmp_path / "ship").mkdir()
    (tmp_path / "ship" / "models.toml").write_text(SPEC)
    monkeypatch.setattr(docker, "image_id", lambda ref: "sha256:x" if ref == IMAGE else None)
    monkeypatch.setattr(docker, "docker_bin", lambda: "docker")
    return tmp_path / "ship"


@pytest.fixture
def fetches(monkeypatch):
    """Every hubfetch.fetch_model call, as the id it fetched (the real fetch still runs)."""
    calls: list[str] = []
    real = hubfetch.fetch_model

    def counted(ref, **kwargs):
        calls.append(str(ref))
        return real(ref, **kwargs)

    monkeypatch.setattr(hubfetch, "fetch_model", counted)
    return calls


@pytest.fixture
def seeded(hub):
    """org/model at v1 and a newer main; someone/lora. The commits."""
    v1 = hub.seed_repo("org/model", sharded_model(1), tag="v1")
    main = hub.seed_repo("org/model", sharded_model(2))
    lora = hub.seed_repo("someone/lora", ADAPTER_REPO)
    return {"v1": v1, "main": main, "lora": lora}


def test_each_distinct_hub_id_is_fetched_once_before_any_item(ship, seeded, fetches):
    said: list[str] = []
    sources = batchrun.fetch_hub_sources(parse_spec(SPEC, ship / "models.toml"), said.append)
    assert sorted(fetches) == ["org/model", "org/model@v1", "someone/lora"]  # four items, three ids
    assert sources.models["org/model"].shown_model == f"org/model@{seeded['main']}"
    assert sources.models["org/model@v1"].shown_model == f"org/model@{seeded['v1']}"
    assert sources.adapters["someone/lora"].provenance["commit"] == seeded["lora"]
    assert said == ["llm2wasm batch: fetching 3 Hub model(s) and adapter(s) on this host"]


def test_the_items_container_gets_the_fetched_files_mounted_one_by_one(ship, seeded, tmp_path):
    spec = parse_spec(SPEC, ship / "models.toml")
    sources = batchrun.fetch_hub_sources(spec, lambda text: None)
    out = tmp_path / "out"
    cmd = batchrun.item_command(spec, spec.items[2], IMAGE, out, gpu=False, hub=sources)
    model = sources.models["org/model@v1"]
    assert sorted(model.model_files) == FETCHED
    for name, path in model.model_files.items():
        # the file itself (the snapshot's link resolved), read-only, as a regular file of /input/model
        assert path.is_symlink() and mounted(cmd, path.resolve(), f"/input/model/{name}", read_only=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        source = sources.adapters["someone/lora"].model_files[name].resolve()
        assert mounted(cmd, source, f"/input/adapter/{name}", read_only=True)
    assert not any("/snapshots/" in arg for arg in cmd)  # never the snapshot folder and its links
    assert mounted(cmd, ship, "/batch", read_only=True) and mounted(cmd, out, "/output")
    assert cmd[cmd.index("--network") + 1] == "none"
    assert not any("HF_TOKEN" in arg for arg in cmd)
    assert cmd[cmd.index(IMAGE) + 1 :] == [
        "batch", "run", "/batch/models.toml", "--root", "/batch", "--item", "2", "--output", "/output",
        "--fetched-model", "/input/model", "--fetched-adapter", "/input/adapter",
    ]  # fmt: skip
    shown = json.loads(next(arg for arg in cmd if arg.startswith(f"{HOST_PATHS_VARIABLE}=")).split("=", 1)[1])
    assert shown["/input/model"] == f"org/model@{seeded['v1']}"
    assert shown["/input/adapter"] == f"someone/lora@{seeded['lora']}"
    # an item without an adapter is given none
    plain = batchrun.item_command(spec, spec.items[0], IMAGE, out, gpu=False, hub=sources)
    assert plain[-2:] == ["--fetched-model", "/input/model"] and "/input/adapter" not in " ".join(plain)


@pytest.fixture
def containers(ship, tmp_path, monkeypatch):
    """Each item's `docker run`, played here: the item command as the container runs it (the spec at
    /batch, the fetched model at /input/model), converting by writing a bundle; `fail` holds the
    items whose conversion fails. Returns (OUT, the argv each conversion got, fail)."""
    in_container = parse_spec(SPEC, Path("/batch/models.toml"), Path("/batch"), check_paths=False)
    out = tmp_path / "out"
    conversions: dict[int, list[str]] = {}
    fail: set[int] = set()

    def fake_run(cmd, **kwargs):
        passed = dict(cmd[i + 1].split("=", 1) for i, arg in enumerate(cmd) if arg == "-e")
        index = int(cmd[cmd.index("--item") + 1])
        monkeypatch.setenv(RUN_ID_VARIABLE, passed[RUN_ID_VARIABLE])
        item = in_container.items[index]

        def convert(argv):
            conversions[index] = argv
            if index in fail:
                return 1
            make_bundle(out, in_container, item, tmp_path / "work")
            return 0

        monkeypatch.setattr(command, "convert_main", convert)
        fetched = {option: Path(cmd[cmd.index(option) + 1]) for option in ("--fetched-model", "--fetched-adapter")
                   if option in cmd}  # fmt: skip
        model, adapter = fetched.get("--fetched-model"), fetched.get("--fetched-adapter")
        return subprocess.CompletedProcess(cmd, run_item(in_container, index, out, model, adapter))

    monkeypatch.setattr(batchrun.subprocess, "run", fake_run)
    return out, conversions, fail


def test_invoke_batch_converts_hub_items_and_records_their_source(ship, seeded, containers, fetches):
    out, conversions, fail = containers
    fail.add(3)
    results = batchrun.run_batch(ship / "models.toml", out, IMAGE, jobs=1, gpu=False, say=lambda text: None)
    assert [outcome.status for outcome in results] == ["ok", "ok", "ok", "failed"]
    assert sorted(fetches) == ["org/model", "org/model@v1", "someone/lora"]
    assert conversions[2][0] == "/input/model" and conversions[2][conversions[2].index("--adapter") + 1] == (
        "/input/adapter"
    )
    first = json.loads((out / "model-q4f16_1" / "source.json").read_text())
    assert (first["repo_id"], first["revision"], first["commit"]) == ("org/model", None, seeded["main"])
    assert "adapter_merged" not in first
    pinned = json.loads((out / "model-v1-q4f16_1" / "source.json").read_text())
    assert (pinned["repo_id"], pinned["revision"], pinned["commit"]) == ("org/model", "v1", seeded["v1"])
    assert pinned["adapter_merged"] is True and pinned["adapter"]["commit"] == seeded["lora"]
    assert not (out / "model-again-q0f32" / "source.json").exists()  # its conversion failed
    report = json.loads((out / "batch-report.json").read_text())["items"]
    assert (report[2]["model"], report[2]["adapter"]) == ("org/model@v1", "someone/lora")


def test_a_second_run_downloads_nothing(ship, seeded, containers, hub):
    out, _, _ = containers
    batchrun.run_batch(ship / "models.toml", out, IMAGE, jobs=2, gpu=False, say=lambda text: None)
    hub.requests.clear()
    batchrun.run_batch(ship / "models.toml", out, IMAGE, jobs=2, gpu=False, say=lambda text: None)
    assert hub.served(containing="/resolve/") == []


@pytest.mark.parametrize(
    ("hub_id", "message"),
    [
        ("org/missing", r"org/missing is not a model on .*check the id"),
        ("org/model@nope", r"no revision 'nope' in org/model.*a tag \(v1\)"),
        ("org/gguf", r"holds no model weights .*pick the repository of the original weights"),
        ("org/gated", r"gated: accept its terms on .*hf auth login.*HF_TOKEN"),
        ("someone/lora", r"is a PEFT adapter, not a model"),
    ],
)
def test_a_fetch_refusal_stops_the_batch_with_exit_2_before_any_item_runs(ship, seeded, hub, monkeypatch, hub_id,
                                                                          message):  # fmt: skip
    hub.seed_repo("org/gguf", {"config.json": "{}", "model-q4.gguf": b"\0" * 8})
    hub.seed_repo("org/gated", sharded_model(), gated="manual", authorized=["member"])
    # beside the spec's good models, fetched before or after it: nothing runs either way
    (ship / "models.toml").write_text(SPEC + f'\n[[model]]\nhub = "{hub_id}"\nmodel_id = "refused"\n')
    started: list[list[str]] = []
    monkeypatch.setattr(batchrun.subprocess, "run", lambda cmd, **kwargs: started.append(cmd))
    out = ship.parent / "out"
    with pytest.raises(UsageError) as refused:
        batchrun.run_batch(ship / "models.toml", out, IMAGE, jobs=1, gpu=False, say=lambda text: None)
    assert refused.value.exit_code == 2
    assert re.search(message, str(refused.value)), refused.value
    assert started == [] and not out.exists()


def test_pickle_weights_are_fetched_only_when_the_command_line_allows_them(ship, hub, fetches):
    hub.seed_repo("org/pickled", {"config.json": "{}", "pytorch_model.bin": b"\0" * 8})
    spec = parse_spec('[[model]]\nhub = "org/pickled"\nquantizations = ["q0f32"]\n', ship / "models.toml")
    with pytest.raises(UsageError, match=r"only as pickle files .*--allow-pickle") as refused:
        batchrun.fetch_hub_sources(spec, lambda text: None)
    assert refused.value.exit_code == 2
    sources = batchrun.fetch_hub_sources(spec, lambda text: None, allow_pickle=True)
    assert sorted(sources.models["org/pickled"].model_files) == ["config.json", "pytorch_model.bin"]


def test_a_spec_cannot_allow_pickles_for_itself(tmp_path):
    # the spec may come from someone else: the decision to fetch pickles is the command line's alone
    for entry in ('allow_pickle = true\n[[model]]\nhub = "org/pickled"\n',
                  '[[model]]\nhub = "org/pickled"\nallow_pickle = true\n',
                  '[defaults]\nallow_pickle = true\n[[model]]\nhub = "org/pickled"\n'):  # fmt: skip
        with pytest.raises(UsageError, match="allow_pickle"):
            spec_of(entry, tmp_path)


def test_invoke_batch_passes_allow_pickle_to_the_fetch(ship, monkeypatch, tmp_path):
    from invoke import Context

    import tasks

    seen = {}
    monkeypatch.setattr(batchrun, "run_batch", lambda *args, **kwargs: seen.update(kwargs) or [])
    tasks.batch(Context(), str(ship / "models.toml"), output=str(tmp_path / "out"), allow_pickle=True)
    assert seen["allow_pickle"] is True
    tasks.batch(Context(), str(ship / "models.toml"), output=str(tmp_path / "out"))
    assert seen["allow_pickle"] is False
