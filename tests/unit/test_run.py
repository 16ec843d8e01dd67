"""The docker command `invoke convert` runs (no engine needed: the image lookup is replaced)."""

from __future__ import annotations

import json

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
    assert "HF_TOKEN" in [cmd[i + 1] for i, a in enumerate(cmd) if a == "-e"]
    assert cmd[cmd.index("--user") + 1] == "1000:1000" and "--gpus" in cmd and "on the GPU" in where
    # OUT mounted under its own name: the bundle's model id and library are named after it
    assert f"{model.resolve()}:/input/model:ro" in cmd and f"{(tmp_path / 'o').resolve()}:/output/o" in cmd
    assert cmd[cmd.index("img") + 1 :] == [
        "convert",
        "/input/model",
        "--quantization",
        "q4f16_1",
        "-o",
        "/output/o",
        "--conv-template",
        "llama-3",
    ]
    # the container's messages name the host's folders
    shown = json.loads(next(a for a in cmd if a.startswith("LLM2WASM_HOST_PATHS=")).split("=", 1)[1])
    assert shown == {"/output/o": str((tmp_path / "o").resolve()), "/input/model": str(model.resolve())}


def test_cpu_said_and_no_token_when_unset(monkeypatch, tmp_path, model, image_present):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    cmd, where = docker_command(
        ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q4f16_1", gpu=False)
    )
    assert "--gpus" not in cmd and "on the CPU" in where
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & {cmd[i + 1] for i, a in enumerate(cmd) if a == "-e"}


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


def test_container_paths_shown_as_host_paths(monkeypatch, capsys):
    from llm2wasm import hostpaths

    monkeypatch.setenv(hostpaths.HOST_PATHS_VARIABLE, json.dumps({"/output/foo": "/home/u/dist/foo", "/output": "/x"}))
    monkeypatch.setattr(hostpaths.sys, "stderr", hostpaths.sys.stderr)
    hostpaths.show_host_paths_on_stderr()
    print("Bundle in /output/foo; log /output/foo/.llm2wasm/logs/compile.log", file=hostpaths.sys.stderr)
    assert capsys.readouterr().err == "Bundle in /home/u/dist/foo; log /home/u/dist/foo/.llm2wasm/logs/compile.log\n"
