"""`llm2wasm convert` and `llm2wasm selftest` in the hermetic app image (real torch, transformers, peft,
TVM; stand-in mlc_llm and emcc), and `invoke convert` on the host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from llm2wasm.run import ConvertJob, run_convert_job
from tests.conftest import app_image, invoke
from tests.unit.test_convert_bundle import MODEL_RECORD_FIELDS


def run_app(
    *args: str,
    mounts: dict[Path, str] | None = None,
    env: dict[str, str] | None = None,
    detach: bool = False,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    cmd = ["docker", "run", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}"]
    cmd += ["-d"] if detach else ["--rm"]
    for host_path, spec in (mounts or {}).items():
        cmd += ["-v", f"{host_path}:{spec}"]
    for key, value in (env or {}).items():
        cmd += ["-e", f"{key}={value}"]
    return subprocess.run([*cmd, app_image(), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def selftest(hermetic_chain, tmp_path_factory):
    keep = tmp_path_factory.mktemp("selftest")
    result = run_app("selftest", "--keep", "/keep/run", mounts={keep: "/keep"})
    return keep / "run", result


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_selftest_passes_with_a_real_peft_merge(selftest):
    _, result = selftest
    assert result.returncode == 0, result.stderr
    assert "ok: the adapter changes the base model's logits" in result.stderr
    assert "ok: merged logits equal base+adapter logits" in result.stderr
    assert "selftest passed" in result.stderr


def test_app_config_is_a_webllm_model_record(selftest):
    run, _ = selftest
    app = json.loads((run / "bundle" / "app-config.json").read_text())
    assert set(app) == {"model_list"} and len(app["model_list"]) == 1
    record = app["model_list"][0]
    assert set(record) <= MODEL_RECORD_FIELDS
    assert record["model"] == "http://localhost:8000/model/"
    assert record["model_id"] == "tiny-llama-lora-q4f16_1"
    assert record["model_lib"] == "http://localhost:8000/lib/tiny-llama-lora-q4f16_1.wasm"
    assert record["overrides"] == {"context_window_size": 256, "prefill_chunk_size": 128}
    assert record["required_features"] == ["shader-f16"]
    assert isinstance(record["vram_required_MB"], float) and isinstance(record["low_resource_required"], bool)
    assert "resolve/main/" in (run / "bundle" / "README.md").read_text()


@pytest.fixture(scope="module")
def plain_conversion(selftest, tmp_path_factory):
    """tiny-llama without adapter, model mounted read-only, stand-in calls recorded, steps slowed down."""
    run, _ = selftest
    work = tmp_path_factory.mktemp("plain")
    env = {"MLC_LLM_STANDIN_LOG": "/work/calls.jsonl", "MLC_LLM_STANDIN_DELAY": "2"}
    args = ("convert", "/model", "-q", "q4f16_1", "--conv-template", "llama-2", "-o", "/work/out")
    result = run_app(*args, mounts={run / "tiny-llama": "/model:ro", work: "/work"}, env=env)
    return work, run, args, env, result


def test_conversion_runs_the_mlc_steps_with_the_right_arguments(plain_conversion):
    work, run, _, _, result = plain_conversion
    assert result.returncode == 0, result.stderr
    started = {c["argv"][0]: c for c in calls(work / "calls.jsonl") if c["event"] == "start"}
    assert set(started) == {"gen_config", "convert_weight", "compile"}
    gen = started["gen_config"]["argv"]
    assert gen[gen.index("--quantization") + 1] == "q4f16_1" and gen[gen.index("--conv-template") + 1] == "llama-2"
    assert gen[1].endswith("/source/config.json")
    compile_args = started["compile"]["argv"]
    assert compile_args[compile_args.index("--device") + 1] == "webgpu"
    assert compile_args[compile_args.index("-o") + 1].endswith(".wasm")
    assert compile_args[1].endswith("mlc-chat-config.json")
    weights = started["convert_weight"]["argv"]
    assert weights[weights.index("--quantization") + 1] == "q4f16_1"
    # the read-only model folder was not written to (mlc_llm's index side effect went to the symlink view)
    assert not (run / "tiny-llama" / "model.safetensors.index.json").exists()
    assert "Bundle in /work/out" in result.stderr and "app-config.json" in result.stderr


def test_weight_conversion_and_compilation_overlap(plain_conversion):
    work = plain_conversion[0]
    events = calls(work / "calls.jsonl")
    span = {step: [e["time"] for e in events if e["argv"][0] == step] for step in ("convert_weight", "compile")}
    (weights_start, weights_end), (compile_start, compile_end) = span["convert_weight"], span["compile"]
    assert weights_start < compile_end and compile_start < weights_end, span


def test_rerun_skips_unchanged_steps(plain_conversion):
    work, run, args, env, _ = plain_conversion
    before = len(calls(work / "calls.jsonl"))
    result = run_app(*args, mounts={run / "tiny-llama": "/model:ro", work: "/work"}, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("unchanged inputs, kept from an earlier run") == 3
    assert len(calls(work / "calls.jsonl")) == before


def test_other_settings_need_force(plain_conversion):
    work, run, args, env, _ = plain_conversion
    other = [a if a != "q4f16_1" else "q4f32_1" for a in args]
    mounts = {run / "tiny-llama": "/model:ro", work: "/work"}
    refused = run_app(*other, mounts=mounts, env=env)
    assert refused.returncode == 2
    assert "holds a bundle converted with other settings (quantization)" in refused.stderr
    forced = run_app(*other, "--force", "--model-id", "tiny-f32", mounts=mounts)
    assert forced.returncode == 0, forced.stderr
    record = json.loads((work / "out" / "app-config.json").read_text())["model_list"][0]
    assert "required_features" not in record  # q4f32_1 needs no shader-f16
    assert sorted(path.name for path in (work / "out" / "lib").iterdir()) == ["tiny-f32.wasm"]  # old one gone


def test_resume_after_a_killed_run(selftest, tmp_path):
    run, _ = selftest
    args = ("convert", "/model", "-q", "q4f16_1", "--conv-template", "llama-2", "-o", "/work/out")
    mounts = {run / "tiny-llama": "/model:ro", tmp_path: "/work"}
    started = run_app(*args, mounts=mounts, env={"MLC_LLM_STANDIN_DELAY": "60"}, detach=True)
    container = started.stdout.strip()
    state = tmp_path / "out" / ".llm2wasm" / "state.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if state.exists() and "gen_config" in json.loads(state.read_text() or "{}").get("steps", {}):
                break
            time.sleep(0.5)
        else:
            pytest.fail("gen_config never finished")
        time.sleep(1)
    finally:
        subprocess.run(["docker", "kill", container], capture_output=True)
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
    assert not (tmp_path / "out" / "app-config.json").exists()
    resumed = run_app(*args, mounts=mounts)
    assert resumed.returncode == 0, resumed.stderr
    assert "✓ gen_config: unchanged inputs, kept from an earlier run" in resumed.stderr
    assert "✓ convert_weight done" in resumed.stderr and "✓ compile done" in resumed.stderr
    assert not list((tmp_path / "out" / ".llm2wasm").glob("tmp-*"))
    assert (tmp_path / "out" / "lib" / "out.wasm").read_bytes()[:4] == b"\0asm"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["-q", "q4bf16_1"], "quantization 'q4bf16_1' is not for WebGPU"),
        (["-q", "q4f16_1", "--conv-template", "nope"], "unknown conversation template 'nope'"),
        (["-q", "q4f16_1", "--adapter", "/model"], "adapter_config.json not found"),
    ],
)
def test_bad_input_in_the_image_exits_2_and_writes_nothing(selftest, tmp_path, extra, message):
    run, _ = selftest
    result = run_app(
        "convert", "/model", *extra, "-o", "/work/out", mounts={run / "tiny-llama": "/model:ro", tmp_path: "/work"}
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_invoke_convert_on_the_host(selftest, tmp_path):
    run, _ = selftest
    out = tmp_path / "bundle"
    result = invoke(
        "convert",
        str(run / "tiny-llama"),
        "-q",
        "q4f16_1",
        "-o",
        str(out),
        "--adapter",
        str(run / "tiny-lora"),
        "--conv-template",
        "llama-2",
        "--profile",
        "hermetic",
    )
    assert result.returncode == 0, result.stderr
    assert "on the CPU: Docker has no NVIDIA runtime" in result.stderr
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.name == "app-config.json" for path in files)
    assert {path.stat().st_uid for path in files} == {os.getuid()}


def test_invoke_convert_output_owned_by_the_given_user(selftest, tmp_path):
    run, _ = selftest
    model = tmp_path / "model"
    shutil.copytree(run / "tiny-llama", model)
    for path in [model, *model.iterdir()]:
        os.chown(path, 12345, 12345)  # the user's own model (safetensors are written 0600)
    out = tmp_path / "bundle"
    out.mkdir()
    os.chown(out, 12345, 12345)
    job = ConvertJob(
        image=app_image(),
        model_dir=model,
        output=out,
        quantization="q4f32_1",
        options=["--conv-template", "llama-2"],
        user="12345:12345",
        gpu=False,
    )
    assert run_convert_job(job) == 0
    owners = {(path.lstat().st_uid, path.lstat().st_gid) for path in out.rglob("*")}
    assert owners == {(12345, 12345)}


@pytest.mark.parametrize("model_exists", [False, True])
def test_invoke_convert_bad_input_leaves_nothing(selftest, tmp_path, model_exists):
    run, _ = selftest
    out = tmp_path / "never"
    model = run / "tiny-llama" if model_exists else tmp_path / "missing"
    result = invoke("convert", str(model), "-q", "q9f16", "-o", str(out), "--profile", "hermetic")
    assert result.returncode == 2, result.stderr
    assert ("unknown quantization 'q9f16'" if model_exists else "has no config.json") in result.stderr
    assert not out.exists()
