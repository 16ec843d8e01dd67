"""`llm2wasm convert` and `llm2wasm selftest` in the hermetic app image, and `invoke convert` on the
host. Everything here is real: torch, transformers, peft, the mlc_llm Python package (mlc-llm
79d603f0 on apache-tvm 0.26.0), the TVM and mlc-llm web runtimes built from source, and Debian's
emscripten; each conversion makes a real WebGPU model library."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from llm2wasm.host.run import ConvertJob, run_convert_job
from llm2wasm.image.convert.wasm_lib import inspect_library
from tests.conftest import app_image, invoke, run_app, shared_library_cache
from tests.unit.test_convert_bundle import MODEL_RECORD_FIELDS

# the session's library cache, for conversions whose compile is not what they test
SHARED_LIBRARIES = {"LLM2WASM_LIB_CACHE": str(shared_library_cache())}


@pytest.fixture(scope="module")
def selftest(selftest_on_demand):
    """What the session's `invoke verify --selftest --keep` made (tests/conftest.py), and its output."""
    assert selftest_on_demand.result.returncode == 0, selftest_on_demand.result.stdout + selftest_on_demand.log
    return selftest_on_demand.run, selftest_on_demand.log


def test_selftest_passes_with_a_real_peft_merge(selftest):
    _, log = selftest
    assert "ok: the adapter changes the base model's logits" in log
    assert "ok: merged logits equal base+adapter logits" in log
    assert "selftest passed" in log


def test_selftest_makes_a_real_model_library(selftest):
    run, log = selftest
    for claim in (
        "it imports TVM's FFI callbacks from WebLLM's runtime",
        "WGSL compute kernels, paged-KV attention among them",
        "tensor-cache.json lists all",
        "compile's memory figures reach the app config",
    ):
        assert any(line.strip().startswith("ok: ") and claim in line for line in log.splitlines()), claim
    facts = inspect_library(run / "bundle" / "lib" / "tiny-llama-lora-q4f32_1.wasm")
    assert facts.size > 1_000_000 and len(facts.kernels) >= 20
    assert "env.TVMFFIWasmSafeCall" in facts.imports


def test_app_config_is_a_webllm_model_record(selftest):
    run, _ = selftest
    app = json.loads((run / "bundle" / "app-config.json").read_text())
    assert set(app) == {"model_list"} and len(app["model_list"]) == 1
    record = app["model_list"][0]
    assert set(record) <= MODEL_RECORD_FIELDS
    assert record["model"] == "http://localhost:8000/model/"
    assert record["model_id"] == "tiny-llama-lora-q4f32_1"
    assert record["model_lib"] == "http://localhost:8000/lib/tiny-llama-lora-q4f32_1.wasm"
    # only WebLLM ChatOptions fields: the prefill chunk size is compiled into the library
    assert record["overrides"] == {"context_window_size": 256}
    assert "required_features" not in record
    assert isinstance(record["vram_required_MB"], float) and isinstance(record["low_resource_required"], bool)
    assert "resolve/main/" in (run / "bundle" / "README.md").read_text()


def step_command(out: Path, step: str) -> list[str]:
    """The command a step ran, as its log's first line records it."""
    first = (out / ".llm2wasm" / "logs" / f"{step}.log").read_text().splitlines()[0]
    assert first.startswith("$ "), first
    return first[2:].split()


def steps(out: Path) -> dict:
    return json.loads((out / ".llm2wasm" / "state.json").read_text())["steps"]


@pytest.fixture(scope="module")
def plain_conversion(selftest, tmp_path_factory):
    """tiny-llama without adapter to q0f32, model mounted read-only."""
    run, _ = selftest
    work = tmp_path_factory.mktemp("plain")
    args = ("convert", "/model", "-q", "q0f32", "--conv-template", "llama-2", "-o", "/work/out")
    result = run_app(*args, mounts={run / "tiny-llama": "/model:ro", work: "/work"})
    return work, run, args, result


def test_conversion_runs_the_mlc_steps_with_the_right_arguments(plain_conversion):
    work, run, _, result = plain_conversion
    assert result.returncode == 0, result.stderr
    out = work / "out"
    assert set(steps(out)) == {"gen_config", "convert_weight", "compile"}
    gen = step_command(out, "gen_config")
    assert gen[1:4] == ["-m", "mlc_llm", "gen_config"]
    assert gen[gen.index("--quantization") + 1] == "q0f32" and gen[gen.index("--conv-template") + 1] == "llama-2"
    assert gen[4].endswith("/source/config.json")
    compile_args = step_command(out, "compile")
    assert compile_args[compile_args.index("--device") + 1] == "webgpu"
    assert compile_args[compile_args.index("-o") + 1].endswith(".wasm")
    assert compile_args[4].endswith("mlc-chat-config.json")
    weights = step_command(out, "convert_weight")
    assert weights[weights.index("--quantization") + 1] == "q0f32"
    # real mlc_llm logged what it made
    assert "Generated:" in (out / ".llm2wasm" / "logs" / "compile.log").read_text()
    assert "tensor-cache.json" in (out / ".llm2wasm" / "logs" / "convert_weight.log").read_text()
    # the read-only model folder was not written to (mlc_llm's index side effect went to the symlink view)
    assert not (run / "tiny-llama" / "model.safetensors.index.json").exists()
    assert "Bundle in /work/out" in result.stderr and "app-config.json" in result.stderr
    assert "q0f32 computes in float32 with bf16-rounded weights" in result.stderr  # the user is told


def test_q0f32_bundle_is_complete(plain_conversion):
    work = plain_conversion[0]
    weights = work / "out" / "model" / "resolve" / "main"
    cache = json.loads((weights / "tensor-cache.json").read_text())
    for shard in cache["records"]:
        assert (weights / shard["dataPath"]).stat().st_size == shard["nbytes"]
    names = {record["name"] for shard in cache["records"] for record in shard["records"]}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names  # q0: unquantized names
    facts = inspect_library(work / "out" / "lib" / "out.wasm")
    assert facts.size > 1_000_000 and facts.kernels


# The browser tests' transformers reference against what the q0f32 bundle really stores.
STORED_WEIGHTS = """
import json, numpy, torch, tvm
from tvm.contrib import tvmjs
from transformers import AutoModelForCausalLM
from llm2wasm.image.convert.reference import round_as_f32_bundle_stores
stored, _ = tvmjs.load_tensor_cache("/work/out/model/resolve/main", tvm.cpu())
model = AutoModelForCausalLM.from_pretrained("/model", dtype=torch.float32)
source = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
round_as_f32_bundle_stores(model)
rounded = dict((name, p.detach().numpy()) for name, p in model.named_parameters())
names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.self_attn.o_proj.weight"]
print(json.dumps({n: [float(numpy.abs(stored[n].numpy() - x[n]).max()) for x in (rounded, source)] for n in names}))
"""


def test_the_reference_computes_with_the_weights_the_bundle_holds(plain_conversion):
    """mlc_llm stores an f32 bundle's float32 tensors as bfloat16 (TVM's "f32-to-bf16" tensor-cache
    encoding): the browser tests' transformers reference rounds its weights the same way, bit for
    bit, and that rounding is not a no-op on these weights."""
    work, run, _, result = plain_conversion
    assert result.returncode == 0, result.stderr
    compared = run_app(
        "-c",
        STORED_WEIGHTS,
        mounts={run / "tiny-llama": "/model:ro", work: "/work:ro"},
        entrypoint="python",
        timeout=300,
    )
    assert compared.returncode == 0, compared.stderr
    differences = json.loads(compared.stdout.strip().splitlines()[-1])
    assert all(vs_rounded == 0.0 for vs_rounded, _ in differences.values()), differences
    assert any(vs_source > 0.0 for _, vs_source in differences.values()), differences


# The q4f32_1 reference against what the selftest's q4f32_1 bundle really stores: every weight
# decoded as mlc_llm's _dequantize reads it (8 int4 per uint32, lowest bits first; (q - 7) * scale).
QUANTIZED_WEIGHTS = """
import json, numpy, torch, tvm
from tvm.contrib import tvmjs
from transformers import AutoModelForCausalLM
from llm2wasm.image.convert.reference import as_bundle_holds
stored, _ = tvmjs.load_tensor_cache("/selftest/bundle/model/resolve/main", tvm.cpu())
model = AutoModelForCausalLM.from_pretrained("/selftest/bundle/.llm2wasm/merge/model", dtype=torch.float32)
as_bundle_holds(model, "q4f32_1")
held = dict((name, p.detach().numpy()) for name, p in model.named_parameters())
def decoded(prefix):
    packed, scale = stored[prefix + ".q_weight"].numpy(), stored[prefix + ".q_scale"].numpy()
    q = numpy.stack([(packed >> (4 * i)) & 0xF for i in range(8)], axis=-1).reshape(packed.shape[0], -1)
    return (q.astype("float32") - 7) * numpy.repeat(scale, 32, axis=1)
differences, compared = {}, 0
for name in stored:
    if not name.endswith(".q_weight"):
        continue
    prefix = name[: -len(".q_weight")]
    if prefix.endswith("qkv_proj"):
        source = numpy.concatenate([held[prefix.replace("qkv_proj", x + "_proj") + ".weight"] for x in "qkv"])
    elif prefix.endswith("gate_up_proj"):
        parts = [prefix.replace("gate_up_proj", x) + ".weight" for x in ("gate_proj", "up_proj")]
        source = numpy.concatenate([held[part] for part in parts])
    else:
        source = held[prefix + ".weight"]
    differences[prefix] = int((decoded(prefix) != source).sum())
    compared += source.size
print(json.dumps({"differences": differences, "compared": compared}))
"""


def test_the_q4f32_reference_computes_with_the_weights_the_bundle_holds(selftest):
    """q4f32_1: the reference's weights (as_bundle_holds: mlc_llm's group quantization emulated,
    its scales bf16 as stored) equal, value for value, what the selftest's real q4f32_1 bundle
    stores for every quantized layer: the fused attention and MLP projections, the output head
    and the embedding."""
    run, _ = selftest
    compared = run_app("-c", QUANTIZED_WEIGHTS, mounts={run: "/selftest:ro"}, entrypoint="python", timeout=300)
    assert compared.returncode == 0, compared.stderr
    found = json.loads(compared.stdout.strip().splitlines()[-1])
    quantized = found["differences"]
    assert {"lm_head", "model.embed_tokens"} <= set(quantized) and any("qkv_proj" in n for n in quantized), quantized
    assert found["compared"] > 10_000 and not any(quantized.values()), found


def test_weight_conversion_and_compilation_overlap(plain_conversion):
    record = steps(plain_conversion[0] / "out")
    weights, compile_ = record["convert_weight"], record["compile"]
    assert weights["started"] < compile_["finished"] and compile_["started"] < weights["finished"], record


def test_rerun_skips_unchanged_steps(plain_conversion):
    work, run, args, _ = plain_conversion
    before = steps(work / "out")
    result = run_app(*args, mounts={run / "tiny-llama": "/model:ro", work: "/work"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("unchanged inputs, kept from an earlier run") == 3
    assert steps(work / "out") == before


def test_steps_record_the_tools_that_made_them(plain_conversion):
    """What a re-run with a newer image compares (llm2wasm.image.convert.toolchain), read off the real image."""
    record = steps(plain_conversion[0] / "out")
    tools = record["compile"]["tools"]
    assert tools["tvm"] == "apache-tvm 0.26.0" and tools["mlc_llm"].startswith("mlc-llm "), tools
    assert tools["emcc"].startswith("3.1.6 "), tools  # Debian's emscripten
    assert re.fullmatch("MLC_LLM_COMMIT=[0-9a-f]{40} TVM_COMMIT=[0-9a-f]{40}", tools["web_runtime"]), tools
    assert re.fullmatch(r"0\.1\.0 \([0-9a-f]{12}\)", tools["llm2wasm"]), tools
    assert record["convert_weight"]["tools"]["torch"].startswith("torch "), record["convert_weight"]
    assert "emcc" not in record["convert_weight"]["tools"]


def test_other_settings_need_force(plain_conversion, tmp_path):
    work, run, args, _ = plain_conversion
    # a copy: the q0f32 bundle stays as it is for the tests that use it
    shutil.copytree(work / "out", tmp_path / "out", symlinks=True)
    other = [a if a != "q0f32" else "q4f32_1" for a in args]
    mounts = {run / "tiny-llama": "/model:ro", tmp_path: "/work"}
    refused = run_app(*other, mounts=mounts)
    assert refused.returncode == 2
    assert "holds a bundle converted with other settings (quantization)" in refused.stderr
    # into the session's library cache: test_invoke_convert_on_the_host reuses this library
    forced = run_app(*other, "--force", "--model-id", "tiny-f32", mounts=mounts, library_cache=shared_library_cache())
    assert forced.returncode == 0, forced.stderr
    record = json.loads((tmp_path / "out" / "app-config.json").read_text())["model_list"][0]
    assert record["model_id"] == "tiny-f32"
    assert sorted(path.name for path in (tmp_path / "out" / "lib").iterdir()) == ["tiny-f32.wasm"]  # old one gone


def test_resume_after_a_killed_run(selftest, tmp_path):
    run, _ = selftest
    args = ("convert", "/model", "-q", "q4f32_1", "--conv-template", "llama-2", "-o", "/work/out")
    mounts = {run / "tiny-llama": "/model:ro", tmp_path: "/work"}
    started = run_app(*args, mounts=mounts, detach=True)
    container = started.stdout.strip()
    state = tmp_path / "out" / ".llm2wasm" / "state.json"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the real compile takes a minute: killed while it runs
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
    assert "✓ compile done" in resumed.stderr
    assert not list((tmp_path / "out" / ".llm2wasm").glob("tmp-*"))
    assert (tmp_path / "out" / "lib" / "out.wasm").read_bytes()[:4] == b"\0asm"


def test_a_model_type_nothing_knows_is_refused_before_any_step(selftest, tmp_path):
    run, _ = selftest
    model = tmp_path / "model"
    shutil.copytree(run / "tiny-llama", model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "llama-from-the-future"
    (model / "config.json").write_text(json.dumps(config))
    result = run_app("convert", "/model", "-q", "q4f32_1", "--conv-template", "llama-2", "-o", "/work/out",
                     mounts={model: "/model:ro", tmp_path: "/work"})  # fmt: skip
    assert result.returncode == 2, result.stderr
    # the architecture is named first, before any template or transformers question (issue 29)
    assert "the installed mlc_llm cannot convert model_type 'llama-from-the-future'" in result.stderr
    assert "llama" in result.stderr.split("it converts", 1)[1] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_head_mlc_llm_would_drop_is_refused_before_any_step(selftest, tmp_path):
    """An untied Starcoder2 (its own lm_head.weight): the installed mlc_llm's loader would take the
    embeddings for the head and compute another model, so convert refuses it, exit 2, nothing written."""
    made = run_app(
        "-c",
        "from pathlib import Path; from llm2wasm.image.convert.tiny import make_tiny_model; "
        "make_tiny_model(Path('/work/model'), 'starcoder2', vocab_size=15)",
        mounts={tmp_path: "/work"},
        entrypoint="python",
    )
    assert made.returncode == 0, made.stderr
    result = run_app("convert", "/work/model", "-q", "q0f32", "--conv-template", "chatml", "-o", "/work/out",
                     mounts={tmp_path: "/work"})  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "lm_head.weight" in result.stderr and "uses the input embeddings as the output head" in result.stderr
    assert not (tmp_path / "out").exists()


def test_real_compile_failure_is_a_failed_step_with_the_log_tail(selftest, tmp_path):
    """mlc_llm's own error surfaces as a failed step with its log tail, exit status 1: here its
    LlamaConfig rejects a pipeline_parallel_stages above the layer count (transformers ignores it)."""
    run, _ = selftest
    model = tmp_path / "model"
    shutil.copytree(run / "tiny-llama", model)
    config = json.loads((model / "config.json").read_text())
    config["pipeline_parallel_stages"] = 99
    (model / "config.json").write_text(json.dumps(config))
    result = run_app(
        "convert",
        "/model",
        "-q",
        "q4f32_1",
        "--conv-template",
        "llama-2",
        "-o",
        "/work/out",
        mounts={model: "/model:ro", tmp_path: "/work"},
    )
    assert result.returncode == 1, result.stderr
    assert "step gen_config failed; last lines of" in result.stderr
    assert 'Invalid "pipeline_parallel_stages" value (99)' in result.stderr  # mlc_llm's own, from the log tail
    assert "finished steps are kept" in result.stderr


def test_a_container_too_small_for_the_conversion_is_refused_before_any_step(selftest, tmp_path):
    """The memory check reads the real container's cgroup limit: 1 GB holds less than the estimate
    for this tiny model with an adapter (the processes' own memory), so it stops before any step, exit 2,
    with both figures and nothing written (the flag that skips the check: tests/unit/test_memory_check.py)."""
    run, _ = selftest
    mounts = {run / "tiny-llama": "/model:ro", run / "tiny-lora": "/adapter:ro", tmp_path: "/work"}
    args = ("convert", "/model", "--adapter", "/adapter", "-q", "q4f32_1", "--conv-template", "llama-2")
    refused = run_app(*args, "-o", "/work/out", mounts=mounts, memory="1g")
    assert refused.returncode == 2, refused.stderr
    assert "1.1 GB is available (the container's memory limit, cgroup" in refused.stderr, refused.stderr
    assert "this conversion needs about" in refused.stderr and "--skip-memory-check" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["-q", "q4bf16_1"], "quantization 'q4bf16_1' is not for WebGPU"),
        (["-q", "q4f32_1", "--conv-template", "nope"], "unknown conversation template 'nope'"),
        (["-q", "q4f32_1", "--adapter", "/model"], "adapter_config.json not found"),
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
        "q4f32_1",
        "-o",
        str(out),
        "--adapter",
        str(run / "tiny-lora"),
        "--conv-template",
        "llama-2",
        "--profile",
        "hermetic",
        env=SHARED_LIBRARIES,
    )
    assert result.returncode == 0, result.stderr
    assert "on the CPU: Docker has no NVIDIA runtime" in result.stderr
    # the library of this shape and these settings was compiled before in this session
    # (test_other_settings_need_force): reused, and no message names the container's mount point
    # (reused after test_other_settings_need_force; filed when this test runs alone)
    assert "library: reused from the library cache (key " in result.stderr or (
        "library: filed in the library cache (key " in result.stderr
    ), result.stderr[-3000:]
    assert "/cache/libraries" not in result.stderr
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.name == "app-config.json" for path in files)
    assert {path.stat().st_uid for path in files} == {os.getuid()}
    # named after the host folder, not the container's mount point; messages name host paths
    record = json.loads((out / "app-config.json").read_text())["model_list"][0]
    assert record["model_id"] == "bundle" and (out / "lib" / "bundle.wasm").is_file()
    assert "cd bundle" in (out / "README.md").read_text()
    assert f"Bundle in {out}" in result.stderr and "/output" not in result.stderr


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
    assert ("unknown quantization 'q9f16'" if model_exists else "missing does not exist: give a model folder") in (
        result.stderr
    )
    assert not out.exists()
