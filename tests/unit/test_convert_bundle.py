"""The WebLLM app config and README, and the memory figures they come from."""

from __future__ import annotations

from pathlib import Path

from llm2wasm.convert.bundle import bundle_readme, model_record, vram_required_mb
from llm2wasm.convert.inputs import ConvertRequest
from llm2wasm.convert.mlc import parse_memory

# web-llm src/config.ts, interface ModelRecord
MODEL_RECORD_FIELDS = {
    "model",
    "model_id",
    "model_lib",
    "overrides",
    "vram_required_MB",
    "low_resource_required",
    "buffer_size_required_bytes",
    "required_features",
    "model_type",
    "integrity",
}

COMPILE_LOG = (
    "[2026-11-25 10:00:00] INFO \x1b[92mTotal memory usage without KV cache:\x1b[0m 879.04 MB "
    "(Parameters: 615.00 MB. Temporary buffer: 264.04 MB)\n"
    "[2026-11-25 10:00:00] INFO \x1b[92mKV cache size:\x1b[0m 0.11 MB per token in the context window\n"
    "[2026-11-25 10:00:00] INFO \x1b[92mTotal memory usage with a 4K KV cache:\x1b[0m 1330.00 MB\n"
)


def req(**overrides) -> ConvertRequest:
    values = {
        "model_dir": Path("/m/tiny"),
        "quantization": "q4f16_1",
        "conv_template": "llama-3",
        "output": Path("/out/tiny-q4f16_1"),
        "model_id": "tiny-q4f16_1",
        "base_url": "https://cdn.example/b/",
    }
    values.update(overrides)
    return ConvertRequest(**values)


def test_parse_memory_strips_colour():
    assert parse_memory(COMPILE_LOG) == {
        "without_kv_cache_mb": 879.04,
        "parameters_mb": 615.0,
        "temporary_buffer_mb": 264.04,
        "kv_cache_mb_per_token": 0.11,
        "with_4k_kv_cache_mb": 1330.0,
    }
    assert parse_memory("nothing here") == {}


def test_vram_from_context_window():
    memory = parse_memory(COMPILE_LOG)
    assert vram_required_mb(memory, 4096) == round(879.04 + 0.11 * 4096, 2)
    assert vram_required_mb({"with_4k_kv_cache_mb": 1330.0}, 4096) == 1330.0
    assert vram_required_mb({}, 4096) is None


def test_model_record_fields():
    record = model_record(req(prefill_chunk_size=1024), {"context_window_size": 4096}, parse_memory(COMPILE_LOG))
    assert set(record) <= MODEL_RECORD_FIELDS
    assert record["model"] == "https://cdn.example/b/model/"
    assert record["model_id"] == "tiny-q4f16_1"
    assert record["model_lib"] == "https://cdn.example/b/lib/tiny-q4f16_1.wasm"
    assert "overrides" not in record  # prefill_chunk_size is compile-time: not a WebLLM ChatOptions field
    assert record["required_features"] == ["shader-f16"]
    assert record["vram_required_MB"] == 1329.6 and record["low_resource_required"] is True


def test_f32_needs_no_shader_f16_and_no_figures_no_vram():
    record = model_record(req(quantization="q4f32_1"), {}, {})
    assert "required_features" not in record and "vram_required_MB" not in record and "overrides" not in record


def test_readme_explains_the_resolve_main_rule():
    text = bundle_readme(req(), Path("model/resolve/main"))
    assert "appends `resolve/main/`" in text and "shader-f16" in text
    assert "python3 -m http.server 8000" in text and "CreateMLCEngine" in text


def test_record_overrides_carry_only_webllm_chat_options():
    request = req(prefill_chunk_size=1024, context_window=2048)
    assert request.overrides() == {"context_window_size": 2048, "prefill_chunk_size": 1024}  # for mlc_llm compile
    record = model_record(request, {"context_window_size": 2048}, {})
    assert record["overrides"] == {"context_window_size": 2048}
