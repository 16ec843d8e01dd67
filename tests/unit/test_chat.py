"""Choosing the conversation template by the model's own chat template (rendered by transformers),
against renderings in the form the installed mlc_llm's Conversation.as_prompt gives (the real
renderings are compared in the hermetic image: tests/integration/test_chat.py)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.chat import CONVERSATIONS, SENTINEL, choose, render_model_template, stop_token_ids

CHATML = (
    "{% if messages[0]['role'] != 'system' %}{{ default }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_like(default: str) -> dict:
    """What mlc_llm's chatml / qwen2 render (system_template with the system message, roles with
    role_content_sep "\\n", seps "<|im_end|>\\n", the generation prompt "<|im_start|>assistant\\n")."""
    renders = []
    for _, messages in CONVERSATIONS:
        system = [c for r, c in messages if r == "system"]
        text = f"<|im_start|>system\n{system[0] if system else SENTINEL}<|im_end|>\n"
        text += "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in messages if r != "system")
        renders.append(text + "<|im_start|>assistant\n")
    return {"renders": renders, "system_message": default, "stop_str": ["<|im_end|>"], "stop_token_ids": [2]}


def llama2_like() -> dict:
    renders = []
    for _, messages in CONVERSATIONS:
        system = [c for r, c in messages if r == "system"]
        text = f"[INST] <<SYS>>\n{system[0] if system else SENTINEL}\n<</SYS>>\n\n"
        text += " ".join(c for r, c in messages if r != "system") + " [/INST]"
        renders.append(text)
    return {"renders": renders, "system_message": "", "stop_str": ["[INST]"], "stop_token_ids": [2]}


TEMPLATES = {
    "chatml": chatml_like("A conversation between a user and an LLM-based AI assistant."),
    "qwen2": chatml_like("You are a helpful assistant."),
    "llama-2": llama2_like(),
}


def model_with_template(tmp_path, default_system: str | None) -> list[str | None]:
    """A tokenizer folder whose chat_template is ChatML, with `default_system` when none is given."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "hello"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    default = f"<|im_start|>system\n{default_system}<|im_end|>\n" if default_system is not None else ""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML.replace(
        "{{ default }}", default.replace("\n", "\\n").join(["{{ '", "' }}"]) if default else ""
    )
    tokenizer.save_pretrained(str(tmp_path))
    return render_model_template(tmp_path)


def test_the_template_with_the_models_default_is_chosen(tmp_path):
    model = model_with_template(tmp_path, "You are a helpful assistant.")
    assert model[0].startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\n")
    choice = choose(model, TEMPLATES, None, "llama-2", strict=False)
    assert choice.name == "qwen2" and choice.system_message is None and "exactly like" in choice.reason


def test_another_default_system_message_is_carried_over(tmp_path):
    model = model_with_template(tmp_path, "You are SmolLM.")
    choice = choose(model, TEMPLATES, None, None, strict=False)
    assert choice.name == "chatml" and choice.system_message == "You are SmolLM."
    assert "carried over" in choice.reason


def test_a_llama_architecture_chat_model_does_not_get_the_llama_2_wrapping(tmp_path):
    """The case that went wrong: model_type llama, trained with ChatML; the guess was llama-2."""
    model = model_with_template(tmp_path, "You are a helpful assistant.")
    assert choose(model, TEMPLATES, None, "llama-2", strict=False).name != "llama-2"


def test_a_given_template_that_renders_differently_is_a_warning_or_refused(tmp_path):
    model = model_with_template(tmp_path, "You are a helpful assistant.")
    choice = choose(model, TEMPLATES, "llama-2", None, strict=False)
    assert choice.name == "llama-2" and choice.warning.startswith("--conv-template llama-2 renders differently")
    assert "the model's template gives '<|im_start|>system" in choice.warning and "'[INST] <<SYS>>" in choice.warning
    assert "qwen2 renders like it" in choice.warning
    with pytest.raises(UsageError, match="drop --strict-template"):
        choose(model, TEMPLATES, "llama-2", None, strict=True)
    assert choose(model, TEMPLATES, "qwen2", None, strict=True).warning is None


def test_no_match_names_the_nearest_templates(tmp_path):
    model = model_with_template(tmp_path, None)  # no system block unless one is given
    with pytest.raises(UsageError) as error:
        choose(model, TEMPLATES, None, None, strict=False)
    text = str(error.value)
    assert "no conversation template of the installed mlc_llm renders like the model's chat template" in text
    assert "chatml: 2 of 4 conversations alike; no system message, one turn: at character 12" in text
    assert "pass --conv-template NAME" in text


def test_stop_tokens_come_from_the_tokenizer(tmp_path):
    model_with_template(tmp_path, "x")
    ids, missing = stop_token_ids(tmp_path / "tokenizer.json", ["<|im_end|>", "<|endoftext|>"], [2])
    assert ids == [4, 2] and missing == ["<|endoftext|>"]
    assert (tmp_path / "chat_template.jinja").is_file()  # where transformers 5 saves a chat template
