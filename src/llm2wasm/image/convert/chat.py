"""The conversation template: the one of the installed mlc_llm that renders like the model's own.

WebLLM's chat API wraps messages in the bundle's conversation template (`mlc-chat-config.json`
`conv_template`); a chat model trained with one format answers nonsense in another, while every
check passes. So when the model has a chat template (`tokenizer_config.json` `chat_template` or
`chat_template.jinja`), a few fixed conversations are rendered with it by transformers
(`apply_chat_template(..., tokenize=False, add_generation_prompt=True)`) and with every template
the installed mlc_llm's gen_config accepts (its own `Conversation.as_prompt`, in the image's Python), and the
template that renders identically is chosen. The default system message is compared aside: a
template whose only difference is its default system message matches, and the model's default is
carried over as `system_message` in `mlc-chat-config.json`. Stop tokens are taken from the
tokenizer: a registered template's `stop_token_ids` are ids of another vocabulary.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.image.convert.mlc import python_executable

SYSTEM = "You are a terse assistant."
USER_1 = "Hello! Who are you?"
ASSISTANT_1 = "I am a small model."
USER_2 = "What can you do?"
# (what it is, messages); each rendered with the generation prompt
CONVERSATIONS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("system message, one turn", (("system", SYSTEM), ("user", USER_1))),
    ("system message, two turns", (("system", SYSTEM), ("user", USER_1), ("assistant", ASSISTANT_1), ("user", USER_2))),
    ("no system message, one turn", (("user", USER_1),)),
    ("no system message, two turns", (("user", USER_1), ("assistant", ASSISTANT_1), ("user", USER_2))),
)
# Stands where a template puts its default system message, so the model's default can be read off.
SENTINEL = "\x00llm2wasm-system-message\x00"

_RENDER_SCRIPT = """
import json, sys
from mlc_llm.conversation_template import ConvTemplateRegistry
from mlc_llm.interface.gen_config import CONV_TEMPLATES  # the names gen_config accepts
request = json.load(sys.stdin)
out = {}
for name in sorted(CONV_TEMPLATES):
    base = ConvTemplateRegistry.get_conv_template(name)
    if base is None:
        continue
    renders = []
    for messages in request["conversations"]:
        conv = base.model_copy(deep=True)
        system = [content for role, content in messages if role == "system"]
        conv.system_message = system[0] if system else request["sentinel"]
        conv.messages = [[role, content] for role, content in messages if role != "system"] + [["assistant", None]]
        try:
            renders.append("".join(p for p in conv.as_prompt() if isinstance(p, str)))
        except Exception as error:
            renders.append(None)
    out[name] = {"renders": renders, "system_message": base.system_message, "stop_str": list(base.stop_str),
                 "stop_token_ids": list(base.stop_token_ids)}
print(json.dumps(out))
"""


def render_mlc_templates() -> dict[str, dict]:
    """Every registered template's renderings of CONVERSATIONS, by the installed mlc_llm itself."""
    request = {"conversations": [list(messages) for _, messages in CONVERSATIONS], "sentinel": SENTINEL}
    result = subprocess.run(
        [python_executable(), "-c", _RENDER_SCRIPT], input=json.dumps(request), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    if result.returncode != 0:
        raise UsageError(f"cannot render the installed mlc_llm's conversation templates:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def tokenizer_dir(model_dir: Path, adapter: Path | None) -> Path:
    """Where the chat template comes from: a fine-tune's own, else the base model's."""
    if adapter is not None and any((adapter / n).is_file() for n in ("chat_template.jinja", "tokenizer_config.json")):
        return adapter
    return model_dir


def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except FileNotFoundError:
        return False
    except (ValueError, RecursionError):  # JSON errors are ValueErrors, nesting past the parser's depth not
        raise UsageError(
            f"{folder / 'tokenizer_config.json'} is not valid JSON: the tokenizer files are damaged; "
            "download them again"
        ) from None
    return isinstance(config, dict) and bool(config.get("chat_template"))


def render_model_template(folder: Path) -> list[str | None]:
    """The model's own chat template on CONVERSATIONS (None where the template refuses one, e.g. a
    template without a system role)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    renders: list[str | None] = []
    for _, messages in CONVERSATIONS:
        try:
            renders.append(
                tokenizer.apply_chat_template(
                    [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=True
                )
            )
        except Exception:
            renders.append(None)
    return renders


@dataclass
class TemplateMatch:
    name: str
    matched: list[str] = field(default_factory=list)  # the conversations that render identically
    difference: str = ""  # the first difference, both sides
    system_message: str | None = None  # the model's default, where it differs from the template's

    @property
    def full(self) -> bool:
        return len(self.matched) == len(CONVERSATIONS)


def first_difference(model: str, template: str, width: int = 60) -> str:
    index = next(
        (i for i, (a, b) in enumerate(zip(model, template, strict=False)) if a != b), min(len(model), len(template))
    )
    start = max(0, index - 10)
    return (
        f"at character {index}: the model's template gives {model[start : index + width]!r}, "
        f"the conversation template {template[start : index + width]!r}"
    )


def compare(name: str, template: dict, model: list[str | None]) -> TemplateMatch:
    """How the template's renderings compare with the model's, the default system message aside."""
    match = TemplateMatch(name)
    defaults: set[str] = set()
    for (what, _), theirs, ours in zip(CONVERSATIONS, model, template["renders"], strict=True):
        if theirs is None or ours is None:
            if theirs is None and ours is None:
                match.matched.append(what)
            elif not match.difference:
                match.difference = f"{what}: rendered by only one of the two"
            continue
        if SENTINEL in ours:  # no system message given: the template puts its default here
            before, _, after = ours.partition(SENTINEL)
            if theirs.startswith(before) and theirs.endswith(after) and len(theirs) >= len(before) + len(after):
                defaults.add(theirs[len(before) : len(theirs) - len(after)])
                match.matched.append(what)
                continue
            ours = ours.replace(SENTINEL, template["system_message"])
        elif theirs == ours:
            match.matched.append(what)
            continue
        if not match.difference:
            match.difference = f"{what}: {first_difference(theirs, ours)}"
    if len(defaults) > 1:  # one default system message, or none
        match.matched = [m for m in match.matched if not m.startswith("no system")]
        match.difference = match.difference or "no system message: the model's default differs between conversations"
    elif defaults:
        default = defaults.pop()
        if default != template["system_message"]:
            match.system_message = default
    return match


@dataclass
class ChatChoice:
    name: str
    reason: str
    system_message: str | None = None  # carried over into mlc-chat-config.json
    warning: str | None = None


def rank(model: list[str | None], templates: dict[str, dict], preferred: str | None) -> list[TemplateMatch]:
    """Full matches first (those needing no carried-over system message first, then the model
    type's usual template), then the nearest by conversations matched."""
    matches = [compare(name, template, model) for name, template in templates.items()]
    return sorted(matches, key=lambda m: (-len(m.matched), m.system_message is not None, m.name != preferred, m.name))


def choose(
    model: list[str | None], templates: dict[str, dict], given: str | None, guess: str | None, strict: bool
) -> ChatChoice:
    ranked = rank(model, templates, given or guess)
    if given:
        mine = next(m for m in ranked if m.name == given)
        if mine.full:
            return ChatChoice(
                given, f"--conv-template {given} renders like the model's chat template", mine.system_message
            )
        message = f"--conv-template {given} renders differently from the model's own chat template ({mine.difference})"
        if ranked[0].full:
            message += f"; {ranked[0].name} renders like it"
        if strict:
            raise UsageError(message + ": drop --strict-template to convert anyway, or pass the matching template")
        return ChatChoice(given, "given with --conv-template", None, message)
    best = ranked[0]
    if best.full:
        why = f"it renders {len(CONVERSATIONS)} conversations exactly like the model's chat template"
        if best.system_message is not None:
            why += f" (the model's default system message {best.system_message!r} carried over)"
        return ChatChoice(best.name, why, best.system_message)
    nearest = "\n".join(
        f"  {m.name}: {len(m.matched)} of {len(CONVERSATIONS)} conversations alike; {m.difference}" for m in ranked[:3]
    )
    raise UsageError(
        "no conversation template of the installed mlc_llm renders like the model's chat template; nearest:\n"
        f"{nearest}\npass --conv-template NAME to convert with one of them anyway (WebLLM's chat will then "
        "wrap messages differently from how the model was trained)"
    )


def stop_token_ids(tokenizer_json: Path, stop_strings: list[str], eos_ids: list[int]) -> tuple[list[int], list[str]]:
    """The ids WebLLM stops on: each stop string that is one token of this tokenizer, and the
    model's end-of-sequence ids; and the stop strings that are no token here (WebLLM still stops
    on their text)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    ids, missing = [], []
    for text in stop_strings:
        token = tokenizer.token_to_id(text)
        if token is None:
            missing.append(text)
        elif token not in ids:
            ids.append(token)
    ids += [i for i in eos_ids if i not in ids]
    return ids, missing
