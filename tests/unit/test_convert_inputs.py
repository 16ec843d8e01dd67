"""Input checks of `llm2wasm convert`: every bad input is refused before any work, naming the fix."""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.inputs import build_request
from llm2wasm.image.convert.mlc import MlcNames

NAMES = MlcNames(
    quantizations=("q0f16", "q0f32", "q3f16_1", "q4f16_1", "q4f32_1", "q4bf16_1", "q4f16_autoawq"),
    conv_templates=("chatml", "llama-2", "llama-3", "qwen2"),
)


def safetensors(path: Path, names: list[str]) -> None:
    header = json.dumps(
        {name: {"dtype": "F16", "shape": [2], "data_offsets": [4 * i, 4 * i + 4]} for i, name in enumerate(names)}
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4 * len(names))


def make_model(root: Path, **config) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000, **config}))
    safetensors(
        root / "model.safetensors", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    )
    (root / "tokenizer.json").write_text("{}")
    return root


def make_adapter(root: Path, **config) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "model", **config}
        )
    )
    (root / "adapter_model.safetensors").write_bytes(b"")
    return root


def args(model: Path, out: Path, **overrides) -> argparse.Namespace:
    values = {
        "model_dir": str(model),
        "quantization": "q4f16_1",
        "conv_template": "llama-2",
        "adapter": None,
        "model_id": None,
        "prefill_chunk_size": None,
        "context_window": None,
        "base_url": None,
        "force": False,
        "output": str(out),
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def request(model, out, **overrides):
    return build_request(args(model, out, **overrides), NAMES, lambda _: False)


def test_good_request(tmp_path):
    model = make_model(tmp_path / "model")
    req = request(model, tmp_path / "out", adapter=str(make_adapter(tmp_path / "lora")), prefill_chunk_size=1024)
    assert req.model_id == "out" and req.base_url == "http://localhost:8000/"
    assert req.overrides() == {"prefill_chunk_size": 1024} and req.needs_shader_f16
    assert req.warnings == []


def test_template_guessed_and_said(tmp_path):
    req = request(make_model(tmp_path / "model", vocab_size=128256), tmp_path / "out", conv_template=None)
    assert req.conv_template == "llama-3"
    assert "the model has no chat template: using 'llama-3'" in req.warnings[0]


@pytest.mark.parametrize(
    "setup,overrides,message",
    [
        (lambda m: None, {"model_dir": "/nonexistent/model"}, "model folder /nonexistent/model does not exist"),
        (lambda m: (m / "config.json").unlink(), {}, "config.json not found"),
        (lambda m: (m / "config.json").write_text("{"), {}, "is not valid JSON"),
        (lambda m: (m / "model.safetensors").unlink(), {}, "no weights in"),
        (lambda m: (m / "tokenizer.json").unlink(), {}, "no tokenizer in"),
        (lambda m: None, {"quantization": "q9f16"}, "unknown quantization 'q9f16': the installed mlc_llm offers"),
        (lambda m: None, {"quantization": "q4bf16_1"}, "quantization 'q4bf16_1' is not for WebGPU"),
        (lambda m: None, {"quantization": "q4f16_autoawq"}, "is not for WebGPU"),
        (lambda m: None, {"conv_template": "nope"}, "unknown conversation template 'nope'"),
        (
            lambda m: (m / "config.json").write_text('{"model_type": "mamba"}'),
            {"conv_template": None},
            "cannot guess a conversation template for model_type 'mamba' (and the model has no chat template "
            "to choose one by): pass --conv-template",
        ),
        (lambda m: None, {"prefill_chunk_size": 0}, "--prefill-chunk-size must be a positive number"),
        (lambda m: None, {"base_url": "models/"}, "is not an absolute http(s) URL"),
        (lambda m: None, {"model_id": "my model!"}, "model id 'my model!' must be letters"),
        (
            lambda m: (m / "config.json").write_text(
                '{"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}'
            ),
            {},
            "already quantized (gptq)",
        ),
    ],
)
def test_bad_model_input(tmp_path, setup, overrides, message):
    model = make_model(tmp_path / "model")
    setup(model)
    with pytest.raises(UsageError) as error:
        request(model, tmp_path / "out", **overrides)
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "adapter_setup,message",
    [
        (lambda a: (a / "adapter_config.json").unlink(), "adapter_config.json not found"),
        (lambda a: (a / "adapter_model.safetensors").unlink(), "no adapter weights"),
        (lambda a: (a / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}'), "cannot be merged"),
        (
            lambda a: (a / "adapter_config.json").write_text('{"peft_type": "LORA", "target_modules": ["c_attn"]}'),
            "the adapter targets modules c_attn, none of which exist",
        ),
    ],
)
def test_bad_adapter(tmp_path, adapter_setup, message):
    model = make_model(tmp_path / "model")
    adapter = make_adapter(tmp_path / "lora")
    adapter_setup(adapter)
    with pytest.raises(UsageError, match=None) as error:
        request(model, tmp_path / "out", adapter=str(adapter))
    assert message in str(error.value)


def test_quantized_base_refused_for_merging(tmp_path):
    model = make_model(tmp_path / "model", quantization_config={"load_in_4bit": True})
    with pytest.raises(UsageError, match="cannot be merged into quantized weights"):
        request(model, tmp_path / "out", adapter=str(make_adapter(tmp_path / "lora")))


def test_adapter_for_another_base_warns(tmp_path):
    model = make_model(tmp_path / "model")
    adapter = make_adapter(tmp_path / "lora", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    req = request(model, tmp_path / "out", adapter=str(adapter))
    assert "the adapter says its base is 'meta-llama/Llama-3.2-1B'" in req.warnings[0]


def test_regex_target_modules(tmp_path):
    model = make_model(tmp_path / "model")
    adapter = make_adapter(tmp_path / "lora", target_modules=r".*\.(q_proj|v_proj)")
    assert request(model, tmp_path / "out", adapter=str(adapter)).adapter == adapter.resolve()


def test_output_rules(tmp_path):
    model = make_model(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    (out / "something.txt").write_text("mine")
    with pytest.raises(UsageError, match="is not empty and is not an llm2wasm bundle"):
        request(model, out)
    assert request(model, out, force=True).force
    assert build_request(args(model, out), NAMES, lambda _: True).output == out.resolve()  # our own bundle: resume
    with pytest.raises(UsageError, match="inside the model folder"):
        request(model, model / "bundle")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file"):
        request(model, tmp_path / "file")


def test_unreadable_weights_are_named(tmp_path, monkeypatch):
    import os

    model = make_model(tmp_path / "model")
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: not str(path).endswith(".safetensors") and real_access(path, mode)
    )
    with pytest.raises(UsageError, match=r"cannot read model.safetensors in .*chmod a\+r"):
        request(model, tmp_path / "out")
