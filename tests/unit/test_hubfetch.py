"""llm2wasm.host.hubfetch against the stand-in Hub, through the real `huggingface_hub` client:
`org/name[@revision]`, only the files a conversion needs, the cache reused, errors that name the fix."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from huggingface_hub import constants

from llm2wasm.errors import UsageError
from llm2wasm.host import hubfetch
from llm2wasm.host.hubfetch import HubRef
from tests.standins.hub import point_client_at
from tests.standins.hub.server import StandinHub

SECRET = "hf_member_secret_token"
TOKENS = {SECRET: "member", "hf_reader": "reader"}
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
INDEX = {"metadata": {}, "weight_map": {"a.weight": SHARDS[0], "b.weight": SHARDS[1], "c.weight": SHARDS[1]}}
CONVERSION_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def sharded_model(version: int = 1) -> dict:
    """A repository as the Hub holds them: what a conversion reads, and much it must not fetch."""
    return {
        "config.json": json.dumps({"model_type": "llama", "version": version}),
        "generation_config.json": '{"do_sample": false}',
        "tokenizer.json": '{"model": {}}',
        "tokenizer_config.json": '{"model_max_length": 2048}',
        "model.safetensors.index.json": json.dumps(INDEX),
        SHARDS[0]: b"\0" * 100,
        SHARDS[1]: b"\1" * 200,
        "consolidated.safetensors": b"\2" * 300,  # the same weights in another layout
        "pytorch_model.bin": b"\3" * 50,
        "onnx/model.onnx": b"\4" * 10,
        "README.md": "---\nlicense: apache-2.0\n---\n# a model\n",
    }


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with StandinHub(tmp_path / "store", tokens=TOKENS) as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf-home")
        yield hub


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/name", HubRef("org/name")),
        ("Qwen/Qwen2.5-0.5B-Instruct@main", HubRef("Qwen/Qwen2.5-0.5B-Instruct", "main")),
        ("org/name@v1.0", HubRef("org/name", "v1.0")),
        ("org/name@refs/pr/1", HubRef("org/name", "refs/pr/1")),
        ("org/name@" + "ab" * 20, HubRef("org/name", "ab" * 20)),
    ],
)
def test_hub_ids_parse(text, expected):
    assert hubfetch.parse_hub_ref(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text", ["gpt2", "a/b/c", "org/na--me", "org/name.git", "org/-name", "org/name@", "org/name@a b", "org/name@x..y"]
)
def test_invalid_hub_ids_are_refused(text):
    with pytest.raises(UsageError, match=r"is not a (Hub model id|revision).*org/name|Qwen/"):
        hubfetch.parse_hub_ref(text)


def test_an_existing_local_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert hubfetch.as_hub_ref("org/local") is None
    assert hubfetch.as_hub_ref("org/remote@v1") == HubRef("org/remote", "v1")
    with pytest.raises(UsageError, match="does not exist"):
        hubfetch.as_hub_ref("./models/llama")


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ({"config.json", "model.safetensors", "consolidated.safetensors"}, ["config.json", "model.safetensors"]),
        ({"config.json", "a.safetensors", "b.safetensors", "x.bin"}, ["config.json", "a.safetensors", "b.safetensors"]),
        (
            {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.json"},
            ["config.json", "tokenizer.json", "adapter_config.json", "adapter_model.safetensors"],
        ),
        ({"config.json", "sub/model.safetensors", "model.safetensors"}, ["config.json", "model.safetensors"]),
    ],
)
def test_only_one_set_of_weights_is_planned(names, expected):
    assert hubfetch.plan_files(names, "org/m") == (expected, None)


def test_pickle_weights_only_with_the_explicit_flag():
    names = {"config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"}
    with pytest.raises(UsageError, match=r"only as pickle files .*--allow-pickle"):
        hubfetch.plan_files(names, "org/m")
    files, index = hubfetch.plan_files(names, "org/m", allow_pickle=True)
    assert (files[1:], index) == (sorted(names - {"config.json"}), None)
    with pytest.raises(UsageError, match=r"adapter_model\.bin"):
        hubfetch.plan_files({"adapter_config.json", "adapter_model.bin"}, "org/a")
    assert hubfetch.plan_files({"adapter_config.json", "adapter_model.bin"}, "org/a", allow_pickle=True)[0] == [
        "adapter_config.json",
        "adapter_model.bin",
    ]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ({"config.json", "model.gguf"}, "holds no model weights"),
        ({"model.safetensors"}, "has no config.json"),
    ],
)
def test_a_repository_without_what_a_conversion_reads_is_refused(names, message):
    with pytest.raises(UsageError, match=message):
        hubfetch.plan_files(names, "org/m")


def test_fetches_only_what_a_conversion_needs_into_the_hf_cache(hub, tmp_path):
    commit = hub.seed_repo("org/model", sharded_model())
    model = hubfetch.fetch_model("org/model")
    assert (model.repo_id, model.revision, model.commit) == ("org/model", None, commit)
    assert sorted(model.files) == sorted([*CONVERSION_FILES, "model.safetensors.index.json", *SHARDS])
    assert model.folder == tmp_path / "hf-home" / "hub" / "models--org--model" / "snapshots" / commit
    assert sorted(path.name for path in model.folder.iterdir()) == sorted(model.files)
    assert model.file_paths[SHARDS[1]].read_bytes() == b"\1" * 200
    assert model.license == "apache-2.0" and model.endpoint == hub.url
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.served("GET", "/resolve/")}
    assert fetched == set(model.files)  # nothing else crossed the network


def test_a_second_fetch_of_the_same_commit_downloads_nothing(hub):
    hub.seed_repo("org/model", sharded_model())
    first = hubfetch.fetch_model("org/model")
    hub.requests.clear()
    second = hubfetch.fetch_model("org/model")
    assert second == first
    assert hub.served(containing="/resolve/") == []
    assert [path for _, path in hub.requests] == [
        "/api/models/org/model",  # the branch's commit now
        f"/api/models/org/model/revision/{first.commit}",  # that commit's file list
    ]


def test_a_revision_pins_the_commit(hub):
    old = hub.seed_repo("org/model", sharded_model(version=1), tag="v1")
    hub.seed_repo("org/model", sharded_model(version=2))
    for revision in ("v1", old):
        model = hubfetch.fetch_model(f"org/model@{revision}")
        assert (model.revision, model.commit) == (revision, old)
        assert json.loads((model.folder / "config.json").read_text())["version"] == 1
    assert json.loads((hubfetch.fetch_model("org/model").folder / "config.json").read_text())["version"] == 2


def test_errors_name_the_problem_and_the_fix(hub):
    hub.seed_repo("org/model", sharded_model(), tag="v1")
    hub.seed_repo("org/gated", sharded_model(), gated="manual", authorized=["member"])
    hub.seed_repo("org/pickled", {"config.json": "{}", "pytorch_model.bin": b"\0" * 8})
    with pytest.raises(UsageError, match=r"not a model on .*check the id.*private.*HF_TOKEN"):
        hubfetch.fetch_model("org/missing")
    with pytest.raises(UsageError, match=r"no revision 'nope'.*branch \(main\), a tag \(v1\)"):
        hubfetch.fetch_model("org/model@nope")
    with pytest.raises(UsageError, match=rf"gated: accept its terms on {hub.url}/org/gated.*hf auth login.*HF_TOKEN"):
        hubfetch.fetch_model("org/gated")
    with pytest.raises(UsageError, match="gated and the token in use has no access"):
        hubfetch.fetch_model("org/gated", token="hf_reader")
    with pytest.raises(UsageError, match="only as pickle files"):
        hubfetch.fetch_model("org/pickled")
    assert hubfetch.fetch_model("org/pickled", allow_pickle=True).files == ("config.json", "pytorch_model.bin")


def test_the_token_comes_from_the_client_and_is_never_shown(hub, monkeypatch, capsys):
    hub.seed_repo("org/gated", sharded_model(), gated="manual", authorized=["member"])
    monkeypatch.setenv("HF_TOKEN", SECRET)  # the client's own resolution: HF_TOKEN, then the stored login
    model = hubfetch.fetch_model("org/gated")
    assert model.file_paths["config.json"].is_file()
    assert SECRET not in json.dumps(hubfetch.provenance(model))
    monkeypatch.setenv("HF_TOKEN", "hf_reader")
    with pytest.raises(UsageError) as refused:
        hubfetch.fetch_model("org/gated", token=SECRET + "x")
    assert SECRET not in str(refused.value)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err


def test_offline_uses_the_cache_or_says_nothing_is_cached(hub, monkeypatch):
    hub.seed_repo("org/model", sharded_model())
    online = hubfetch.fetch_model("org/model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    offline = hubfetch.fetch_model("org/model")
    assert (offline.commit, offline.folder, offline.files) == (online.commit, online.folder, online.files)
    assert offline.license is None  # the model card's metadata comes from the Hub only
    assert hub.requests == []
    with pytest.raises(UsageError, match=r"HF_HUB_OFFLINE is set, and org/other is not in the cache"):
        hubfetch.fetch_model("org/other")


def test_an_unreachable_hub_uses_the_cache_or_says_so(hub, tmp_path):
    hub.seed_repo("org/model", sharded_model())
    online = hubfetch.fetch_model("org/model")
    hub.stop()
    cached = hubfetch.fetch_model("org/model")
    assert (cached.commit, cached.folder, cached.files) == (online.commit, online.folder, online.files)
    with pytest.raises(UsageError, match=r"cannot be reached \(ConnectError.*org/other is not in the cache"):
        hubfetch.fetch_model("org/other")
    with pytest.raises(UsageError, match="cannot be reached"):
        hubfetch.fetch_model("org/model", cache_dir=tmp_path / "empty-cache")


def test_provenance_records_where_the_model_came_from(hub, tmp_path):
    commit = hub.seed_repo("org/model", sharded_model())
    model = hubfetch.fetch_model("org/model@main")
    record = hubfetch.provenance(model)
    assert record["endpoint"] == hub.url
    with_password = dataclasses.replace(model, endpoint=hub.url.replace("http://", "http://user:pw@"))
    assert hubfetch.provenance(with_password) == record
    assert (record["repo_id"], record["revision"], record["commit"], record["license"]) == (
        "org/model",
        "main",
        commit,
        "apache-2.0",
    )
    shard_sha256 = hashlib.sha256(b"\1" * 200).hexdigest()
    assert {"path": SHARDS[1], "size": 200, "sha256": shard_sha256} in record["files"]
    # an LFS file's sha256 is its blob's name in the cache: gigabytes of weights are not read again
    assert (model.folder / SHARDS[1]).resolve().name == shard_sha256
    config = next(entry for entry in record["files"] if entry["path"] == "config.json")
    assert config["sha256"] == hashlib.sha256((model.folder / "config.json").read_bytes()).hexdigest()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert hubfetch.read_provenance(bundle) is None
    assert hubfetch.write_provenance(bundle, model) == bundle / "source.json"
    assert hubfetch.read_provenance(bundle) == record
    (bundle / "source.json").write_text("[1]")
    with pytest.raises(UsageError, match="not a provenance record"):
        hubfetch.read_provenance(bundle)


def test_public_endpoint_drops_credentials():
    assert hubfetch.public_endpoint("https://user:pw@hub.example:8443/mirror/?token=x#y") == (
        "https://hub.example:8443/mirror"
    )
    assert hubfetch.public_endpoint("https://huggingface.co/") == "https://huggingface.co"


def test_a_config_larger_than_the_converter_reads_is_refused_before_it_is_downloaded(hub, monkeypatch):
    # the converter refuses a config over 16 MiB (inputfiles.SMALL_FILE_LIMIT); a repository made to
    # fill the disk is refused from the sizes the Hub lists, before any byte of it is fetched
    monkeypatch.setattr(hubfetch, "SMALL_FILE_LIMIT", 64)
    model = sharded_model()
    model["config.json"] = json.dumps({"model_type": "llama", "padding": "x" * 100})
    hub.seed_repo("org/model", model)
    with pytest.raises(UsageError, match=r"org/model: its config.json is 0 MiB on the Hub, more than any config.json"):
        hubfetch.fetch_model("org/model")
    assert hub.served(containing="/resolve/") == []


@pytest.mark.parametrize("free", [0, hubfetch.DISK_MARGIN + 280])
def test_a_download_the_cache_disk_cannot_hold_is_refused_before_it_starts(hub, monkeypatch, tmp_path, free):
    # free=0: nothing fits; DISK_MARGIN + 280: the configs and the index (272 bytes) fit, the shards (300
    # bytes) do not, and they are not fetched
    hub.seed_repo("org/model", sharded_model())
    monkeypatch.setattr(hubfetch, "free_bytes", lambda folder: free)
    with pytest.raises(UsageError) as error:
        hubfetch.fetch_model("org/model")
    assert "GB free (1 GiB kept back); they were not downloaded" in str(error.value)
    assert "point HF_HUB_CACHE (or HF_HOME) at a disk with room" in str(error.value)
    fetched = {path.rsplit("/", 1)[-1] for _, path in hub.served("GET", "/resolve/")}
    assert fetched.isdisjoint(SHARDS)
    assert fetched == (set() if free == 0 else {*CONVERSION_FILES, "model.safetensors.index.json"})


def test_what_is_in_the_cache_already_needs_no_room(hub, monkeypatch, capsys):
    hub.seed_repo("org/model", sharded_model())
    hubfetch.fetch_model("org/model")
    assert "GB to download into" in capsys.readouterr().err
    monkeypatch.setattr(hubfetch, "free_bytes", lambda folder: hubfetch.DISK_MARGIN)
    hubfetch.fetch_model("org/model")  # every file is in the snapshot: nothing to hold
    assert "to download" not in capsys.readouterr().err
