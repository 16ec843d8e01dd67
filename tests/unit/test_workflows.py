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


def test_there_are_ci_and_publish_workflows():
    assert {path.name for path in WORKFLOWS} == {"ci.yml", "publish.yml"}


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
    assert "schedule" in workflow["on"]


def test_ci_runs_the_same_script_as_this_repository():
    workflow = load(next(p for p in WORKFLOWS if p.name == "ci.yml"))
    runs = [s.get("run", "") for job in workflow["jobs"].values() for s in job["steps"]]
    assert any(".ci/run" in run for run in runs)
    assert "invoke lint" in runs and "invoke test --unit" in runs


def test_publish_puts_the_build_report_in_the_job_summary():
    text = next(path for path in WORKFLOWS if path.name == "publish.yml").read_text()
    assert "--report build-report.md" in text and 'cat build-report.md >> "$GITHUB_STEP_SUMMARY"' in text
