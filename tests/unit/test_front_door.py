"""The front door: what a new user meets first answers with help, or says what to do next on this machine.

Issue 29's list, each tried as a new user would: `invoke TASK --help` for every task (positional
arguments once swallowed `--help`), `llm2wasm SUBCOMMAND --help`, the host's `llm2wasm convert`
(no mlc_llm outside the image), the hermetic profile's pins when the mirror is down, an unknown
architecture (asked about first, before any template), `invoke --list` descriptions that end where
their sentence does, and a bundle README naming the user's folder rather than the mount point.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Collection

from llm2wasm.errors import UsageError
from llm2wasm.host.preflight.fetching import LOCAL_MIRROR_FIX, UNREACHABLE_FIX, SourceFailed, unreachable_fix
from llm2wasm.image import cli, hostpaths
from llm2wasm.image.convert.inputs import build_request
from llm2wasm.image.convert.mlc import MlcNames
from tests.unit.test_convert_inputs import NAMES, args, make_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

COLLECTION = Collection.from_module(tasks)
INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


@pytest.mark.parametrize("name", sorted(COLLECTION.task_names))
def test_every_task_answers_help_after_its_name(name):
    result = subprocess.run([*INVOKE, name, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Usage: inv[oke] [--core-opts] {name} " in result.stdout, result.stdout + result.stderr


def test_a_task_with_a_positional_argument_still_takes_a_value_named_like_a_flag_only_for_help(tmp_path):
    """The --help check looks at the values invoke hands the task: a real value goes through."""
    result = subprocess.run([*INVOKE, "mirror", "sideways"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "the action is one of up, down, status" in result.stderr


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subcommands(sub, (*prefix, name))
    return found


@pytest.mark.parametrize("argv", _subcommands(cli.build_parser()), ids=lambda argv: " ".join(argv) or "llm2wasm")
def test_every_llm2wasm_subcommand_answers_help(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: llm2wasm")


def test_no_task_option_has_a_short_flag_that_is_punctuation_or_h():
    """invoke gives an option the first free character of its name: `-` for --no-preflight showed
    and parsed as `--`, and `-h` for preview's --host is what everyone types for help."""
    bad = {
        f"{name} --{argument.name}": sorted(argument.names)
        for name in COLLECTION.task_names
        for argument in COLLECTION[name].get_arguments()
        if any(len(flag) == 1 and (not flag.isalnum() or flag == "h") for flag in argument.names)
    }
    assert not bad, bad


def test_every_task_description_in_the_list_is_a_whole_sentence():
    """`invoke --list` shows a docstring's first line: it must be a sentence, not half of one."""
    cut = {
        name: COLLECTION[name].__doc__.strip().splitlines()[0]
        for name in COLLECTION.task_names
        if not COLLECTION[name].__doc__.strip().splitlines()[0].rstrip().endswith(".")
    }
    assert not cut, f"first docstring lines that do not end a sentence: {cut}"


def test_llm2wasm_convert_outside_the_image_says_how_to_run_it(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlc_llm" else real_find_spec(name, *a)
    )
    status = cli.main(["convert", str(make_model(tmp_path / "m")), "-q", "q4f16_1", "-o", str(tmp_path / "out")])
    assert status == 2
    message = capsys.readouterr().err
    assert "runs inside the llm2wasm image" in message and "invoke convert MODEL_DIR" in message
    assert "--profile" in message and "hermetic" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("source", "fix"),
    [
        ("http://127.0.0.1:38471/", LOCAL_MIRROR_FIX),
        ("git://127.0.0.1:38472/emsdk", LOCAL_MIRROR_FIX),
        ("127.0.0.1:38474/llm2wasm-hermetic/debian:bookworm", LOCAL_MIRROR_FIX),
        ("http://localhost:8080/simple", LOCAL_MIRROR_FIX),
        ("https://pypi.org/simple/torch/", UNREACHABLE_FIX),
        ("https://mlc.ai/wheels", UNREACHABLE_FIX),
        ("docker.io/library/ubuntu:24.04", UNREACHABLE_FIX),
    ],
)
def test_an_unreachable_local_mirror_is_answered_with_invoke_mirror_up(source, fix):
    assert unreachable_fix(source) == fix
    assert SourceFailed.unreachable(source, "connection refused").result(("pin",)).fix == fix
    assert ("invoke mirror up" in fix) == (fix == LOCAL_MIRROR_FIX)


WITH_ARCHITECTURES = MlcNames(NAMES.quantizations, NAMES.conv_templates, ("gemma3_text", "llama", "qwen2", "qwen3"))


def test_an_unknown_architecture_is_named_before_any_template_question(tmp_path):
    """No chat template and an architecture mlc_llm lacks: the architecture is the problem to name."""
    model = make_model(tmp_path / "m", model_type="qwen3_moe_vl")
    with pytest.raises(UsageError) as raised:
        build_request(args(model, tmp_path / "out", conv_template=None), WITH_ARCHITECTURES, lambda _: False)
    message = str(raised.value)
    assert "cannot convert model_type 'qwen3_moe_vl'" in message
    assert "gemma3_text, llama, qwen2, qwen3" in message and "template" not in message


def test_a_near_miss_architecture_is_suggested(tmp_path):
    model = make_model(tmp_path / "m", model_type="Qwen2")
    with pytest.raises(UsageError, match=r"did you mean 'qwen2'"):
        build_request(args(model, tmp_path / "out"), WITH_ARCHITECTURES, lambda _: False)


def test_a_known_architecture_passes_and_unread_architectures_are_not_checked(tmp_path):
    model = make_model(tmp_path / "m")
    assert build_request(args(model, tmp_path / "a"), WITH_ARCHITECTURES, lambda _: False).model_dir == model
    odd = make_model(tmp_path / "odd", model_type="not_read_here")
    assert build_request(args(odd, tmp_path / "b"), NAMES, lambda _: False).model_dir == odd


def test_a_bundle_names_the_users_folder_not_the_mount_point(monkeypatch):
    monkeypatch.setenv(
        hostpaths.HOST_PATHS_VARIABLE, json.dumps({"/input/model": "/home/ada/models/llama-ft", "/output/x": "/o"})
    )
    assert hostpaths.shown_name(Path("/input/model")) == "llama-ft"
    assert hostpaths.shown_name(Path("/elsewhere/m")) == "m"
    monkeypatch.delenv(hostpaths.HOST_PATHS_VARIABLE)
    assert hostpaths.shown_name(Path("/input/model")) == "model"

    # files fetched from the Hub are named by their id and commit, whole (the org too)
    commit = "4e9db559d6bed3348b13e8645ad28398cdafd858"
    monkeypatch.setenv(hostpaths.HOST_PATHS_VARIABLE, json.dumps({"/input/model": f"org/qwen2@{commit}"}))
    assert hostpaths.shown_name(Path("/input/model")) == f"org/qwen2@{commit}"
