"""`invoke batch` with the real hermetic chain: a spec of two models in two quantizations, two
fine-tunes (LoRA adapters) of the second, and one model that cannot be converted; the items run two
at a time in the app image; the failed item is reported and the others finish; a re-run skips what
is done; an item whose container is killed is reported failed (interrupted), not by its earlier
"ok", and the next run converts it; the combined app config has WebLLM's own fields; and the item
command runs with JOB_COMPLETION_INDEX as a Kubernetes pod runs it.

The two fine-tunes share one compiled library (issue 30): they have their base's shape and
settings, so the library cache gives the second the library the first filed (side by side, the
cache's lock makes one wait for the other's compile), and each bundle holds its own merged weights.
The second fine-tune comes from the Hub (issue 27): its base and its adapter are repositories of the
stand-in Hub (tests/standins/hub, on 127.0.0.1), fetched once on the host with the real
`huggingface_hub` client before any item runs, mounted into an item container that has no network,
and cited by commit in the bundle's source.json.
One headless Chromium then loads the plain model and both fine-tunes, and each generates its own
transformers tokens: a library is right for weights it was not compiled with. `invoke clean
--lib-cache` shows a cache's size and empties it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from llm2wasm.image.convert.webllm_types import interface_fields
from tests.browser import chromium_path, run_in_one_browser
from tests.conftest import INVOKE, ROOT, app_image, invoke, run_app, shared_library_cache
from tests.standins.hub import child_environment, client_environment, files_of
from tests.standins.hub.server import StandinHub

STEPS = 8
MAKE_MODELS = f"""
import json
from pathlib import Path
from llm2wasm.image.convert.checkmodels import make_browser_check_adapter, make_browser_check_model
reference = make_browser_check_model(Path("/work/models/llama"), steps={STEPS})
make_browser_check_model(Path("/work/models/qwen2"), steps={STEPS}, architecture="qwen2")
tune_a = make_browser_check_adapter(Path("/work/models/qwen2"), Path("/work/adapters/qwen2-lora"), steps={STEPS})
tune_b = make_browser_check_adapter(
    Path("/work/models/qwen2"), Path("/work/adapters/qwen2-tune-b"), steps={STEPS},
    first_seed=tune_a["adapter_seed"] + 1,
)
references = {{"llama-q0f32": reference, "qwen2-q0f32": tune_a, "qwen2-tune-b-q0f32": tune_b}}
Path("/work/references.json").write_text(json.dumps(references))
"""
SPEC = """
base_url = "http://127.0.0.1:8000/"

[defaults]
conv_template = "chatml"
context_window = 256
prefill_chunk_size = 64

[[model]]
path = "models/llama"
quantizations = ["q0f32", "q4f32_1"]

[[model]]
path = "models/qwen2"
adapter = "adapters/qwen2-lora"
quantizations = ["q0f32"]

[[model]]
# another fine-tune of the same base, base and adapter from the Hub: fetched on this host before any
# item runs; its library is the one above, from the library cache
hub = "org/qwen2"
adapter_hub = "someone/qwen2-tune-b"
model_id = "qwen2-tune-b"
quantizations = ["q0f32"]

[[model]]
# a folder with no weights: `llm2wasm convert` refuses it, and only this item fails
path = "models/broken"
quantizations = ["q0f32"]
"""
ITEMS = ["llama-q0f32", "llama-q4f32_1", "qwen2-q0f32", "qwen2-tune-b-q0f32", "broken-q0f32"]
FINE_TUNES = ITEMS[2:4]
BROKEN = len(ITEMS) - 1
# the session's library cache: the re-runs reuse the first run's libraries, and the matrix rows of
# the same shapes (tests/integration/test_models.py) reuse them too
SHARED = {"LLM2WASM_LIB_CACHE": str(shared_library_cache())}
HUB_MODEL, HUB_ADAPTER = "org/qwen2", "someone/qwen2-tune-b"


def batch_task(*args: str, hub: dict) -> subprocess.CompletedProcess:
    """`invoke batch` as a user runs it: the session's library cache, the Hub client pointed at the
    stand-in (no login of this machine's)."""
    return subprocess.run([*INVOKE, "batch", *args], capture_output=True, text=True, cwd=ROOT, timeout=3600,
                          env=batch_environment(hub))  # fmt: skip


def batch_environment(hub: dict) -> dict[str, str]:
    return child_environment(SHARED | hub["environment"])


@pytest.fixture(scope="module")
def batch_dir(hermetic_chain, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch")
    made = run_app("-c", MAKE_MODELS, mounts={root: "/work"}, entrypoint="python")
    assert made.returncode == 0, made.stderr
    (root / "models" / "broken").mkdir()
    (root / "models" / "broken" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "models.toml").write_text(SPEC)
    return root


@pytest.fixture(scope="module")
def hub(batch_dir, tmp_path_factory):
    """The stand-in Hub, serving for the whole module, holding the second fine-tune's base and
    adapter; its commits and the environment that points a client at it."""
    home = tmp_path_factory.mktemp("hub")
    with StandinHub(home / "store") as server:
        commits = {
            HUB_MODEL: server.seed_repo(HUB_MODEL, files_of(batch_dir / "models" / "qwen2")),
            HUB_ADAPTER: server.seed_repo(HUB_ADAPTER, files_of(batch_dir / "adapters" / "qwen2-tune-b")),
        }
        yield {"server": server, "commits": commits, "environment": client_environment(server.url, home / "client")}


@pytest.fixture(scope="module")
def first_run(batch_dir, hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    started = time.monotonic()
    result = batch_task(str(batch_dir / "models.toml"), "-o", str(out), "--image", app_image(), "--jobs", "2", hub=hub)
    return out, result, time.monotonic() - started


def test_every_item_runs_the_failed_one_is_reported_and_the_others_finish(first_run):
    out, result, _ = first_run
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{len(ITEMS)} item(s) from" in result.stderr and "2 at a time" in result.stderr
    for index, model_id in enumerate(ITEMS[:BROKEN]):
        assert f"<== [{index}] {model_id}: done in" in result.stderr
        assert (out / model_id / "lib" / f"{model_id}.wasm").is_file()
    assert f"!!! [{BROKEN}] broken-q0f32: failed (exit 2)" in result.stderr
    assert "1 item(s) failed; their logs are in" in result.stderr
    assert "no weights" in (out / ".batch" / f"item-{BROKEN}.log").read_text().lower()
    # the table: every item, its status, time, library size and vram_required_MB
    assert "| 0 | llama-q0f32 | q0f32 | ok |" in result.stdout
    assert f"| {BROKEN} | broken-q0f32 | q0f32 | failed |" in result.stdout
    report = json.loads((out / "batch-report.json").read_text())
    assert [row["status"] for row in report["items"]] == ["ok"] * BROKEN + ["failed"]
    assert all(row["library_bytes"] > 0 and row["vram_required_MB"] > 0 for row in report["items"][:BROKEN])


def test_the_combined_app_config_lists_every_bundle_with_webllms_fields(first_run):
    out, _, _ = first_run
    app_config = json.loads((out / "app-config.json").read_text())
    records = app_config["model_list"]
    assert [record["model_id"] for record in records] == ITEMS[:BROKEN]
    declarations = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", app_image(), "-c",
         'cat "$LLM2WASM_WEBLLM_DIR/lib/config.d.ts"'],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert set(app_config) <= interface_fields(declarations, "AppConfig")
    model_record = interface_fields(declarations, "ModelRecord")
    for record in records:
        assert set(record) <= model_record, set(record) - model_record
        # served from base_url/<model_id>/, as each bundle's own app config says
        assert record["model"] == f"http://127.0.0.1:8000/{record['model_id']}/model/"
        assert record["model_lib"] == f"http://127.0.0.1:8000/{record['model_id']}/lib/{record['model_id']}.wasm"


def test_the_hub_item_is_fetched_once_on_the_host_and_cites_its_commits(first_run, hub):
    out, result, _ = first_run
    assert "fetching 2 Hub model(s) and adapter(s) on this host" in result.stderr
    source = json.loads((out / FINE_TUNES[1] / "source.json").read_text())
    assert (source["repo_id"], source["commit"]) == (HUB_MODEL, hub["commits"][HUB_MODEL])
    assert source["adapter_merged"] is True and source["adapter"]["commit"] == hub["commits"][HUB_ADAPTER]
    card = (out / FINE_TUNES[1] / "README.md").read_text()
    assert f"{HUB_MODEL}@{hub['commits'][HUB_MODEL]}" in card  # the bundle says what it was made from
    # the item's container had no network: the files came mounted from the host's Hub cache
    cached = Path(hub["environment"]["HF_HUB_CACHE"])
    assert (cached / "models--org--qwen2").is_dir() and (cached / "models--someone--qwen2-tune-b").is_dir()


def test_a_rerun_skips_what_is_done(batch_dir, first_run, hub):
    out, _, first_seconds = first_run
    hub["server"].requests.clear()
    started = time.monotonic()
    result = batch_task(str(batch_dir / "models.toml"), "-o", str(out), "--image", app_image(), "--jobs", "2", hub=hub)
    seconds = time.monotonic() - started
    assert hub["server"].served(containing="/resolve/") == [], "the Hub files were downloaded again"
    assert result.returncode == 1 and f"!!! [{BROKEN}] broken-q0f32: failed" in result.stderr
    for model_id in ITEMS[:BROKEN]:
        log = (out / ".batch" / f"item-{ITEMS.index(model_id)}.log").read_text()
        assert "✓ compile: unchanged inputs, kept from an earlier run" in log and "✓ compile done in" not in log, log[
            -2000:
        ]
    assert seconds < first_seconds / 3, (seconds, first_seconds)


def test_the_item_command_reads_the_index_a_kubernetes_pod_gets(batch_dir, first_run):
    # the pod's command (no --item: Kubernetes sets JOB_COMPLETION_INDEX), with the local runner's
    # mounts so that the finished item is recognised and resumed
    out, _, _ = first_run
    result = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}",
         "-e", "JOB_COMPLETION_INDEX=1", "-v", f"{batch_dir}:/batch:ro", "-v", f"{out}:/output",
         app_image(), "batch", "run", "/batch/models.toml", "--output", "/output"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"item 1 of {len(ITEMS)}: llama-q4f32_1" in result.stderr
    status = json.loads((out / ".batch" / "item-1.json").read_text())
    assert status["status"] == "ok" and status["model_id"] == "llama-q4f32_1" and status["seconds"] < 60


def container_of_run(run_id: str) -> str | None:
    """The running container the batch runner started for this run id (it passes it as an env variable)."""
    ids = subprocess.run(["docker", "ps", "-q", "--filter", f"ancestor={app_image()}"],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for container in ids:
        env = subprocess.run(["docker", "inspect", "--format", "{{json .Config.Env}}", container],
                             capture_output=True, text=True).stdout  # fmt: skip
        if f"LLM2WASM_BATCH_RUN_ID={run_id}" in json.loads(env or "[]"):
            return container
    return None


def test_a_rerun_after_a_killed_item_reports_it_failed_and_the_next_run_converts_it(batch_dir, first_run, hub,
                                                                                    tmp_path):  # fmt: skip
    # item 0 finished ok before (its record and complete bundle are kept); only its finished steps
    # are forgotten (the folder stays an llm2wasm bundle, so convert resumes it rather than refusing
    # a foreign folder), so this run converts it for a minute, long enough to kill it part-way
    out, _, _ = first_run
    again = tmp_path / "out"
    shutil.copytree(out, again, symlinks=True)
    state_path = again / ITEMS[0] / ".llm2wasm" / "state.json"
    state_path.write_text(json.dumps({**json.loads(state_path.read_text()), "steps": {}}))
    assert json.loads((again / ".batch" / "item-0.json").read_text())["status"] == "ok"
    command = [
        *INVOKE,
        "batch",
        str(batch_dir / "models.toml"),
        "-o",
        str(again),
        "--image",
        app_image(),
        "--jobs",
        "1",
    ]
    runner = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=batch_environment(hub)
    )
    try:
        deadline = time.monotonic() + 600
        killed = None
        while killed is None and time.monotonic() < deadline and runner.poll() is None:
            record = json.loads((again / ".batch" / "item-0.json").read_text())
            log = again / ".batch" / "item-0.log"
            # running, with this run's id, and into its steps: kill it as the OOM killer would
            if record["status"] == "running" and log.is_file() and "gen_config" in log.read_text():
                killed = container_of_run(record["run_id"])
                if killed:
                    subprocess.run(["docker", "kill", "--signal", "KILL", killed], check=True, capture_output=True)
            time.sleep(1)
        assert killed, "item 0's container was not found running"
        stdout, stderr = runner.communicate(timeout=1800)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 1, stdout + stderr
    assert f"!!! [0] {ITEMS[0]}: failed (exit 137; interrupted)" in stderr
    assert f"| 0 | {ITEMS[0]} | q0f32 | failed (interrupted) |" in stdout
    record = json.loads((again / ".batch" / "item-0.json").read_text())
    assert record["status"] == "failed" and record["exit_code"] == 137
    report = json.loads((again / "batch-report.json").read_text())
    assert [row["status"] for row in report["items"]] == ["failed"] + ["ok"] * (BROKEN - 1) + ["failed"]
    combined = json.loads((again / "app-config.json").read_text())["model_list"]
    assert ITEMS[0] not in [record["model_id"] for record in combined]
    # the next run converts it again, and now it is ok
    result = batch_task(str(batch_dir / "models.toml"), "-o", str(again), "--image", app_image(), "--jobs", "2",
                        hub=hub)  # fmt: skip
    assert result.returncode == 1 and f"<== [0] {ITEMS[0]}: done in" in result.stderr, result.stderr
    assert "✓ compile done in" in (again / ".batch" / "item-0.log").read_text()  # converted, not kept
    assert f"| 0 | {ITEMS[0]} | q0f32 | ok |" in result.stdout
    report = json.loads((again / "batch-report.json").read_text())
    assert [row["status"] for row in report["items"]] == ["ok"] * BROKEN + ["failed"]


def compile_record(bundle: Path) -> dict:
    return json.loads((bundle / ".llm2wasm" / "state.json").read_text())["steps"]["compile"]


def library_of(bundle: Path) -> bytes:
    (library,) = (bundle / "lib").glob("*.wasm")
    return library.read_bytes()


def test_the_second_fine_tune_reuses_the_first_ones_library(batch_dir, first_run):
    out, _, _ = first_run
    caches = [compile_record(out / model_id)["library_cache"] for model_id in FINE_TUNES]
    # one key: the same base shape and settings; at most one of them compiled, the other reused it
    # (both reuse when an earlier test of this session compiled that base)
    assert caches[0]["key"] == caches[1]["key"] and any(cache["hit"] for cache in caches), caches
    # (the reuse message is in the first run's item log, which the re-runs above replaced)
    assert library_of(out / FINE_TUNES[0]) == library_of(out / FINE_TUNES[1])
    # what was reused is the library only: each bundle holds its own merged weights
    shards = [
        sorted((out / model_id / "model" / "resolve" / "main").glob("params_shard_*.bin")) for model_id in FINE_TUNES
    ]
    assert shards[0] and [p.read_bytes() for p in shards[0]] != [p.read_bytes() for p in shards[1]]
    references = json.loads((batch_dir / "references.json").read_text())
    assert references[FINE_TUNES[0]]["reference_ids"] != references[FINE_TUNES[1]]["reference_ids"]


def test_the_bundles_generate_their_own_transformers_tokens_in_one_browser(batch_dir, first_run):
    """The plain model and both fine-tunes (one library), each against its own transformers reference."""
    if chromium_path() is None:
        pytest.fail("Debian's chromium is not installed: run `bash .ci/setup.sh` as root")
    out, _, _ = first_run
    references = json.loads((batch_dir / "references.json").read_text())
    prompts = {reference["prompt"] for reference in references.values()}
    assert len(prompts) == 1  # the browser-check prompt: one page script serves every bundle
    run = run_in_one_browser(prompts.pop(), STEPS, bundles=[out / model_id for model_id in references])
    assert not run.preview_errors and not run.page_errors, (run.preview_errors, run.page_errors)
    assert not run.webgpu_errors, "\n".join(run.webgpu_errors[:5])
    assert [result["tokenIds"] for result in run.results] == [r["reference_ids"] for r in references.values()]


def test_clean_shows_the_caches_size_and_empties_it(first_run, tmp_path):
    # a copy of the session's cache: the tests after this one reuse its libraries
    cache = tmp_path / "libraries"
    shutil.copytree(SHARED["LLM2WASM_LIB_CACHE"], cache)
    assert list(cache.glob("??/*"))
    result = invoke("clean", "--lib-cache", env={"LLM2WASM_LIB_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert f"library cache {cache}:" in result.stdout and "MiB; emptied" in result.stdout
    assert cache.is_dir() and not list(cache.glob("??/*"))
