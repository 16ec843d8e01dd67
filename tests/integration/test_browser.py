"""A bundle made by the real hermetic chain runs in the real WebLLM in a real browser, and generates
the tokens transformers generates.

The model is a tiny Llama made decisive (llm2wasm.image.convert.checkmodels.make_browser_check_model): its
vocabulary is exactly the tokenizer's, its output head is scaled so the greedy token beats the
runner-up by at least one logit at every step (float32 on SwiftShader differs from the CPU by about
1e-4), and its continuation holds three or more different tokens and no end of sequence. It is
converted to q0f32 in the hermetic app image (real mlc_llm, apache-tvm 0.26.0, Debian's emscripten),
served by `llm2wasm preview` in the image, and opened in Debian's headless Chromium (WebGPU on the
CPU), driven by Playwright's Python client (no browser download). WebLLM's greedy token ids must
equal transformers' greedy ids from the same weights. Any request off 127.0.0.1 and any WebGPU
error in the console fail the test. The screenshot and timings are kept in test-artifacts/.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from llm2wasm.host.browser import BrowserRun
from tests.browser import chromium_path, free_port, run_preview_page, start_preview
from tests.conftest import INVOKE, ROOT, invoke, run_app

ARTIFACTS = Path(os.environ.get("LLM2WASM_TEST_ARTIFACTS", ROOT / "test-artifacts"))
STEPS = 8


@pytest.fixture(scope="module")
def browser_check(hermetic_chain, tmp_path_factory):
    """`invoke browser-check` as the publish workflow runs it, against the hermetic app image."""
    if chromium_path() is None:
        pytest.fail("Debian's chromium is not installed: run `bash .ci/setup.sh` as root")
    work = tmp_path_factory.mktemp("browser")
    summary = work / "summary.md"
    result = invoke(
        "browser-check", "--profile", "hermetic", "--keep", str(work / "run"), "--summary", str(summary),
        "--screenshot", str(ARTIFACTS / "browser" / "preview.png"),
    )  # fmt: skip
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if (work / "run" / "run.json").exists():
        shutil.copyfile(work / "run" / "run.json", ARTIFACTS / "browser" / "run.json")
    return result, work / "run", summary


@pytest.fixture(scope="module")
def browser_bundle(browser_check):
    _, work, _ = browser_check
    reference = json.loads((work / "reference.json").read_text())
    return work, reference, (work / "convert.log").read_text()


@pytest.fixture(scope="module")
def webllm_run(browser_check):
    _, work, _ = browser_check
    record = json.loads((work / "run.json").read_text())
    return BrowserRun(**{k: v for k, v in record.items() if k != "reference"}), record["reference"]


def test_browser_check_passes_and_writes_the_job_summary(browser_check):
    result, _, summary = browser_check
    assert result.returncode == 0, result.stdout + result.stderr
    text = summary.read_text()
    assert text.startswith("## llm2wasm browser check: passed")
    # apache-tvm 0.26.0's read_write defect: the repair was needed, and the summary says so
    assert "- WGSL repair: needed: " in text and "batch_prefill_ragged_kv_kernel" in text


def test_the_reference_is_decisive(browser_bundle):
    _, reference, _ = browser_bundle
    assert reference["min_margin"] >= 1.0 and len(set(reference["reference_ids"])) >= 3


def test_the_bundle_computes_the_transformers_5_llama(browser_bundle):
    """The model is saved by the image's transformers 5 (`rope_parameters`, rope base 50000, no
    top-level `rope_theta`): mlc_llm alone would compile it with the default base 10000."""
    work, _, converted = browser_bundle
    config = json.loads((work / "model" / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 50000.0
    chat_config = json.loads((work / "bundle" / "model" / "resolve" / "main" / "mlc-chat-config.json").read_text())
    assert chat_config["model_config"]["position_embedding_base"] == 50000.0
    assert chat_config["model_config"]["num_key_value_heads"] == 2
    assert "rope_theta = 50000.0" in converted


def test_conversion_repaired_the_read_write_defect(browser_bundle):
    _, _, converted = browser_bundle
    assert "kernel(s) repaired (never-written buffers read-only)" in converted


def test_webllm_loads_the_bundle_and_generates_transformers_tokens(webllm_run):
    run, reference = webllm_run
    assert not run.preview_errors, run.preview_errors
    assert not run.page_errors, run.page_errors
    (result,) = run.results
    assert result["tokenIds"] == reference["reference_ids"], (result, reference)
    assert result["text"].strip()


def test_no_webgpu_errors_in_the_console(webllm_run):
    run, _ = webllm_run
    assert not run.webgpu_errors, "\n".join(run.webgpu_errors[:5])


def test_no_request_leaves_127_0_0_1(webllm_run):
    run, _ = webllm_run
    assert not run.foreign_requests, run.foreign_requests


def test_screenshot_kept(webllm_run):
    assert (ARTIFACTS / "browser" / "preview.png").stat().st_size > 10_000


def test_a_load_whose_connection_fails_is_tried_again_while_containers_come_and_go(browser_bundle):
    """Chrome fails a fetch with net::ERR_NETWORK_CHANGED when a network interface comes or goes
    during it, as Docker's veth pairs do whenever a container with a network starts or stops (one
    such run lost a matrix row's .wasm). The page loads again and says so. Here: containers with a
    network start and stop beside the page for its whole load, and the first .wasm request is failed
    as a reset connection, so at least one retry is certain."""
    import threading

    work, reference, _ = browser_bundle
    stop = threading.Event()
    started = []

    def churn():  # bounded: at most 40 containers, and only while the page loads
        while not stop.is_set() and len(started) < 40:
            subprocess.run(["docker", "run", "--rm", "--entrypoint", "true", "llm2wasm:app-hermetic"],
                           capture_output=True, timeout=60)  # fmt: skip
            started.append(time.monotonic())

    url, name = start_preview(work / "bundle")
    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:
        run = run_preview_page(url, reference["prompt"], STEPS, drop_first=(".wasm",))
    finally:
        stop.set()
        churner.join(timeout=90)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert len(run.dropped) == 1 and run.dropped[0].endswith(".wasm")
    assert any("loading the model: the connection failed" in note for note in run.retries), run.retries
    assert not run.preview_errors and not run.page_errors, (run.preview_errors, run.page_errors)
    assert started, "no container started beside the page"
    (result,) = run.results
    assert result["tokenIds"] == reference["reference_ids"], (result, reference)


def test_without_the_repair_validation_and_the_browser_fail(browser_bundle, tmp_path):
    """The library as compiled (kept beside the repaired one): the validator rejects it, and in the
    browser it loads, "answers" with other tokens, and only the console shows WebGPU errors."""
    work, reference, _ = browser_bundle
    broken = tmp_path / "bundle"
    shutil.copytree(work / "bundle", broken, symlinks=True)
    compiled = broken / ".llm2wasm" / "compile" / "tiny-q0f32.as-compiled.wasm"
    shutil.copyfile(compiled, broken / "lib" / "tiny-q0f32.wasm")
    check = run_app(
        "-m", "llm2wasm.image.convert.wgsl", "/b/lib/tiny-q0f32.wasm", "--no-repair",
        mounts={broken: "/b:ro"}, entrypoint="python", timeout=300,
    )  # fmt: skip
    assert check.returncode == 1, check.stdout + check.stderr
    assert "INVALID batch_prefill_ragged_kv_kernel" in check.stdout
    assert "must only be called from uniform control flow" in check.stdout
    url, name = start_preview(broken)
    try:
        run = run_preview_page(url, reference["prompt"], STEPS)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert run.webgpu_errors, "the unrepaired library ran without WebGPU errors"
    assert run.results and run.results[0]["tokenIds"] != reference["reference_ids"]


def test_preview_bad_input_exits_2_naming_the_problem(browser_bundle, tmp_path):
    work, _, _ = browser_bundle
    not_a_bundle = invoke("preview", str(tmp_path), "--profile", "hermetic")
    assert not_a_bundle.returncode == 2 and "app-config.json not found" in not_a_bundle.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = invoke("preview", str(work / "bundle"), "--profile", "hermetic", "--port", str(port))
    assert busy.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in busy.stderr
    missing = tmp_path / "missing-lib"
    shutil.copytree(work / "bundle", missing, symlinks=True)
    (missing / "lib" / "tiny-q0f32.wasm").unlink()
    in_image = run_app("preview", "/b", mounts={missing: "/b:ro"})
    assert in_image.returncode == 2 and "lib/tiny-q0f32.wasm not found" in in_image.stderr


def test_invoke_preview_serves_the_bundle_and_stops_with_its_server(browser_bundle):
    """`invoke preview` as a user runs it: the page on 127.0.0.1:PORT, and terminating the task
    removes its container (killing only the docker client would leave the server running)."""
    work, _, _ = browser_bundle
    port = free_port()
    task = subprocess.Popen(
        [*INVOKE, "preview", str(work / "bundle"), "--profile", "hermetic", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, info = time.monotonic() + 60, None
        while time.monotonic() < deadline and info is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/preview-info.json", timeout=2) as response:
                    info = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert info is not None, "invoke preview did not answer within 60 s"
        assert info["model_id"] == "tiny-q0f32" and info["served_base"] == f"http://127.0.0.1:{port}/"
    finally:
        task.terminate()
        output = task.communicate(timeout=60)[0]
    assert f"on http://127.0.0.1:{port}/" in output
    left = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"name=llm2wasm-preview-{port}"], capture_output=True, text=True
    )
    assert left.stdout.strip() == "", "the preview container outlived invoke preview"
