"""Chat that works: a Llama-architecture chat model trained with ChatML (its tokenizer's chat
template, with a default system message of its own) is converted WITHOUT --conv-template; the
converter chooses the installed mlc_llm's template that renders like the model's own (chatml, the
model's default system message carried over, stop ids from the tokenizer), and one chat turn
through `engine.chat.completions` in WebLLM in headless Chromium (greedy, q0f32) yields the token
ids transformers generates greedily from `apply_chat_template(..., add_generation_prompt=True)`
with the same system message. A mismatching template is warned about, and refused under
--strict-template."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.browser import chromium_path, run_preview_page, start_preview
from tests.conftest import ROOT, run_app

STEPS = 8
ARTIFACTS = ROOT / "test-artifacts"
MAKE_MODEL = """
import json
from pathlib import Path
from llm2wasm.image.convert.checkmodels import make_chat_check_model
Path("/work/reference.json").write_text(json.dumps(make_chat_check_model(Path("/work/model"), steps=%d)))
"""


@pytest.fixture(scope="module")
def chat_model(hermetic_chain, tmp_path_factory):
    work = tmp_path_factory.mktemp("chat")
    made = run_app("-c", MAKE_MODEL % STEPS, mounts={work: "/work"}, entrypoint="python")
    assert made.returncode == 0, made.stderr
    return work, json.loads((work / "reference.json").read_text())


@pytest.fixture(scope="module")
def converted(chat_model):
    work, _ = chat_model
    args = ("convert", "/work/model", "-q", "q0f32", "--context-window", "256", "--prefill-chunk-size", "64",
            "--model-id", "tiny-chat", "-o", "/work/bundle")  # fmt: skip
    result = run_app(*args, mounts={work: "/work"})
    assert result.returncode == 0, result.stderr
    return result


def test_the_template_that_renders_like_the_model_is_chosen(chat_model, converted):
    work, _ = chat_model
    assert "conversation template chatml: it renders 4 conversations exactly like the model's chat template" in (
        converted.stderr
    )
    conv = json.loads((work / "bundle" / "model" / "resolve" / "main" / "mlc-chat-config.json").read_text())[
        "conv_template"
    ]
    assert conv["name"] == "chatml"
    assert conv["system_message"] == "you are a model"  # the model's default, carried over
    vocab = json.loads((work / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    assert conv["stop_token_ids"] == [vocab["<|im_end|>"], vocab["</s>"]]  # not chatml's own [2] by chance


def test_a_chat_turn_in_webllm_generates_transformers_tokens(chat_model, converted):
    work, reference = chat_model
    if chromium_path() is None:
        pytest.fail("Debian's chromium is not installed: run `bash .ci/setup.sh` as root")
    assert reference["min_margin"] >= 1.0 and len(set(reference["reference_ids"])) >= 3
    url, name = start_preview(work / "bundle")
    try:
        run = run_preview_page(
            url, reference["user"], STEPS, chat_system=reference["system"], screenshot=ARTIFACTS / "chat" / "chat.png"
        )
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    assert not run.preview_errors and not run.page_errors, (run.preview_errors, run.page_errors)
    assert not run.webgpu_errors, "\n".join(run.webgpu_errors[:5])
    (result,) = run.results
    assert result["tokenIds"] == reference["reference_ids"], (result, reference)


def test_a_mismatching_template_is_warned_about_and_refused_when_strict(chat_model, tmp_path):
    work, _ = chat_model
    # --device cuda without a GPU stops the run (exit 2) after the template check, before any step
    warned = run_app("convert", "/work/model", "-q", "q0f32", "--conv-template", "llama-2", "--device", "cuda",
                     "-o", "/out/a", mounts={work: "/work:ro", tmp_path: "/out"})  # fmt: skip
    assert "warning: --conv-template llama-2 renders differently from the model's own chat template" in warned.stderr
    assert "chatml renders like it" in warned.stderr
    strict = run_app("convert", "/work/model", "-q", "q0f32", "--conv-template", "llama-2", "--strict-template",
                     "-o", "/out/b", mounts={work: "/work:ro", tmp_path: "/out"})  # fmt: skip
    assert strict.returncode == 2 and "drop --strict-template" in strict.stderr
    assert not (tmp_path / "b").exists()
