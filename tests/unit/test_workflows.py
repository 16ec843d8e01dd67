"""The GitHub workflows: least privilege, actions pinned by commit, push only from main or tags,
and CI calling what this repository's own CI runs. (actionlint has no installable build here.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / ".github" / "workflows").glob("*.yml"))


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def test_there_are_ci_publish_and_convert_workflows():
    assert {path.name for path in WORKFLOWS} == {"ci.yml", "publish.yml", "convert.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege_and_pinned_actions(path):
    workflow = load(path)
    assert workflow["permissions"] == {}
    for job in workflow["jobs"].values():
        assert "permissions" in job
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]


def test_publish_pushes_only_from_main_or_tags():
    workflow = load(next(p for p in WORKFLOWS if p.name == "publish.yml"))
    steps = workflow["jobs"]["image"]["steps"]
    pushing = [s for s in steps if "login" in s.get("uses", "") or "invoke publish" in s.get("run", "")]
    assert len(pushing) == 2
    for step in pushing:
        assert "refs/heads/main" in step["if"] and "refs/tags/v" in step["if"] and "pull_request" in step["if"]
    build = next(s for s in steps if "invoke build" in s.get("run", ""))
    assert steps.index(build) < steps.index(pushing[0])
    # no --no-selftest: the build's gate converts in the image; then the browser check, before any push
    assert "--no-selftest" not in build["run"]
    browser = next(s for s in steps if "invoke browser-check" in s.get("run", ""))
    assert steps.index(build) < steps.index(browser) < steps.index(pushing[0])
    assert '--summary "$GITHUB_STEP_SUMMARY"' in browser["run"] and "if" not in browser
    assert "--quantization q4f32_1" in browser["run"]  # the 4-bit path too, not only f32 weights
    assert "schedule" in workflow["on"]


def test_ci_runs_the_same_script_as_this_repository():
    workflow = load(next(p for p in WORKFLOWS if p.name == "ci.yml"))
    runs = [s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"]]
    assert any(".ci/run" in run for run in runs)
    assert "invoke lint" in runs and "invoke test --unit" in runs


def test_publish_puts_the_build_report_in_the_job_summary():
    text = next(path for path in WORKFLOWS if path.name == "publish.yml").read_text()
    assert "--report build-report.md" in text and 'cat build-report.md >> "$GITHUB_STEP_SUMMARY"' in text


def test_convert_fans_out_one_job_per_item_and_collects_them(tmp_path):
    import json

    from llm2wasm.cli import main as llm2wasm

    workflow = load(next(p for p in WORKFLOWS if p.name == "convert.yml"))
    assert {"workflow_call", "workflow_dispatch"} <= set(workflow["on"])
    assert workflow["on"]["workflow_call"]["inputs"]["spec"]["required"] is True
    plan, convert, collect = (workflow["jobs"][name] for name in ("plan", "convert", "collect"))
    matrix_step = next(s for s in plan["steps"] if "batch matrix" in s.get("run", ""))
    assert "batch check" in matrix_step["run"] and "matrix=$(docker run" in matrix_step["run"]
    assert plan["outputs"]["matrix"] == "${{ steps.matrix.outputs.matrix }}" and matrix_step["id"] == "matrix"
    strategy = convert["strategy"]
    assert strategy["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}" and strategy["fail-fast"] is False
    run = next(s for s in convert["steps"] if "batch run" in s.get("run", ""))
    assert run["env"]["ITEM"] == "${{ matrix.item }}" and '--item "$ITEM"' in run["run"]
    assert "--network none" in run["run"] and '--user "$(id -u):$(id -g)"' in run["run"]
    upload = next(s for s in convert["steps"] if "upload-artifact" in s.get("uses", ""))
    assert upload["if"] == "always()" and upload["with"]["include-hidden-files"] is True  # out/.batch/
    assert collect["needs"] == "convert" and collect["if"] == "always()"
    download = next(s for s in collect["steps"] if "download-artifact" in s.get("uses", ""))
    assert download["with"] == {"pattern": "item-*", "path": "out", "merge-multiple": True}
    assert any("batch collect" in s.get("run", "") and "GITHUB_STEP_SUMMARY" in s["run"] for s in collect["steps"])
    # the fields the workflow reads from the matrix are the ones `llm2wasm batch matrix` writes
    (tmp_path / "m").mkdir()
    (tmp_path / "models.toml").write_text('[[model]]\npath = "m"\nquantizations = ["q0f32"]\n')
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert llm2wasm(["batch", "matrix", str(tmp_path / "models.toml")]) == 0
    (entry,) = json.loads(out.getvalue())["include"]
    text = next(p for p in WORKFLOWS if p.name == "convert.yml").read_text()
    for field in ("item", "model_id"):
        assert f"matrix.{field}" in text and field in entry
