"""The stand-in Hub (tests/standins/hub) answers the real `huggingface_hub` client as the Hub does:
downloads at a branch, tag or commit, uploads through preupload / LFS batch / commit, the client's
deduplication, the error codes the client turns into its exceptions, and CORS for browser pages."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.standins.hub import point_client_at
from tests.standins.hub.server import StandinHub
from tests.standins.hub.store import git_blob_id

ROOT = Path(__file__).resolve().parents[2]
TOKENS = {"hf_writer": "tester", "hf_reader": "reader", "hf_member": "member"}
WEIGHTS = bytes(range(256)) * 64  # binary: an LFS file


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with StandinHub(tmp_path / "store", tokens=TOKENS) as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf-home")
        yield hub


def fetch(url: str, method: str = "GET", headers: dict | None = None):
    """A plain HTTP request, as a browser's fetch would make it: (status, headers, body)."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_revisions_resolve_to_commits_and_downloads_follow_them(hub):
    first = hub.seed_repo("org/model", {"config.json": '{"v": 1}', "model.safetensors": WEIGHTS}, tag="v1")
    second = hub.seed_repo("org/model", {"config.json": '{"v": 2}'})
    dev = hub.seed_repo("org/model", {"notes.txt": "dev only"}, branch="dev")
    api = HfApi(endpoint=hub.url)
    shas = {revision: api.model_info("org/model", revision=revision).sha for revision in ("main", "v1", "dev", first)}
    assert shas == {"main": second, "v1": first, "dev": dev, first: first}
    assert api.model_info("org/model").sha == second
    assert Path(hf_hub_download("org/model", "config.json", revision="v1")).read_text() == '{"v": 1}'
    assert Path(hf_hub_download("org/model", "config.json")).read_text() == '{"v": 2}'
    snapshot = Path(snapshot_download("org/model", revision="dev"))
    assert snapshot.name == dev
    assert (snapshot / "notes.txt").read_text() == "dev only"
    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS
    refs = api.list_repo_refs("org/model")
    assert {branch.name: branch.target_commit for branch in refs.branches} == {"main": second, "dev": dev}
    assert [(tag.name, tag.target_commit) for tag in refs.tags] == [("v1", first)]


def test_files_are_listed_with_their_git_and_lfs_ids(hub):
    hub.seed_repo("org/model", {"config.json": "{}", "model.safetensors": WEIGHTS, "sub/extra.txt": "x"})
    api = HfApi(endpoint=hub.url)
    siblings = {s.rfilename: s for s in api.model_info("org/model", files_metadata=True).siblings}
    assert set(siblings) == {".gitattributes", "config.json", "model.safetensors", "sub/extra.txt"}
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == git_blob_id(b"{}")
    lfs = siblings["model.safetensors"].lfs
    assert (lfs.sha256, lfs.size) == (hashlib.sha256(WEIGHTS).hexdigest(), len(WEIGHTS))
    top = {entry.path for entry in api.list_repo_tree("org/model")}
    assert top == {".gitattributes", "config.json", "model.safetensors", "sub"}
    assert "sub/extra.txt" in set(api.list_repo_files("org/model"))


def test_resolve_answers_with_the_headers_the_client_reads(hub):
    commit = hub.seed_repo("org/model", {"config.json": "{}", "model.safetensors": WEIGHTS})
    status, headers, body = fetch(f"{hub.url}/org/model/resolve/main/model.safetensors", "HEAD")
    sha256 = hashlib.sha256(WEIGHTS).hexdigest()
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == commit
    assert headers["X-Linked-Etag"] == headers["ETag"] == f'"{sha256}"'
    assert headers["X-Linked-Size"] == headers["Content-Length"] == str(len(WEIGHTS))
    status, headers, body = fetch(f"{hub.url}/org/model/resolve/{commit}/config.json")
    assert (status, body, headers["ETag"]) == (200, b"{}", f'"{git_blob_id(b"{}")}"')
    assert "X-Linked-Etag" not in headers
    status, headers, body = fetch(f"{hub.url}/org/model/resolve/main/model.safetensors", headers={"Range": "bytes=4-9"})
    assert (status, body, headers["Content-Range"]) == (206, WEIGHTS[4:10], f"bytes 4-9/{len(WEIGHTS)}")


def test_a_browser_page_may_load_models_from_it(hub):
    hub.seed_repo("org/model", {"config.json": "{}"})
    url = f"{hub.url}/org/model/resolve/main/config.json"
    status, headers, _ = fetch(url, headers={"Origin": "http://127.0.0.1:8000"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    assert "X-Repo-Commit" in headers["Access-Control-Expose-Headers"]
    preflight = {
        "Origin": "http://127.0.0.1:8000",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "range",
    }
    status, headers, _ = fetch(url, "OPTIONS", preflight)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    assert "GET" in headers["Access-Control-Allow-Methods"] and headers["Access-Control-Allow-Headers"] == "range"
    status, headers, _ = fetch(f"{hub.url}/org/missing/resolve/main/config.json")
    assert status == 401 and headers["Access-Control-Allow-Origin"] == "*"  # errors are readable too


def test_errors_carry_the_codes_the_client_turns_into_its_exceptions(hub):
    hub.seed_repo("org/model", {"config.json": "{}"})
    hub.seed_repo("org/gated", {"config.json": "{}"}, gated="manual", authorized=["member"])
    hub.seed_repo("tester/private", {"config.json": "{}"}, private=True)
    anonymous, reader = HfApi(endpoint=hub.url), HfApi(endpoint=hub.url, token="hf_reader")
    with pytest.raises(RepositoryNotFoundError) as missing:
        anonymous.model_info("org/missing")
    assert missing.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as missing:
        reader.model_info("org/missing")
    assert missing.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        reader.model_info("tester/private")
    assert HfApi(endpoint=hub.url, token="hf_writer").model_info("tester/private").private is True
    with pytest.raises(RevisionNotFoundError):
        anonymous.model_info("org/model", revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/model", "missing.json")
    # a gated repository's card and file list are public; its files are not
    assert anonymous.model_info("org/gated").gated == "manual"
    with pytest.raises(GatedRepoError) as gated:
        hf_hub_download("org/gated", "config.json")
    assert gated.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as gated:
        hf_hub_download("org/gated", "config.json", token="hf_reader")
    assert gated.value.response.status_code == 403
    assert Path(hf_hub_download("org/gated", "config.json", token="hf_member")).read_text() == "{}"


def test_uploads_make_commits_of_regular_and_lfs_files(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token="hf_writer")
    repo = api.create_repo("tester/bundle")
    assert repo.repo_id == "tester/bundle"
    assert api.create_repo("tester/bundle", exist_ok=True).repo_id == "tester/bundle"
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_repo("tester/bundle")
    assert exists.value.response.status_code == 409
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "mlc-chat-config.json").write_text('{"quantization": "q4f32_1"}')
    (folder / "params_shard_0.bin").write_bytes(WEIGHTS)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a card\n")
    before = api.model_info("tester/bundle").sha
    commit = api.upload_folder(repo_id="tester/bundle", folder_path=folder, commit_message="first").oid
    assert commit != before and api.model_info("tester/bundle").sha == commit
    files = {entry.path: entry for entry in api.list_repo_tree("tester/bundle", recursive=True)}
    assert files["params_shard_0.bin"].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert files["mlc-chat-config.json"].lfs is None
    assert Path(hf_hub_download("tester/bundle", "params_shard_0.bin")).read_bytes() == WEIGHTS
    assert api.model_info("tester/bundle").card_data.license == "mit"
    api.create_commit("tester/bundle", [CommitOperationDelete("README.md")], commit_message="drop the card")
    assert "README.md" not in api.list_repo_files("tester/bundle")


def test_content_already_on_the_hub_is_not_sent_again(hub, tmp_path):
    api = HfApi(endpoint=hub.url, token="hf_writer")
    api.create_repo("tester/bundle")
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "params_shard_0.bin").write_bytes(WEIGHTS)
    first = api.upload_folder(repo_id="tester/bundle", folder_path=folder).oid
    assert len(hub.served("PUT", "/lfs-upload/")) == 1
    hub.requests.clear()
    # same content again: preupload names each file's oid, which equals the client's, and the LFS
    # batch gives no upload action: nothing is sent and no commit is made
    again = api.upload_folder(repo_id="tester/bundle", folder_path=folder).oid
    assert again == first
    assert hub.served("PUT") == [] and hub.served("POST", "/commit/") == []
    # an LFS object the repository already stores, under a new name: committed, not uploaded
    hub.requests.clear()
    operations = [
        CommitOperationAdd("params_shard_1.bin", WEIGHTS),
        CommitOperationAdd("config.json", b'{"changed": true}'),
    ]
    third = api.create_commit("tester/bundle", operations, commit_message="rename").oid
    assert third != first and hub.served("PUT") == []
    assert len(hub.served("POST", "/commit/")) == 1
    assert Path(hf_hub_download("tester/bundle", "params_shard_1.bin")).read_bytes() == WEIGHTS


def test_only_the_owner_writes(hub, tmp_path):
    hub.seed_repo("tester/bundle", {"config.json": "{}"})
    operation = [CommitOperationAdd("x.json", b"{}")]
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(endpoint=hub.url, token="hf_reader").create_commit("tester/bundle", operation, commit_message="x")
    assert refused.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(endpoint=hub.url, token="hf_reader").create_repo("tester/other")
    assert refused.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(endpoint=hub.url, token="not-a-token").model_info("tester/bundle")
    assert refused.value.response.status_code == 401


def test_request_bodies_may_come_chunked_on_one_connection(hub):
    # the client streams file uploads; without a known length they come chunked
    connection = http.client.HTTPConnection(*hub.server.server_address[:2])
    for content, status in (("---\nlicense: mit\n---\n", 200), ("---\nlicense: mit\n", 400)):
        halves = iter([b'{"content": ', json.dumps(content).encode() + b"}"])
        connection.request("POST", "/api/validate-yaml", body=halves, encode_chunked=True)
        answer = connection.getresponse()
        assert (answer.status, answer.getheader("Transfer-Encoding")) == (status, None), answer.read()
        answer.read()
    connection.close()


def test_runs_as_a_module(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.standins.hub.server", "--root", str(tmp_path), "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stdout.readline().split(" at ")[-1].strip()
        status, headers, _ = fetch(f"{url}/api/models/org/missing")
        assert status == 401 and headers["X-Error-Code"] == "RepoNotFound"
    finally:
        process.terminate()
        process.wait(timeout=10)
