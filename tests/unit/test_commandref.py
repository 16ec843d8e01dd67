"""docs/COMMANDS.md is what the code's help texts say, and every task option has a help text.

The page is rendered from the invoke collection of tasks.py and the `llm2wasm` command's argparse
parser (llm2wasm.host.commandref), so a help text changed in the code and not on the page, or the
reverse, fails here with the command that fixes it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Collection, task

from llm2wasm.host import commandref
from llm2wasm.image import cli

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "COMMANDS.md"

# llm2wasm options that have no help text yet (the image's command line, not tasks.py): this list
# may only shrink. A new option without help fails below.
CLI_OPTIONS_WITHOUT_HELP_YET = {"llm2wasm batch collect --output"}


def test_docs_commands_md_is_the_rendered_reference():
    rendered = commandref.render(commandref.load_collection(ROOT), cli.build_parser())
    assert PAGE.exists(), f"docs/COMMANDS.md is missing: {commandref.REGENERATE}"
    assert PAGE.read_text() == rendered, (
        f"docs/COMMANDS.md differs from the help texts in tasks.py and the llm2wasm command; regenerate it from the "
        f"repository root with `{commandref.REGENERATE}` (and review the diff)"
    )


def test_the_reference_has_every_task_option_and_every_subcommand():
    collection = commandref.load_collection(ROOT)
    page = commandref.render(collection, cli.build_parser())
    for name in collection.task_names:
        assert f"### `invoke {name}`" in page
    for words, _, _ in commandref.subcommands(cli.build_parser()):
        assert f"### `{' '.join(('llm2wasm', *words))}`" in page
    # the options, as invoke takes them
    for flag in ("`--profile`, `-p`", "`--set`, `-s`", "`--[no-]wgsl-repair`", "`--public-url`", "`-k`"):
        assert flag in page, flag
    assert "`--link-opt` | `O2` \\| `O3` | `O2` |" in page


def test_every_task_option_has_help_text():
    assert commandref.task_options_without_help(commandref.load_collection(ROOT)) == []


def test_a_planted_task_option_without_help_text_fails_the_rendering():
    @task(help={"profile": "which profile"})
    def planted(c, profile="stable", shiny=False):
        """A task whose --shiny has no help."""

    collection = Collection(planted)
    assert commandref.task_options_without_help(collection) == ["invoke planted --shiny"]
    with pytest.raises(commandref.MissingHelp, match="invoke planted --shiny"):
        commandref.render(collection, cli.build_parser())


def test_a_task_keeps_its_help_texts_after_being_rendered():
    """invoke's get_arguments() pops help texts off a task; rendering twice gives the same page."""
    collection = commandref.load_collection(ROOT)
    parser = cli.build_parser()
    assert commandref.render(collection, parser) == commandref.render(collection, parser)


def test_llm2wasm_options_without_help_do_not_grow():
    missing = set(commandref.cli_options_without_help(cli.build_parser()))
    assert missing <= CLI_OPTIONS_WITHOUT_HELP_YET, f"give these llm2wasm options a help text: {missing}"


def test_a_planted_llm2wasm_option_without_help_is_found():
    parser = argparse.ArgumentParser(prog="llm2wasm")
    sub = parser.add_subparsers(dest="command")
    convert = sub.add_parser("convert", help="convert")
    convert.add_argument("--shiny", action="store_true")
    assert commandref.cli_options_without_help(parser) == ["llm2wasm convert --shiny"]
    assert commandref.NO_HELP in commandref.render_cli(parser)


def test_the_module_writes_the_page_to_stdout():
    result = subprocess.run(
        [sys.executable, "-m", "llm2wasm.host.commandref"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "COLUMNS": "40"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == commandref.render(commandref.load_collection(ROOT), cli.build_parser())
