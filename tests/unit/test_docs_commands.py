"""Every command the README and docs/ show runs as shown: the task or subcommand exists, and takes
every option used and the arguments it needs.

Commands are read out of the code blocks of README.md and docs/*.md (fenced ```bash, ```sh,
```shell, ```console or plain ```, and indented blocks), backslash continuations joined, comments
and `$ ` prompts dropped (in a block that has prompts, only the prompted lines are commands), and
split at `&&`, `||`, `;` and `|`. Then:

* `invoke ...` (also `.venv/bin/invoke`, `inv`) is parsed by invoke's own parser against the task
  collection of tasks.py, as `invoke` parses it: core options first, then each task with its
  options (unknown task or option, a missing positional argument: a failure);
* `llm2wasm ...`, and `docker run ... IMAGE ...` of an llm2wasm image (whose entrypoint is
  `llm2wasm`), is parsed by the command's real parser, llm2wasm.image.cli.build_parser().

Placeholders (`MODEL_DIR`, `OUT`, `N`, `$JOB_COMPLETION_INDEX`, `<commit>`) stand for any value, a
number included. Lines of other tools (docker build, pip, curl, kubectl ...) are not checked.
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from invoke import Collection, Program
from invoke.parser import ParseError, Parser, ParserContext

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402
from llm2wasm.image import cli  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "shell-session", "zsh"}
INVOKE_PROGRAMS = {"invoke", "inv"}
CLI_PROGRAM = "llm2wasm"
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "<", "2>", "2>>", "&>", ">&", "2>&1"}
# a placeholder the docs write for a value: MODEL_DIR, OUT, N, $VAR, ${VAR}, <commit>, ...
PLACEHOLDER = re.compile(r"^([A-Z][A-Z0-9_]*|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|<[^<>]+>|\.\.\.|…)$")
# `docker run` options that take no value (all others take one, as `--opt value` or `--opt=value`)
DOCKER_RUN_FLAGS = {
    "--rm",
    "-i",
    "-t",
    "-it",
    "-ti",
    "-d",
    "--detach",
    "--interactive",
    "--tty",
    "--init",
    "--read-only",
    "--privileged",
    "-P",
    "--publish-all",
    "--no-healthcheck",
    "--oom-kill-disable",
    "--sig-proxy",
}


@dataclass(frozen=True)
class Shown:
    """A command as a page shows it: where, and its words."""

    where: str  # "docs/CONVERT.md:12"
    text: str  # the command line, continuations joined

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


# --- reading the commands out of a page ------------------------------------------------------------------

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def code_blocks(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """(first line number, language, lines) of every shell-like code block: fenced or indented."""
    lines = text.splitlines()
    index = 0
    previous_blank = True
    in_list = False
    while index < len(lines):
        line = lines[index]
        fence = FENCE.match(line)
        if fence:
            indent, marker, language = fence.groups()
            body, index = [], index + 1
            while index < len(lines) and not lines[index].strip().startswith(marker):
                body.append(lines[index][len(indent) :] if lines[index].startswith(indent) else lines[index])
                index += 1
            if language.lower() in SHELL_LANGUAGES:
                yield index - len(body) + 1, language.lower(), body
            index += 1
            previous_blank = False
            continue
        if re.match(r"^\s*([-*+]|\d+\.)\s", line):
            in_list = True
        elif not line.strip():
            pass
        elif not line.startswith(" "):
            in_list = False
        # an indented block: four spaces after a blank line, outside a list (where indentation continues an item)
        if previous_blank and line.startswith("    ") and line.strip() and not in_list:
            start, body = index, []
            while index < len(lines) and (lines[index].startswith("    ") or not lines[index].strip()):
                body.append(lines[index][4:])
                index += 1
            while body and not body[-1].strip():
                body.pop()
            yield start + 1, "", body
            previous_blank = False
            continue
        previous_blank = not line.strip()
        index += 1


def commands_in_block(start: int, language: str, body: list[str], page: str) -> Iterator[Shown]:
    """The commands of one block: continuations joined; prompts and, where there are prompts, output dropped."""
    prompted = any(line.lstrip().startswith(("$ ", "% ")) for line in body)
    index = 0
    while index < len(body):
        number = start + index
        line = body[index].rstrip()
        while line.endswith("\\") and index + 1 < len(body):
            index += 1
            line = line[:-1].rstrip() + " " + body[index].strip()
        index += 1
        stripped = line.strip()
        if prompted:
            if not stripped.startswith(("$ ", "% ")):
                continue
            stripped = stripped[2:]
        if stripped and not stripped.startswith("#"):
            yield Shown(f"{page}:{number}", stripped)


def shown_commands(path: Path) -> list[Shown]:
    page = str(path.relative_to(ROOT))
    found = []
    for start, language, body in code_blocks(path.read_text()):
        found += commands_in_block(start, language, body, page)
    return found


def simple_commands(text: str) -> list[list[str]]:
    """The words of each simple command of a line (split at && || ; |), without redirections,
    leading VAR=value assignments or comments."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote: not a command line
        return []
    result: list[list[str]] = [[]]
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
            continue
        if word in SEPARATORS:
            result.append([])
        elif word in REDIRECTIONS or re.fullmatch(r"\d?[<>]+&?", word):
            skip_next = True
        elif not result[-1] and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word):
            continue
        else:
            result[-1].append(word)
    return [command for command in result if command]


# --- checking one command --------------------------------------------------------------------------------


def _placeholder_tolerant(kind):
    """An option's type that takes a placeholder (N, PORT, $VAR) as well as a real value."""

    def convert(value):
        return value if isinstance(value, str) and PLACEHOLDER.match(value) else kind(value)

    return convert


def _task_contexts(collection: Collection) -> list[ParserContext]:
    """The parser contexts `invoke` makes of the collection (Collection.to_contexts), from copies of the
    tasks: invoke's get_arguments() pops the help texts off the task it reads."""
    contexts = []
    for name, aliases in collection.task_names.items():
        task = copy.copy(collection[name])
        task.help = dict(task.help or {})
        context = ParserContext(name=name, aliases=aliases, args=task.get_arguments())
        for argument in context.args.values():
            if argument.kind in (int, float):
                argument.kind = _placeholder_tolerant(argument.kind)
        contexts.append(context)
    return contexts


def invoke_problem(argv: list[str], collection: Collection) -> str | None:
    """What invoke would refuse in `invoke ARGV` (None: it parses), as `invoke` itself parses it."""
    program = Program()
    try:
        core = Parser(initial=program.initial_context, ignore_unknown=True).parse_argv(argv)
    except ParseError as error:
        return str(error)
    asked = core[0].args["help"].value
    if isinstance(asked, str) and asked not in collection.task_names:
        return f"no task {asked!r} (invoke -h {asked})"
    if not core.unparsed:
        return None
    try:
        parsed = Parser(initial=program.initial_context, contexts=_task_contexts(collection)).parse_argv(core.unparsed)
    except (ParseError, ValueError) as error:
        return str(error)
    if not any(context.name for context in parsed):
        return f"no task named in {' '.join(core.unparsed)!r}"
    return None


def _tolerant_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command's parser, taking placeholders for typed values and choices."""

    class Choices(tuple):
        def __contains__(self, value):
            return (isinstance(value, str) and bool(PLACEHOLDER.match(value))) or tuple.__contains__(self, value)

    stack = [parser]
    while stack:
        current = stack.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack += list(action.choices.values())
                continue
            if action.type in (int, float):
                action.type = _placeholder_tolerant(action.type)
            if action.choices is not None and not isinstance(action.choices, dict):
                action.choices = Choices(action.choices)
    return parser


class _Refused(Exception):
    pass


def cli_problem(argv: list[str]) -> str | None:
    """What `llm2wasm ARGV` would refuse (None: it parses), by the command's own parser."""
    parser = _tolerant_parser(cli.build_parser())
    messages: list[str] = []

    def error(self, message):
        messages.append(f"{self.prog}: {message}")
        raise _Refused

    for sub in _all_parsers(parser):
        sub.error = error.__get__(sub)
    try:
        parser.parse_args(argv)
    except _Refused:
        return messages[-1]
    except SystemExit as exited:  # --help, --version
        return None if exited.code == 0 else f"exit {exited.code}"
    return None


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _all_parsers(sub)
    return found


def docker_run_argv(words: list[str]) -> list[str] | None:
    """The `llm2wasm` arguments of `docker run [OPTIONS] IMAGE ARGS` when IMAGE is an llm2wasm image
    run with its entrypoint (None otherwise)."""
    if words[:2] != ["docker", "run"]:
        return None
    index = 2
    while index < len(words) and words[index].startswith("-"):
        option = words[index]
        if option == "--entrypoint" or option.startswith("--entrypoint="):
            return None  # not the llm2wasm command
        if option in DOCKER_RUN_FLAGS or "=" in option:
            index += 1
        else:
            index += 2
    if index >= len(words):
        return None
    image = words[index]
    name = image.split("@")[0].rsplit(":", 1)[0] if "/" in image or ":" in image else image
    if not (name == "llm2wasm" or name.endswith("/llm2wasm") or PLACEHOLDER.match(image)):
        return None
    return words[index + 1 :]


def program_of(word: str) -> str:
    """`invoke` for invoke, .venv/bin/invoke or /usr/local/bin/invoke; a path not in a bin/ folder is
    no program (`src/llm2wasm/` in a layout listing)."""
    if "/" in word and Path(word).parent.name != "bin":
        return ""
    return Path(word).name


def problem(words: list[str], collection: Collection) -> str | None:
    """What is wrong with one simple command as the docs show it (None: nothing, or not ours)."""
    program = program_of(words[0])
    if program in INVOKE_PROGRAMS:
        return invoke_problem(words[1:], collection)
    if program == CLI_PROGRAM:
        # `llm2wasm batch: 4 item(s) ...` is output, not a command
        if len(words) > 1 and not re.fullmatch(r"-{0,2}[a-z][a-z0-9-]*(=.*)?", words[1]):
            return None
        return cli_problem(words[1:])
    argv = docker_run_argv(words)
    if argv:
        return cli_problem(argv)
    return None


# --- commands named in the text: `invoke build --jobs 1` ----------------------------------------------------

INLINE = re.compile(r"(?<!`)`((?:\.venv/bin/)?(?:invoke|llm2wasm) [^`]+)`(?!`)")
HELP_FLAGS = {"-h", "--help"}


def inline_commands(path: Path) -> list[Shown]:
    """Commands quoted in a page's text (outside code blocks): the options they name must exist."""
    page = str(path.relative_to(ROOT))
    in_fence = False
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            found += [Shown(f"{page}:{number}", match.group(1)) for match in INLINE.finditer(line)]
    return found


def _flag_word(word: str) -> str:
    """An option as a synopsis writes it: `[--port` -> `--port`, `--set KEY=VALUE` stays `--set`."""
    return word.strip("[]").split("=", 1)[0]


def mention_problem(text: str, collection: Collection) -> str | None:
    """What is wrong with a command quoted in the text, a synopsis perhaps (`invoke test [--unit]`):
    its task or subcommand must exist and take every option it names. Values and required arguments
    are not asked for (the text often names a command without them)."""
    words = [word for word in text.replace("\\|", " | ").split() if word.strip("[]")]
    program = program_of(words[0])
    if program in INVOKE_PROGRAMS:
        context: ParserContext | None = None
        for word in words[1:]:
            flag = _flag_word(word)
            if flag.startswith("-"):
                if flag in HELP_FLAGS or context is None or flag in context.flags or flag in context.inverse_flags:
                    continue
                return f"no option {flag} in this task"
            if word in collection.task_names:
                task = copy.copy(collection[word])
                task.help = dict(task.help or {})
                context = ParserContext(name=word, args=task.get_arguments())
            elif context is None and not PLACEHOLDER.match(word):
                return f"no task {word!r}"
        return None
    if program == CLI_PROGRAM:
        parser = cli.build_parser()
        for word in words[1:]:
            flag = _flag_word(word)
            if flag.startswith("-"):
                if flag not in parser._option_string_actions:
                    return f"no option {flag} in `{parser.prog}`"
                continue
            action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
            if action is not None and word in action.choices:
                parser = action.choices[word]
            elif action is not None and parser is not None and not PLACEHOLDER.match(word) and "/" not in word:
                return f"no subcommand {word!r} of `{parser.prog}`"
        return None
    return None


def problems_in(shown: list[Shown], collection: Collection) -> list[str]:
    found = []
    for command in shown:
        for words in simple_commands(command.text):
            reason = problem(words, collection)
            if reason:
                found.append(f"{command}\n    -> {reason}")
    return found


def checked_commands(shown: list[Shown]) -> list[Shown]:
    """The commands this test checks (an invoke or llm2wasm command), for the counts below."""
    return [
        command
        for command in shown
        for words in simple_commands(command.text)
        if program_of(words[0]) in INVOKE_PROGRAMS | {CLI_PROGRAM} or docker_run_argv(words)
    ]


def _page(text: str) -> list[Shown]:
    """The commands of a page's text, as shown_commands reads a file."""
    return [
        Shown(f"page.md:{command.where.rsplit(':', 1)[1]}", command.text)
        for start, language, body in code_blocks(text)
        for command in commands_in_block(start, language, body, "page.md")
    ]


COLLECTION = Collection.from_module(tasks)


# --- the docs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_command_shown_runs_as_shown(path):
    found = problems_in(shown_commands(path), COLLECTION)
    assert not found, (
        f"commands in {path.relative_to(ROOT)} that would not run as shown (fix the page; the full option lists "
        "are in docs/COMMANDS.md):\n" + "\n".join(found)
    )


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_command_named_in_the_text_exists_with_its_options(path):
    found = [
        f"{command}\n    -> {reason}"
        for command in inline_commands(path)
        if (reason := mention_problem(command.text, COLLECTION))
    ]
    assert not found, f"commands named in {path.relative_to(ROOT)} that do not exist as written:\n" + "\n".join(found)


def test_the_readme_shows_build_convert_and_preview_within_its_first_40_lines():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    shown = [" ".join(words) for command in _page(head) for words in simple_commands(command.text)]
    for task in ("build", "convert", "preview"):
        assert any(re.search(rf"(^|/)invoke {task}\b", line) for line in shown), f"no `invoke {task}` in {shown}"


def test_the_check_reads_the_commands_of_every_page():
    """Not vacuous: the pages' commands are found and checked (README, CONVERT, BATCH at least)."""
    counts = {path.name: len(checked_commands(shown_commands(path))) for path in DOCS}
    assert counts["README.md"] >= 5, counts
    assert counts["CONVERT.md"] >= 4, counts
    assert counts["BATCH.md"] >= 4, counts


# --- the check itself: what it reads, and what it refuses ---------------------------------------------------


def test_fenced_indented_and_prompted_blocks_continuations_and_comments():
    page = """\
# A page

```bash
invoke build --profile cpu   # a comment
invoke convert ./m -q q4f16_1 \\
  --adapter ./lora -o ./out
# only a comment
```

```console
$ invoke doctor --profile hermetic
NO  cannot reach ...
```

```text
invoke not-a-command: output, never checked
```

    llm2wasm batch run models.toml --item N --output OUT

- a list item

      not a code block
"""
    shown = [command.text for command in _page(page)]
    assert shown == [
        "invoke build --profile cpu   # a comment",
        "invoke convert ./m -q q4f16_1 --adapter ./lora -o ./out",
        "invoke doctor --profile hermetic",
        "llm2wasm batch run models.toml --item N --output OUT",
    ]
    assert simple_commands(shown[0]) == [["invoke", "build", "--profile", "cpu"]]


def test_commands_that_parse_pass():
    for line in [
        "bash .ci/setup.sh && .venv/bin/invoke build      # set up, then build",
        "invoke build --set emsdk_version=3.1.57 --set mlc_llm_ref=v0.20.0",
        "invoke lint test --unit",  # several tasks in one call
        "invoke -h convert",
        "invoke --list",
        "invoke convert MODEL_DIR -q Q -o OUT --no-wgsl-repair",
        "invoke preview ./dist/x --port N",
        "invoke batch models.toml --k8s --image ghcr.io/llm2wasm/llm2wasm:cpu --claim models > job.yaml",
        "CI=true invoke test",
        "llm2wasm batch run models.toml --item N --output OUT",
        "llm2wasm convert MODEL -q Q -o OUT --device cpu --link-opt O3",
        'docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/dist/x:/bundle:ro" llm2wasm:app-stable preview /bundle',
        "docker run --rm llm2wasm:app-stable selftest",
        "docker run --rm --entrypoint sleep llm2wasm:app-stable 60",  # not the llm2wasm command
        "pip install --frobnicate",  # not ours
        "kubectl apply -f job.yaml",
    ]:
        assert not [problem(words, COLLECTION) for words in simple_commands(line) if problem(words, COLLECTION)], line


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("invoke convert ./model -q q4f16_1 -o ./out --frobnicate", "--frobnicate"),
        ("invoke buidl --profile cpu", "buidl"),
        ("invoke convert -q q4f16_1 -o ./out", "model_dir"),
        ("invoke preview", "bundle"),
        ("invoke mirror", "action"),
        ("invoke -h no-such-task", "no-such-task"),
        ("bash .ci/setup.sh && .venv/bin/invoke build --profiel cpu", "--profiel"),
        ("invoke build --jobs many", "many"),
        ("llm2wasm convert ./model -q q4f16_1 -o ./out --frobnicate", "--frobnicate"),
        ("llm2wasm convert ./model -o ./out", "--quantization"),
        ("llm2wasm convert ./model -q Q -o OUT --device tpu", "tpu"),
        ("llm2wasm batch run models.toml --item N", "--output"),
        ("llm2wasm bogus", "bogus"),
        ("docker run --rm -v x:/bundle:ro llm2wasm:app-stable preview /bundle --colour", "--colour"),
        ("docker run --rm ghcr.io/llm2wasm/llm2wasm:cpu batch check", "SPEC"),
    ],
)
def test_a_planted_violation_is_reported(line, reason):
    found = [problem(words, COLLECTION) for words in simple_commands(line)]
    found = [message for message in found if message]
    assert found, f"not reported: {line}"
    assert reason in found[0], found


def test_a_planted_violation_on_a_page_names_the_page_and_line():
    page = (
        "# Try it\n\n```bash\ninvoke build\ninvoke convert ./my-model -q q4f16_1 --quantisation q4f16_1 -o out\n```\n"
    )
    found = problems_in(_page(page), COLLECTION)
    assert len(found) == 1
    assert found[0].startswith("page.md:5: invoke convert ./my-model"), found
    assert "--quantisation" in found[0]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("invoke build --jobz 1", "--jobz"),
        ("invoke test [--units]", "--units"),
        ("invoke bild", "bild"),
        ("llm2wasm convert --model-name x", "--model-name"),
        ("llm2wasm batch collate SPEC", "collate"),
    ],
)
def test_a_planted_wrong_command_in_the_text_is_reported(text, reason):
    message = mention_problem(text, COLLECTION)
    assert message and reason in message, message


def test_commands_named_in_the_text_that_exist_pass():
    for text in [
        "invoke build --jobs 1",
        "invoke test [--unit]",
        "invoke preview OUT [--port N]",
        "invoke publish --to REPO",
        "invoke mirror up\\|down\\|status",
        "invoke TASK --help",
        "invoke convert --no-wgsl-repair",
        "llm2wasm batch run /etc/llm2wasm/models.toml --root /data --output /data/out",
        "llm2wasm convert",
        "llm2wasm SUBCOMMAND --help",
    ]:
        assert mention_problem(text, COLLECTION) is None, text


def test_checking_leaves_the_tasks_help_texts_alone():
    """invoke's get_arguments() pops help texts off a task: the check reads copies."""
    before = {name: dict(COLLECTION[name].help) for name in COLLECTION.task_names}
    invoke_problem(["convert", "m", "-q", "q", "-o", "o"], COLLECTION)
    assert {name: dict(COLLECTION[name].help) for name in COLLECTION.task_names} == before
