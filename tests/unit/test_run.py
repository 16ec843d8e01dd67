"""The docker command `invoke convert` runs (no engine needed: the image lookup is replaced)."""

from __future__ import annotations

import pytest

from llm2wasm import run as run_module
from llm2wasm.errors import UsageError
from llm2wasm.run import ConvertJob, docker_command


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def image_present(monkeypatch):
    monkeypatch.setattr(run_module.docker, "image_id", lambda ref: "sha256:x")


def test_mounts_user_and_token_by_name(monkeypatch, tmp_path, model, image_present):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    cmd, where = docker_command(
        ConvertJob(
            image="img",
            model_dir=model,
            output=tmp_path / "o",
            quantization="q4f16_1",
            gpu=True,
            user="1000:1000",
            options=["--conv-template", "llama-3"],
        )
    )
    assert "hf_secret_value" not in " ".join(cmd)
    assert cmd[cmd.index("-e") + 1] == "HF_TOKEN"
    assert cmd[cmd.index("--user") + 1] == "1000:1000" and "--gpus" in cmd and "on the GPU" in where
    assert f"{model.resolve()}:/input/model:ro" in cmd and f"{(tmp_path / 'o').resolve()}:/output" in cmd
    assert cmd[cmd.index("img") + 1 :] == [
        "convert",
        "/input/model",
        "--quantization",
        "q4f16_1",
        "-o",
        "/output",
        "--conv-template",
        "llama-3",
    ]


def test_cpu_said_and_no_token_when_unset(monkeypatch, tmp_path, model, image_present):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    cmd, where = docker_command(
        ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q4f16_1", gpu=False)
    )
    assert "--gpus" not in cmd and "-e" not in cmd and "on the CPU" in where


def test_missing_inputs_are_usage_errors(monkeypatch, tmp_path, model):
    monkeypatch.setattr(run_module.docker, "image_id", lambda ref: None)
    with pytest.raises(UsageError, match=r"has no config\.json"):
        docker_command(ConvertJob(image="img", model_dir=tmp_path, output=tmp_path / "o", quantization="q"))
    with pytest.raises(UsageError, match=r"has no adapter_config\.json"):
        docker_command(
            ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q", adapter=tmp_path)
        )
    with pytest.raises(UsageError, match=r"image img not found: build it with `invoke build`"):
        docker_command(ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q"))
