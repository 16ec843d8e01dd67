"""`convert` refuses early when the machine (or the container's limit) cannot hold what the chosen path
needs: what is available (cgroup v2, v1, MemAvailable), the estimate from safetensors headers (never
the tensors: the files here are sparse, their data never written), the refusal (exit 2, both figures,
nothing written), --skip-memory-check, and hostile headers refused without a crash or a big allocation."""

from __future__ import annotations

import argparse
import json
import math
import struct
import tracemalloc
from pathlib import Path

import pytest

from llm2wasm.errors import UsageError, exit_status
from llm2wasm.image.convert import memory, pipeline
from llm2wasm.image.convert.inputfiles import select_adapter_files, select_model_files
from llm2wasm.image.convert.inputs import ConvertRequest
from llm2wasm.image.convert.memory import (
    COMPILE_BASE,
    CONVERT_WEIGHT_BASE,
    CONVERTER_BASE,
    GB,
    MARGIN,
    MEASURED_EXTRA_BYTES,
    TORCH_BASE,
    Available,
    available_memory,
    cgroup_limit,
    check_memory,
    estimate,
    read_tensors,
)
from llm2wasm.image.convert.mlc import MlcNames

BASES = CONVERTER_BASE + CONVERT_WEIGHT_BASE + COMPILE_BASE
NAMES = MlcNames(quantizations=("q0f16", "q0f32", "q4f16_1", "q4f32_1"), conv_templates=("llama-3",))
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}


def safetensors(path: Path, tensors: dict[str, list[int]], dtype: str = "BF16") -> None:
    """A safetensors file whose header declares `tensors`, its data section sparse (never written)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)


def llama(root: Path, layers=2, hidden=4096, inter=14336, vocab=128256, kv=1024) -> dict[str, list[int]]:
    root.mkdir(parents=True)
    tensors = {
        "model.embed_tokens.weight": [vocab, hidden],
        "model.norm.weight": [hidden],
        "lm_head.weight": [vocab, hidden],
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "self_attn.q_proj.weight": [hidden, hidden], p + "self_attn.k_proj.weight": [kv, hidden],
            p + "self_attn.v_proj.weight": [kv, hidden], p + "self_attn.o_proj.weight": [hidden, hidden],
            p + "mlp.gate_proj.weight": [inter, hidden], p + "mlp.up_proj.weight": [inter, hidden],
            p + "mlp.down_proj.weight": [hidden, inter], p + "input_layernorm.weight": [hidden],
        }  # fmt: skip
    safetensors(root / "model.safetensors", tensors)
    config = {"model_type": "llama", "torch_dtype": "bfloat16", "tie_word_embeddings": False, "vocab_size": vocab}
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer.json").write_text("{}")
    return tensors


def lora(root: Path, base: dict[str, list[int]], targets: set[str], r: int = 16, **config) -> Path:
    root.mkdir(parents=True)
    tensors = {}
    for name, shape in base.items():
        module = name.removesuffix(".weight")
        if len(shape) == 2 and module.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{module}.lora_A.weight"] = [r, shape[1]]
            tensors[f"base_model.model.{module}.lora_B.weight"] = [shape[0], r]
    safetensors(root / "adapter_model.safetensors", tensors, "F32")
    settings = {"peft_type": "LORA", "r": r, "lora_alpha": 32, "target_modules": sorted(targets), **config}
    (root / "adapter_config.json").write_text(json.dumps(settings))
    return root


def request(model: Path, adapter: Path | None = None, **fields) -> ConvertRequest:
    return ConvertRequest(
        model_dir=model,
        quantization=fields.pop("quantization", "q4f16_1"),
        conv_template="llama-3",
        output=model.parent / "out",
        model_id="out",
        adapter=adapter,
        model_files=select_model_files(model),
        adapter_files=select_adapter_files(adapter) if adapter else None,
        **fields,
    )


# -- what is available -----------------------------------------------------------------------------
def meminfo(tmp_path: Path, available_kb: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemFree:         1000 kB\nMemAvailable:   {available_kb} kB\n")
    return path


def test_cgroup_v2_limit(tmp_path):
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "memory.max").write_text("8589934592\n")
    found = available_memory(tmp_path / "cg", meminfo(tmp_path, 32 * 2**20))
    assert found.bytes == 8 * 2**30 and "cgroup v2" in found.source


def test_cgroup_v2_max_means_no_limit(tmp_path):
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "memory.max").write_text("max\n")
    found = available_memory(tmp_path / "cg", meminfo(tmp_path, 3 * 2**20))
    assert found.bytes == 3 * 2**30 and "MemAvailable" in found.source


def test_cgroup_v1_limit_and_its_unlimited(tmp_path):
    (tmp_path / "cg" / "memory").mkdir(parents=True)
    limit = tmp_path / "cg" / "memory" / "memory.limit_in_bytes"
    limit.write_text("4294967296\n")
    found = available_memory(tmp_path / "cg", meminfo(tmp_path, 32 * 2**20))
    assert found.bytes == 4 * 2**30 and "cgroup v1" in found.source
    limit.write_text("9223372036854771712\n")  # v1's "no limit"
    assert cgroup_limit(tmp_path / "cg") is None
    assert available_memory(tmp_path / "cg", meminfo(tmp_path, 32 * 2**20)).bytes == 32 * 2**30


def test_the_smaller_of_limit_and_mem_available(tmp_path):
    (tmp_path / "cg").mkdir()
    (tmp_path / "cg" / "memory.max").write_text(str(64 * 2**30))
    found = available_memory(tmp_path / "cg", meminfo(tmp_path, 5 * 2**20))
    assert found.bytes == 5 * 2**30 and "MemAvailable" in found.source


def test_nothing_readable_is_unknown_and_not_refused(tmp_path, capsys):
    found = available_memory(tmp_path / "none", tmp_path / "no-meminfo")
    assert found.bytes is None
    model = tmp_path / "model"
    llama(model)
    check_memory(request(model), "cpu", print, found)  # no refusal without a figure to compare
    assert "unknown available" in capsys.readouterr().out


# -- the estimate ----------------------------------------------------------------------------------
def test_convert_weight_follows_the_largest_parameter_and_the_model_dtype(tmp_path):
    model = tmp_path / "model"
    llama(model)  # largest: the embedding and the head, 128256 x 4096 each (not tied)
    elements = 128256 * 4096 + 4096  # the embedding with model.norm, the module's other tensor
    result = estimate(request(model), "cpu")
    assert result.merge is None and result.largest.startswith("model.embed_tokens.weight")
    # q4f16_1: f16, two copies and a bit, and the bf16 source with what measurement added
    assert result.convert == BASES + int(elements * (2.25 * 2 + 2 + MEASURED_EXTRA_BYTES))
    assert estimate(request(model, quantization="q4f32_1"), "cpu").convert == BASES + int(
        elements * (2.25 * 4 + 2 + MEASURED_EXTRA_BYTES)
    )
    assert estimate(request(model, quantization="q0f16"), "cpu").convert == BASES + int(elements * 4 * 2)
    assert result.needed == int(result.convert * MARGIN)


# bench/results.md, 2026-12-05: (hidden, layers, intermediate, tied, adapter, quantization) -> the
# conversion container's peak anonymous memory + shmem, measured
MEASURED = [
    ((2048, 16, 8192, True, False, "q4f16_1"), 2.72),
    ((2048, 16, 8192, True, True, "q4f16_1"), 3.35),
    ((2048, 16, 8192, True, False, "q4f32_1"), 2.99),
    ((2048, 16, 8192, True, True, "q4f32_1"), 3.70),
    ((3072, 28, 8192, True, False, "q4f16_1"), 4.18),
    ((3072, 28, 8192, True, True, "q4f16_1"), 4.20),
    ((3072, 28, 8192, True, False, "q4f32_1"), 5.02),
    ((3072, 28, 8192, True, True, "q4f32_1"), 5.24),
    ((4096, 32, 14336, False, False, "q4f16_1"), 5.70),
    ((4096, 32, 14336, False, True, "q4f16_1"), 5.79),
    ((4096, 32, 14336, False, False, "q4f32_1"), 6.97),
    ((4096, 32, 14336, False, True, "q4f32_1"), 6.93),
]


@pytest.mark.parametrize(("shape", "measured"), MEASURED)
def test_the_estimate_covers_what_the_scale_bench_measured(tmp_path, shape, measured):
    hidden, layers, inter, tied, with_adapter, quantization = shape
    model = tmp_path / "model"
    base = llama(model, layers=layers, hidden=hidden, inter=inter)
    if tied:  # the 1B and 3B shapes tie the head to the embedding: no lm_head tensor
        names = {name: shape for name, shape in base.items() if name != "lm_head.weight"}
        safetensors(model / "model.safetensors", names)
    adapter = None
    if with_adapter:
        adapter = lora(tmp_path / "lora", base, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"})  # fmt: skip
    result = estimate(request(model, adapter, quantization=quantization), "cpu")
    assert result.raw >= measured * GB, (result.summary(), measured)  # before the margin
    assert result.needed < 2 * measured * GB, (result.summary(), measured)  # and not a refusal of half the machines


def test_an_8b_fine_tune_is_allowed_the_8_gib_it_was_measured_to_finish_in(tmp_path):
    model = tmp_path / "model"
    base = llama(model, layers=32)
    adapter = lora(tmp_path / "lora", base, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"})  # fmt: skip
    check_memory(request(model, adapter), "cpu", print, Available(8 * 2**30, "the test's limit"))  # no refusal


def test_fused_parameters_are_bounded_by_their_module(tmp_path):
    """A small vocabulary: the largest MLC parameter is a fused one (gate_up), bounded by the mlp's three."""
    model = tmp_path / "model"
    llama(model, vocab=1000)
    result = estimate(request(model), "cpu")
    assert result.largest.startswith("model.layers.1.mlp.* (3 tensors)")
    assert result.convert == BASES + int(3 * 14336 * 4096 * (2.25 * 2 + 2 + MEASURED_EXTRA_BYTES))


def test_moe_experts_count_as_one_parameter(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    experts = {f"model.layers.0.mlp.experts.{e}.w1.weight": [1024, 512] for e in range(8)}
    safetensors(model / "model.safetensors", {"model.embed_tokens.weight": [100, 512], **experts})
    (model / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    (model / "tokenizer.json").write_text("{}")
    result = estimate(request(model), "cpu")
    assert result.convert == BASES + int(8 * 1024 * 512 * (2.25 * 2 + 2 + MEASURED_EXTRA_BYTES))
    assert "experts.*" in result.largest


def test_streaming_merge_needs_one_tensor_and_peft_the_targets(tmp_path):
    """An 8B shape (16 GB of sparse bf16) with an all-linear rank-16 adapter: the streaming merge holds the
    largest changed weight in float32 with its delta; peft's merge every targeted weight (issue 28: 14.1 GB)."""
    model = tmp_path / "model"
    base = llama(model, layers=32)
    adapter = lora(
        tmp_path / "lora", base, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    adapter_f32 = sum(t.elements * 4 for t in read_tensors(adapter / "adapter_model.safetensors"))
    streaming = estimate(request(model, adapter), "cpu")
    assert streaming.merge_kind == "streaming merge"
    assert streaming.merge == CONVERTER_BASE + TORCH_BASE + 14336 * 4096 * (4 + 4 + 2) + adapter_f32
    peft = estimate(request(model, adapter, peft_merge=True), "cpu")
    linear = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    assert peft.merge_kind == "peft merge (--peft-merge)"
    assert peft.merge == CONVERTER_BASE + TORCH_BASE + linear * 2 + 14336 * 4096 * 4 + adapter_f32
    assert 14.1 * GB < peft.merge < 1.1 * 14.1 * GB  # the measured figure, within 10 %
    assert streaming.needed < 8 * GB < peft.needed


def test_what_streaming_does_not_cover_is_estimated_as_peft(tmp_path):
    model = tmp_path / "model"
    base = llama(model, layers=1)
    adapter = lora(tmp_path / "lora", base, {"q_proj"}, use_dora=True)
    result = estimate(request(model, adapter), "cpu")
    assert result.merge_kind == "peft merge (not streamed: DoRA (use_dora))"


# -- the check in a conversion ---------------------------------------------------------------------
class NoConfigCheck:
    def check(self, model_dir):
        pass


@pytest.fixture
def conversion(tmp_path, monkeypatch):
    """run_convert up to the steps: names, transformers' config check, the device and the available
    memory stand in; reaching the steps is recorded, not run."""
    reached = []
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setattr(pipeline, "installed_names", lambda: NAMES)
    monkeypatch.setattr(pipeline, "ModelConfigAdapter", NoConfigCheck)
    monkeypatch.setattr("llm2wasm.image.convert.steps.choose_device", lambda requested: ("cpu", "on the CPU (test)"))
    monkeypatch.setattr(memory, "available_memory", lambda: Available(3 * GB, "the test's limit"))
    monkeypatch.setattr(pipeline, "convert_locked", lambda request, converter, identity: reached.append(request) or 0)
    model = tmp_path / "model"
    base = llama(model, layers=2)
    adapter = lora(tmp_path / "lora", base, {"q_proj", "v_proj"})

    def run(*flags: str) -> int:
        args = argparse.Namespace(
            model_dir=str(model), quantization="q4f16_1", conv_template="llama-3", adapter=str(adapter),
            model_id=None, prefill_chunk_size=None, context_window=None, base_url=None, force=False,
            output=str(tmp_path / "out"), peft_merge="--peft-merge" in flags,
            skip_memory_check="--skip-memory-check" in flags,
        )  # fmt: skip
        return exit_status(lambda: pipeline.run_convert(args))

    run.reached = reached
    run.out = tmp_path / "out"
    return run


def test_a_conversion_that_cannot_fit_exits_2_with_both_figures_and_writes_nothing(conversion, capsys):
    # 128256 x 4096 in f16, about 2.4 GB of copies besides the processes: more than the 3 GB given
    status = conversion()
    err = capsys.readouterr().err
    assert status == 2, err
    needed = estimate_line_figure(err)
    assert f"this conversion needs about {needed} GB of memory and 3.0 GB is available (the test's limit)" in err
    assert float(needed) > 3.0 and "--skip-memory-check" in err and "Traceback" not in err
    assert conversion.reached == [] and not conversion.out.exists()


def estimate_line_figure(err: str) -> str:
    line = next(line for line in err.splitlines() if line.strip().startswith("memory: about"))
    return line.split("about ", 1)[1].split(" GB", 1)[0]


def test_skip_memory_check_runs_anyway_and_still_says_the_estimate(conversion, capsys):
    status = conversion("--skip-memory-check")
    err = capsys.readouterr().err
    assert status == 0, err
    assert len(conversion.reached) == 1 and "not checked (--skip-memory-check)" in err


def test_refusal_names_what_would_fit(tmp_path, capsys):
    model = tmp_path / "model"
    base = llama(model, layers=32)
    adapter = lora(
        tmp_path / "lora", base, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    with pytest.raises(UsageError) as refused:
        check_memory(request(model, adapter, peft_merge=True), "cpu", print, Available(8 * GB, "the test's limit"))
    message = str(refused.value)
    assert "and 8.0 GB is available (the test's limit)" in message
    assert "drop --peft-merge (the streaming merge): about 7.7 GB" in message
    assert "memory: about" in capsys.readouterr().out  # said before the refusal
    # and what fits passes, saying so
    check_memory(request(model, adapter), "cpu", print, Available(8 * GB, "the test's limit"))
    assert capsys.readouterr().out.rstrip().endswith(": fits")


# -- hostile headers -------------------------------------------------------------------------------
def raw_file(path: Path, header: bytes, length: int | None = None, data: int = 0) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + b"\0" * data)
    return path


def entry(**fields) -> bytes:
    value = {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]} | fields
    return json.dumps({"w": value}).encode()


HOSTILE = {
    "header length 2**63": (lambda p: raw_file(p, b"{}", length=2**63), "its header claims"),
    "header longer than the file": (lambda p: raw_file(p, b"{}", length=5000), "its header claims"),
    "not JSON": (lambda p: raw_file(p, b"{nope"), "its header is not a JSON object"),
    "a JSON list": (lambda p: raw_file(p, b"[1, 2]"), "its header is not a JSON object"),
    "a 5000-digit shape": (lambda p: raw_file(p, b'{"w": {"shape": [' + b"9" * 5000 + b"]}}"), "not a JSON object"),
    "negative shape": (lambda p: raw_file(p, entry(shape=[-2, -2]), data=8), "at most 8 non-negative sizes"),
    "shape of floats": (lambda p: raw_file(p, entry(shape=[2.0, 2]), data=8), "non-negative sizes"),
    "shape of booleans": (lambda p: raw_file(p, entry(shape=[True, True]), data=8), "non-negative sizes"),
    "overflowing shape": (lambda p: raw_file(p, entry(shape=[2**40] * 8), data=8), "elements"),
    "too many dimensions": (lambda p: raw_file(p, entry(shape=[1] * 100), data=8), "at most 8"),
    "unknown dtype": (lambda p: raw_file(p, entry(dtype="Q4"), data=8), "dtype 'Q4'"),
    "entry not an object": (lambda p: raw_file(p, json.dumps({"w": [1]}).encode()), "is not an object"),
    "offsets past the data": (lambda p: raw_file(p, entry(), data=4), "do not hold 8 bytes"),
    "offsets of another size": (lambda p: raw_file(p, entry(data_offsets=[0, 4]), data=8), "do not hold 8 bytes"),
    "negative offsets": (lambda p: raw_file(p, entry(data_offsets=[-8, 0]), data=8), "do not hold 8 bytes"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_header_is_a_clear_error_without_a_big_allocation(tmp_path, case):
    make, message = HOSTILE[case]
    path = make(tmp_path / "model.safetensors")
    tracemalloc.start()
    try:
        with pytest.raises(UsageError) as refused:
            read_tensors(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "is not a complete safetensors file" in str(refused.value) and message in str(refused.value)
    assert peak < 16 * 2**20


def test_a_sound_header_reads_without_the_data(tmp_path):
    """The 16 GB file's data is sparse: reading it would take minutes; reading the header takes nothing."""
    path = tmp_path / "model.safetensors"
    safetensors(path, {"a": [1 << 17, 1 << 16], "b": [3]}, "BF16")
    assert path.stat().st_size > 16 * GB
    tensors = read_tensors(path)
    assert [(t.name, t.dtype, t.elements, t.nbytes) for t in tensors] == [
        ("a", "BF16", 1 << 33, 1 << 34),
        ("b", "BF16", 3, 6),
    ]


# -- the flag, in the image and through `invoke convert` -------------------------------------------
def test_the_flag_reaches_the_container_from_invoke_convert(tmp_path, monkeypatch):
    import sys

    from invoke import Context

    from llm2wasm.host import run as run_module
    from llm2wasm.image.convert.command import convert_parser

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import tasks

    assert convert_parser().parse_args(["m", "-q", "q4f16_1", "-o", "o"]).skip_memory_check is False
    assert convert_parser().parse_args(["m", "-q", "q4f16_1", "-o", "o", "--skip-memory-check"]).skip_memory_check
    jobs = []
    monkeypatch.setattr(run_module, "run_convert_job", lambda job: jobs.append(job) or 0)
    model = tmp_path / "model"
    llama(model, layers=1, vocab=100, hidden=8, inter=16, kv=8)
    for skip in (False, True):
        tasks.convert(
            Context(), str(model), quantization="q4f16_1", output=str(tmp_path / "out"), skip_memory_check=skip
        )
    assert ["--skip-memory-check" in job.options for job in jobs] == [False, True]


# bench/results.md, 2026-12-05: the Qwen2.5-7B shape (152,064-row embedding, 4 key/value heads), untied
@pytest.mark.parametrize(
    ("with_adapter", "quantization", "measured"),
    [(False, "q4f16_1", 5.93), (True, "q4f16_1", 6.17), (False, "q4f32_1", 8.09), (True, "q4f32_1", 7.89)],
)
def test_the_estimate_covers_the_qwen2_5_7b_shape(tmp_path, with_adapter, quantization, measured):
    base = llama(tmp_path / "model", layers=28, hidden=3584, inter=18944, vocab=152064, kv=512)
    adapter = None
    if with_adapter:
        adapter = lora(tmp_path / "lora", base, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"})  # fmt: skip
    result = estimate(request(tmp_path / "model", adapter, quantization=quantization), "cpu")
    assert measured * GB <= result.raw and result.needed < 2 * measured * GB, (result.summary(), measured)
