"""The command reference, docs/COMMANDS.md, rendered from the code so that it cannot drift.

Every `invoke` task of tasks.py (its docstring, and each option with the help text the task gives
invoke) and every `llm2wasm` subcommand of the image's command line (llm2wasm.image.cli's argparse
parser: each option with its help). tests/unit/test_commandref.py fails when docs/COMMANDS.md differs
from what this renders, and a task option without help text fails the rendering itself. Regenerate
the page from the repository root with

    python -m llm2wasm.host.commandref > docs/COMMANDS.md

(it imports ./tasks.py, the task collection `invoke` runs).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

REGENERATE = "python -m llm2wasm.host.commandref > docs/COMMANDS.md"
NO_HELP = "*(no help text)*"


class MissingHelp(ValueError):
    """Options of invoke tasks that have no help text (`invoke TASK --help` would show them bare)."""

    def __init__(self, options: list[str]):
        self.options = options
        super().__init__("task options without help text (give each a help= entry in tasks.py): " + ", ".join(options))


# --- invoke tasks ------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _task_arguments(collection: Any, name: str) -> list[Any]:
    """The task's arguments, as `invoke TASK --help` shows them.

    invoke's Task.get_arguments() pops each help text off the task as it reads it (a second call
    finds none), so it is asked of a copy, and the task keeps its help for whoever asks next."""
    task = copy.copy(collection[name])
    task.help = dict(task.help or {})
    return task.get_arguments()


def task_options_without_help(collection: Any) -> list[str]:
    """`invoke TASK --option` for every task option that has no help text."""
    missing = []
    for name in collection.task_names:
        for argument in _task_arguments(collection, name):
            if not (argument.help or "").strip():
                missing.append(f"invoke {name} --{argument.names[0]}")
    return missing


def _long_name(argument: Any) -> str:
    return argument.names[0]


def _flag(name: str) -> str:
    return f"-{name}" if len(name) == 1 else f"--{name}"


def _task_flag(argument: Any) -> str:
    """The flags invoke accepts for the option: its name, and the short flag it picked. Where no
    letter of the name was left, invoke picks '-' (shown as `--` by `invoke TASK --help`), which is
    no usable flag and left out here."""
    long, *shorts = argument.names
    flags = [f"--[no-]{long}" if argument.kind is bool and argument.default is True else _flag(long)]
    flags += [_flag(name) for name in shorts if len(name) == 1 and name.isalnum()]
    return ", ".join(f"`{flag}`" for flag in flags)


def _task_value(argument: Any) -> str:
    if argument.kind is bool or argument.positional:
        return ""
    metavar = _long_name(argument).replace("-", "_").upper()
    if argument.kind is list:
        return f"{metavar} (repeatable)"
    return metavar


def _task_default(argument: Any) -> str:
    if argument.kind is bool:
        return "on" if argument.default else "off"
    if argument.default in (None, [], ""):
        return ""
    return f"`{argument.default}`"


def _task_usage(name: str, arguments: list[Any]) -> str:
    positionals = [_long_name(argument).replace("-", "_").upper() for argument in arguments if argument.positional]
    options = " [--options]" if any(not argument.positional for argument in arguments) else ""
    return " ".join([f"invoke {name}{options}", *positionals])


def render_task(collection: Any, name: str) -> str:
    task = collection[name]
    arguments = _task_arguments(collection, name)
    lines = [f"### `invoke {name}`", "", "```text", _task_usage(name, arguments), "```", ""]
    doc = inspect.cleandoc(task.__doc__ or "")
    if doc:
        lines += [doc, ""]
    if arguments:
        lines += ["| option | value | default | what |", "| --- | --- | --- | --- |"]
        for argument in arguments:
            flag = _task_flag(argument)
            if argument.positional:
                flag = f"{_long_name(argument).replace('-', '_').upper()} (or {flag})"
            lines.append(
                f"| {flag} | {_task_value(argument)} | {_task_default(argument)} | {_cell(argument.help or NO_HELP)} |"
            )
        lines.append("")
    return "\n".join(lines)


def render_tasks(collection: Any) -> str:
    missing = task_options_without_help(collection)
    if missing:
        raise MissingHelp(missing)
    return "\n".join(render_task(collection, name) for name in collection.task_names)


# --- the llm2wasm command (argparse) -----------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def subcommands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = (), summary: str = ""
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """Every (sub)command of the parser, depth first: its words after `llm2wasm`, parser, one-line help."""
    found = [(prefix, parser, summary)]
    action = _subparsers(parser)
    if action is not None:
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        for name, sub in action.choices.items():
            found += subcommands(sub, (*prefix, name), helps.get(name, ""))
    return found


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    if "%" not in action.help:
        return action.help
    return parser._get_formatter()._expand_help(action)


def _cli_flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest.upper()
    longs = [name for name in action.option_strings if name.startswith("--")]
    shorts = [name for name in action.option_strings if not name.startswith("--")]
    return ", ".join(f"`{name}`" for name in longs + shorts)


def _cli_value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        return " \\| ".join(f"`{choice}`" for choice in action.choices)
    if action.option_strings:
        return action.metavar or action.dest.upper()
    return ""


def _cli_default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0 and action.default is False:
        return "off"
    if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
        return ""
    return f"`{action.default}`"


def _cli_usage(words: tuple[str, ...], parser: argparse.ArgumentParser) -> str:
    parts = ["llm2wasm", *words]
    optional = False
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            optional = True
            continue
        if isinstance(action, argparse._SubParsersAction):
            parts.append(action.metavar or "COMMAND")
        elif not action.option_strings:
            parts.append(action.metavar or action.dest.upper())
        elif action.required:
            parts.append(f"{action.option_strings[0]} {action.metavar or action.dest.upper()}")
        else:
            optional = True
    if optional:
        parts.append("[options]")
    return " ".join(parts)


def render_subcommand(words: tuple[str, ...], parser: argparse.ArgumentParser, summary: str) -> str:
    lines = [f"### `{' '.join(('llm2wasm', *words))}`", "", "```text", _cli_usage(words, parser), "```", ""]
    text = " ".join(part for part in (summary, parser.description or "") if part)
    if text:
        lines += [text[0].upper() + text[1:] + ("" if text.endswith(".") else "."), ""]
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name in action.choices:
                rows.append(f"| `{name}` | subcommand | | {_cell(helps.get(name) or NO_HELP)} |")
            continue
        help_text = _help_text(parser, action) or NO_HELP
        rows.append(f"| {_cli_flag(action)} | {_cli_value(action)} | {_cli_default(action)} | {_cell(help_text)} |")
    if rows:
        lines += ["| option | value | default | what |", "| --- | --- | --- | --- |", *rows, ""]
    return "\n".join(lines)


def cli_options_without_help(parser: argparse.ArgumentParser) -> list[str]:
    """`llm2wasm SUBCOMMAND --option` for every argument of the command line that has no help text."""
    missing = []
    for words, sub, _ in subcommands(parser):
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction) or action.help:
                continue
            name = action.option_strings[0] if action.option_strings else (action.metavar or action.dest.upper())
            missing.append(" ".join(("llm2wasm", *words, name)))
    return missing


def render_cli(parser: argparse.ArgumentParser) -> str:
    return "\n".join(render_subcommand(words, sub, summary) for words, sub, summary in subcommands(parser))


# --- the page ----------------------------------------------------------------------------------------


def _anchor(heading: str) -> str:
    return heading.replace("`", "").lower().replace(" ", "-")


def render(collection: Any, parser: argparse.ArgumentParser) -> str:
    """docs/COMMANDS.md: every invoke task of the collection and every subcommand of the parser."""
    task_names = list(collection.task_names)
    commands = [" ".join(("llm2wasm", *words)) for words, _, _ in subcommands(parser)]
    lines = [
        "# Command reference",
        "",
        f"<!-- Generated from the code: {REGENERATE} (from the repository root). Do not edit by hand; -->",
        "<!-- tests/unit/test_commandref.py fails when this page and the help texts differ. -->",
        "",
        "Every `invoke` task (tasks.py, run on your machine) and every `llm2wasm` subcommand (the command in",
        "the image, its `ENTRYPOINT`), with the help each one gives. `invoke TASK --help` and",
        "`llm2wasm SUBCOMMAND --help` print the same. The pages of [docs/](../README.md#where-to-go-next)",
        "explain what the commands do; this page lists every option.",
        "",
        "## invoke tasks",
        "",
        " · ".join(f"[`{name}`](#{_anchor(f'invoke {name}')})" for name in task_names),
        "",
        render_tasks(collection),
        "## The `llm2wasm` command (in the image)",
        "",
        "`invoke convert`, `invoke preview` and `invoke batch` run it in the built image; by hand it is",
        "`docker run ... llm2wasm:app-PROFILE SUBCOMMAND ...` (docs/CONVERT.md, docs/BATCH.md).",
        "",
        " · ".join(f"[`{command}`](#{_anchor(command)})" for command in commands),
        "",
        render_cli(parser),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def load_collection(root: Path) -> Any:
    """The task collection of ROOT/tasks.py, as `invoke` loads it: a fresh module, whose tasks still
    hold every help text (see _task_arguments)."""
    from invoke import Collection

    spec = importlib.util.spec_from_file_location("llm2wasm_commandref_tasks", root / "tasks.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(root / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Collection.from_module(module)


def main(argv: list[str] | None = None) -> int:
    from llm2wasm.image.cli import build_parser

    root = Path(argv[0]) if argv else Path.cwd()
    try:
        page = render(load_collection(root.resolve()), build_parser())
    except MissingHelp as error:
        print(f"commandref: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
