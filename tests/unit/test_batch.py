"""The batch spec: validated as a whole, expanded into items; the item command; collecting the bundles;
the GitHub matrix made from the same spec (the Kubernetes manifests: test_batch_k8s.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.image.batch import status as batch_status
from llm2wasm.image.batch.command import item_index
from llm2wasm.image.batch.github import matrix
from llm2wasm.image.batch.spec import load_spec, parse_spec
from llm2wasm.image.batch.status import collect
from llm2wasm.image.cli import main as llm2wasm
from tests.unit.conftest import SPEC
from tests.unit.test_batch_status import finished


def problems_of(text: str, root: Path) -> str:
    with pytest.raises(UsageError) as raised:
        parse_spec(text, root / "models.toml", check_paths=True)
    assert raised.value.exit_code == 2
    return str(raised.value)


def test_items_are_one_model_in_one_quantization_in_spec_order(spec_dir):
    spec = load_spec(spec_dir / "models.toml")
    assert spec.base_url == "https://models.example.com/webllm/"
    assert [(i.index, i.model_id, i.quantization) for i in spec.items] == [
        (0, "qwen-support-q4f16_1", "q4f16_1"),
        (1, "qwen-support-q0f32", "q0f32"),
        (2, "llama-q4f16_1", "q4f16_1"),  # model_id defaults to the folder's name; quantization from defaults
    ]
    first, _, llama = spec.items
    assert first.adapter == "adapters/support" and first.conv_template == "chatml" and first.context_window == 2048
    assert llama.adapter is None and llama.prefill_chunk_size == 1024 and llama.resources["gpu"] == "1"
    assert first.link_opt is None and llama.link_opt == "O3"  # None: convert's own default


def test_an_item_is_the_convert_command_with_its_bundle_in_out_model_id(spec_dir):
    spec = load_spec(spec_dir / "models.toml")
    argv = spec.items[0].convert_argv(spec.root, Path("/output"), spec.base_url)
    assert argv == [
        f"{spec_dir}/models/qwen",
        "--quantization",
        "q4f16_1",
        "--output",
        "/output/qwen-support-q4f16_1",
        "--model-id",
        "qwen-support-q4f16_1",
        "--base-url",
        "https://models.example.com/webllm/qwen-support-q4f16_1/",
        "--adapter",
        f"{spec_dir}/adapters/support",
        "--conv-template",
        "chatml",
        "--context-window",
        "2048",
    ]
    # every argument is one `llm2wasm convert` accepts
    from llm2wasm.image.cli import build_parser

    parsed = build_parser().parse_args(["convert", *argv])
    assert parsed.adapter.endswith("adapters/support") and parsed.context_window == 2048
    assert "--link-opt" not in argv and parsed.link_opt == "O2"
    llama = spec.items[2].convert_argv(spec.root, Path("/output"), spec.base_url)
    assert llama[-2:] == ["--link-opt", "O3"] and build_parser().parse_args(["convert", *llama]).link_opt == "O3"


def test_every_problem_is_listed_with_its_entry(spec_dir):
    text = """
base_url = "models.example.com"
colour = "blue"
[defaults]
quantisations = ["q4f16_1"]
[[model]]
path = "models/qwen"
quantizations = ["q4f16_1", "q3"]
context_window = 0
[[model]]
path = "models/missing"
model_id = "bad id"
[[model]]
path = "../outside"
quantizations = ["q0f32"]
[[model]]
path = "models/llama"
[[model]]
path = "models/llama"
quantizations = ["q0f32"]
adapter = "adapters/nope"
resources = { cpus = "2" }
link_opt = "O1"
"""
    message = problems_of(text, spec_dir)
    expected = [
        "base_url 'models.example.com' is not an absolute http(s) URL",
        "unknown key 'colour'",
        "[defaults]: unknown key 'quantisations' (did you mean 'quantizations'?)",
        "model 0 (models/qwen): quantization 'q3' is not an mlc_llm name",
        "model 0 (models/qwen): context_window must be a positive number of tokens, not 0",
        "model 1 (models/missing): path 'models/missing' is not a folder under",
        "model 1 (models/missing): model_id 'bad id' must be letters",
        "model 2 (../outside): path '../outside' must be a folder below the spec's folder",
        "model 3 (models/llama): no quantizations",
        "model 4 (models/llama): adapter 'adapters/nope' is not a folder under",
        "model 4 (models/llama): unknown resource 'cpus' (did you mean 'cpu'?)",
        "model 4 (models/llama): link_opt must be one of O2, O3 (emcc's -O level of the link), not 'O1'",
        "nothing was converted",
    ]
    for text_part in expected:
        assert text_part in message, text_part


def test_model_ids_must_be_unique(spec_dir):
    text = SPEC + '\n[[model]]\npath = "models/qwen"\nmodel_id = "qwen-support"\nquantizations = ["q0f32"]\n'
    message = problems_of(text, spec_dir)
    assert "model_id 'qwen-support-q0f32' is also model 0's" in message


def test_not_toml_and_no_models(spec_dir):
    assert "is not valid TOML" in problems_of("[[model]\n", spec_dir)
    assert "no models" in problems_of('base_url = "https://a.example/"\n', spec_dir)
    with pytest.raises(UsageError, match=r"batch spec .* not found"):
        load_spec(spec_dir / "nope.toml")


def test_item_number_from_the_argument_or_the_indexed_job(monkeypatch, spec_dir):
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert item_index(1) == 1
    with pytest.raises(UsageError, match="pass --item N, or set JOB_COMPLETION_INDEX"):
        item_index(None)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert item_index(None) == 2
    spec = load_spec(spec_dir / "models.toml")
    with pytest.raises(UsageError, match=r"item 3 is not in .*: it has items 0 to 2"):
        spec.item(3)


def fake_bundle(output: Path, spec, item, status: str = "ok") -> None:
    """An item run to its end: its complete bundle (the library 8 bytes; vram_required_MB 12.5) and record."""
    finished(output, spec, item, status, work=output.parent / "work")


def test_collect_lists_every_bundle_that_succeeded_and_reports_the_rest(spec_dir, tmp_path):
    spec = load_spec(spec_dir / "models.toml")
    out = tmp_path / "out"
    fake_bundle(out, spec, spec.items[0])
    fake_bundle(out, spec, spec.items[1], status="failed")
    results, app_config = collect(spec, out)
    assert [record["model_id"] for record in app_config["model_list"]] == ["qwen-support-q4f16_1"]
    assert [outcome.status for outcome in results] == ["ok", "failed", "not run"]
    assert json.loads((out / "app-config.json").read_text()) == app_config
    report = json.loads((out / "batch-report.json").read_text())
    assert report["items"][0] | {"library_bytes": 8, "vram_required_MB": 12.5, "reason": None} == report["items"][0]
    assert [row["status"] for row in report["items"]] == ["ok", "failed", "not run"]
    rendered = batch_status.table(results)
    assert "| 0 | qwen-support-q4f16_1 | q4f16_1 | ok | 3 s | 0.0 MB | 12.5 |" in rendered, rendered
    assert "| 2 | llama-q4f16_1 | q4f16_1 | not run |" in rendered


def test_collect_command_exits_1_when_an_item_did_not_succeed(spec_dir, tmp_path, capsys):
    spec = load_spec(spec_dir / "models.toml")
    out = tmp_path / "out"
    for item in spec.items:
        fake_bundle(out, spec, item)
    assert llm2wasm(["batch", "collect", str(spec_dir / "models.toml"), "-o", str(out)]) == 0
    shutil.rmtree(out / spec.items[2].model_id)  # reported done, but its bundle is gone
    assert llm2wasm(["batch", "collect", str(spec_dir / "models.toml"), "-o", str(out)]) == 1
    assert "2 of 3 bundle(s)" in capsys.readouterr().err


def test_bad_spec_exits_2_from_every_step(spec_dir, capsys):
    (spec_dir / "bad.toml").write_text('[[model]]\npath = "models/qwen"\n')
    assert llm2wasm(["batch", "check", str(spec_dir / "bad.toml")]) == 2
    assert "no quantizations" in capsys.readouterr().err
    assert llm2wasm(["batch", "run", str(spec_dir / "bad.toml"), "--item", "0", "-o", str(spec_dir / "o")]) == 2
    assert not (spec_dir / "o").exists()


def test_matrix_for_github_actions(spec_dir, capsys):
    assert llm2wasm(["batch", "matrix", str(spec_dir / "models.toml")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == matrix(load_spec(spec_dir / "models.toml"))
    assert [entry["item"] for entry in data["include"]] == [0, 1, 2]
    assert data["include"][2] == {"item": 2, "model_id": "llama-q4f16_1", "quantization": "q4f16_1"}


@pytest.mark.parametrize(
    "entry,problem",
    [
        ('path = "../outside"', "must be a folder below the spec's folder"),
        ('path = "/etc"', "must be a folder below the spec's folder"),
        ('path = "models/qwen/../../.."', "must be a folder below the spec's folder"),
        ('path = "models/qwen"\nadapter = "../../home/user/.ssh"', "must be a folder below the spec's folder"),
        ('path = "models/link-out"', "is a symlink out of the spec's folder"),
        ('path = "models/qwen"\nmodel_id = "../../x"', "must be letters, digits"),
        ('path = "models/qwen"\nmodel_id = ".hidden"', "must be letters, digits"),
        ('path = "models/qwen"\nquantizations = ["../q4f16_1"]', "is not an mlc_llm name"),
    ],
)
def test_a_spec_cannot_name_anything_outside_its_folder(spec_dir, tmp_path_factory, entry, problem):
    """A spec from someone else names folders; none may lead out of the spec's folder, and no name it
    gives may become a path (traversal names, absolute paths, symlinks out)."""
    outside = tmp_path_factory.mktemp("outside")
    (spec_dir / "models" / "link-out").symlink_to(outside)
    text = f'[defaults]\nquantizations = ["q4f16_1"]\n\n[[model]]\n{entry}\n'
    assert problem in problems_of(text, spec_dir)
