"""The GitHub workflows: least privilege, actions pinned by commit, no checkout that keeps its token,
no unpinned code in a job that holds a write token, no token for the conversion container, pushes
only from main or tags and only of the image the checks passed, convert's default image a tag that
publish pushes, and CI calling what this repository's own CI runs. (actionlint has no installable
build here.) Each rule is a function listing the problems it finds: the tests run it on every
workflow, and on a copy with a violation planted, so that each can be seen to fail."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from llm2wasm.host.pins import resolve_profile
from llm2wasm.host.publish import ImageFacts, tags_for

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))

# Every action a workflow may use, by commit, with the release that commit is (the `# vX.Y.Z`
# comment beside each `uses:` must say the same). Only GitHub's own (actions/*) and Docker's (docker/*).
PINNED_ACTIONS = {
    "actions/checkout": {"11bd71901bbe5b1630ceea73d27597364c9af683": "v4.2.2"},
    "actions/setup-python": {"a26af69be951a213d495a4c3e4e4022e16d87065": "v5.6.0"},
    "actions/upload-artifact": {"ea165f8d65b6e75b540449e92b4886f43607fa02": "v4.6.2"},
    "actions/download-artifact": {"d3f86a106a0bac45b974a628896c90dbdf5c8093": "v4.3.0"},
}
ALLOWED_OWNERS = ("actions", "docker")
# actions/* or docker/* actions allowed by a tag instead of a commit, each one on purpose: none.
TAG_PINNED_ACTIONS: set[str] = set()

# The only jobs that may hold a write permission, and exactly which; every other job reads its
# repository at most. A job holding a write token may use only these actions.
WRITE_JOBS = {("publish.yml", "push"): {"packages": "write", "id-token": "write"}}
WRITE_JOB_ACTIONS = {"actions/download-artifact"}

# What a job holding a write token must not run: code fetched unpinned (or without hashes), a
# browser, the toolkit (its dependencies are unpinned), containers or builds.
UNPINNED = [
    (r"\bpip3?\s+install\b(?![^\n]*--require-hashes)", "pip install without --require-hashes"),
    (r"\b(npm\s+(install|i|exec|x)\b|npx\b|yarn\b|pnpm\b|bunx?\b)", "npm install / npx / yarn / pnpm"),
    (r"\b(playwright|chrome|chromium|google-chrome|firefox|browser-check)\b", "a browser"),
    (r"\b(invoke|llm2wasm|python3?|pipx|uvx?)\b", "the toolkit or Python packages"),
    (r"\bdocker\s+(run|build|create|compose|buildx\s+(build|bake|create))\b", "a container or a build"),
    (r"\b(curl|wget)\b[^\n|]*\|\s*(sudo\s+)?(ba|z)?sh\b", "a downloaded script"),
    (r"\bapt(-get)?\s+install\b", "apt install"),
]
GO_FETCH = re.compile(r"\bgo\s+(install|get|run)\b([^\n]*)")
RELEASE = re.compile(r"@v\d+\.\d+\.\d+(\s|$)")

TOKEN_VALUE = re.compile(r"secrets\.|github\.token|GITHUB_TOKEN|HF_TOKEN|HUGGING", re.IGNORECASE)
TOKEN_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|^HF_|HUGGING", re.IGNORECASE)
ENV_FLAG = re.compile(r"(\s-e\s|\s--env(-file)?\b)")

PUSH_REFS = "github.ref == 'refs/heads/main' || startsWith(github.ref, 'refs/tags/v')"
PUSH_CONDITION = f"github.event_name != 'pull_request' && ({PUSH_REFS})"
# two publish runs on other days and commits: a default that only one of them pushes goes stale
PUBLISH_RUNS = [("0123456789abcdef0123", "20261125"), ("fedcba9876543210fedc", "20270104")]
FACTS = ImageFacts(python="3.12.3", mlc_llm="0.20.0.dev0", emsdk="3.1.56")


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def workflow(name: str) -> dict:
    return load(ROOT / ".github" / "workflows" / name)


def steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def permission_problems(name: str, data: dict) -> list[str]:
    problems = []
    if data.get("permissions") not in ({}, {"contents": "read"}):
        problems.append(f"{name}: top-level permissions {data.get('permissions')!r}, not {{}} or contents: read")
    for job_name, job in data["jobs"].items():
        granted = job.get("permissions")
        if not isinstance(granted, dict):
            problems.append(f"{name} {job_name}: permissions {granted!r}: name each scope")
            continue
        writes = {scope: level for scope, level in granted.items() if level == "write"}
        if writes != WRITE_JOBS.get((name, job_name), {}):
            allowed = WRITE_JOBS.get((name, job_name), {})
            problems.append(f"{name} {job_name}: write permissions {writes}, allowed {allowed}")
        reads = {scope: level for scope, level in granted.items() if level != "write"}
        if not reads.items() <= {"contents": "read"}.items():
            problems.append(f"{name} {job_name}: permissions {reads} beyond contents: read")
    return problems


def checkout_problems(name: str, data: dict) -> list[str]:
    return [
        f"{name} {job_name}: {step['uses']} without persist-credentials: false"
        for job_name, job in data["jobs"].items()
        for step in steps(job)
        if step.get("uses", "").startswith("actions/checkout@")
        and (step.get("with") or {}).get("persist-credentials") is not False
    ]


def action_problems(name: str, data: dict, text: str) -> list[str]:
    problems = []
    uses = [job["uses"] for job in data["jobs"].values() if "uses" in job]
    uses += [step["uses"] for job in data["jobs"].values() for step in steps(job) if "uses" in step]
    for use in uses:
        action, _, ref = use.partition("@")
        if action.split("/")[0] not in ALLOWED_OWNERS or not ref:
            problems.append(f"{name}: {use}: only {ALLOWED_OWNERS} actions, each pinned")
        elif re.fullmatch(r"[0-9a-f]{40}", ref):
            release = PINNED_ACTIONS.get(action, {}).get(ref)
            comments = re.findall(rf"uses:\s*{re.escape(use)}\s*#\s*(\S+)", text)
            if release is None:
                problems.append(f"{name}: {use} is not in PINNED_ACTIONS")
            elif not comments or any(comment != release for comment in comments):
                problems.append(f"{name}: {use} is {release}, its comment says {comments}")
        elif use not in TAG_PINNED_ACTIONS:
            problems.append(f"{name}: {use} is pinned by a tag and not in TAG_PINNED_ACTIONS")
    return problems


def unpinned_commands(script: str) -> list[str]:
    found = [what for pattern, what in UNPINNED if re.search(pattern, script)]
    found += [
        f"go {verb} without a release version" for verb, rest in GO_FETCH.findall(script) if not RELEASE.search(rest)
    ]
    return found


def write_job_problems(name: str, data: dict) -> list[str]:
    problems = []
    for job_name, job in data["jobs"].items():
        granted = job.get("permissions", data.get("permissions"))  # a job without its own inherits them
        if not (granted == "write-all" or (isinstance(granted, dict) and "write" in granted.values())):
            continue
        if "uses" in job:
            problems.append(f"{name} {job_name}: holds a write token and calls {job['uses']}")
        for step in steps(job):
            if "uses" in step and step["uses"].partition("@")[0] not in WRITE_JOB_ACTIONS:
                problems.append(f"{name} {job_name}: holds a write token and uses {step['uses']}")
            problems += [
                f"{name} {job_name}: holds a write token and runs {what}"
                for what in unpinned_commands(step.get("run", ""))
            ]
    return problems


def container_token_problems(name: str, data: dict) -> list[str]:
    problems = []
    for job_name, job in data["jobs"].items():
        for step in steps(job):
            if "docker run" not in step.get("run", ""):
                continue
            env = {**(data.get("env") or {}), **(job.get("env") or {}), **(step.get("env") or {})}
            for key, value in env.items():
                if TOKEN_NAME.search(key) or TOKEN_VALUE.search(str(value)):
                    problems.append(f"{name} {job_name}: {key} reaches a step that runs a container")
            if TOKEN_VALUE.search(step["run"]) or ENV_FLAG.search(step["run"]):
                problems.append(f"{name} {job_name}: a container step hands the container a token or environment")
    return problems


def convert_default_problems(convert: dict, publish: dict) -> list[str]:
    """The convert workflow's default image is a tag that every publish run pushes, of a profile that
    needs no GPU (hosted runners have none), in the repository publish pushes to."""
    build, push = publish["jobs"]["build-and-check"], publish["jobs"]["push"]
    profiles = build["strategy"]["matrix"]["profile"]
    problems = []
    if push["strategy"]["matrix"]["profile"] != profiles:
        problems.append(f"publish pushes {push['strategy']['matrix']['profile']}, builds {profiles}")
    export = next(s for s in steps(build) if "invoke publish" in s.get("run", ""))
    repository = export["env"]["REPOSITORY"]  # `invoke publish --to "${REPOSITORY,,}"` (lowercased)
    for trigger in ("workflow_call", "workflow_dispatch"):
        default = convert["on"][trigger]["inputs"]["image"]["default"]
        image, _, tag = default.rpartition(":")
        owner = image.split("/")[1] if image.count("/") == 2 else ""
        if image != repository.replace("${{ github.repository_owner }}", owner).lower():
            problems.append(f"convert {trigger}: {default} is not in {repository}")
        pushed = [p for p in profiles if all(tag in tags_for(FACTS, p, rev, date) for rev, date in PUBLISH_RUNS)]
        if not pushed:
            every = sorted({t for p in profiles for rev, date in PUBLISH_RUNS for t in tags_for(FACTS, p, rev, date)})
            problems.append(f"convert {trigger}: {default}: not a tag every publish pushes ({every})")
        elif any(resolve_profile(p).cuda for p in pushed):
            problems.append(f"convert {trigger}: {default} is a CUDA profile's image; hosted runners have no GPU")
    return problems


def test_there_are_ci_publish_and_convert_workflows():
    assert {path.name for path in WORKFLOWS} == {"ci.yml", "publish.yml", "convert.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege(path):
    assert permission_problems(path.name, load(path)) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_checkout_drops_its_credentials(path):
    data = load(path)
    assert any(s.get("uses", "").startswith("actions/checkout@") for job in data["jobs"].values() for s in steps(job))
    assert checkout_problems(path.name, data) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_allowed_and_pinned_by_commit(path):
    assert action_problems(path.name, load(path), path.read_text()) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_job_holding_a_write_token_runs_unpinned_code(path):
    assert write_job_problems(path.name, load(path)) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_token_reaches_a_container(path):
    assert container_token_problems(path.name, load(path)) == []


def test_convert_default_image_is_a_tag_publish_pushes():
    assert convert_default_problems(workflow("convert.yml"), workflow("publish.yml")) == []
    # and docs/BATCH.md's example is the same image
    text = (ROOT / "docs" / "BATCH.md").read_text()
    section = text[text.index("## On GitHub Actions") :].split("\n## ")[0]
    default = workflow("convert.yml")["on"]["workflow_call"]["inputs"]["image"]["default"]
    assert re.findall(r"^\s+image: (\S+)", section, re.M) == [default]
    assert set(re.findall(r"ghcr\.io/[\w./-]+:[\w.-]+", section)) == {default}
    assert "app-stable" not in (ROOT / ".github" / "workflows" / "convert.yml").read_text()


def test_the_rules_catch_planted_violations():
    publish, convert, ci = workflow("publish.yml"), workflow("convert.yml"), workflow("ci.yml")

    bad = copy.deepcopy(ci)
    bad["permissions"] = "write-all"
    bad["jobs"]["lint-and-unit"]["permissions"] = {"contents": "write"}
    del bad["jobs"]["hermetic-integration"]["permissions"]
    assert len(permission_problems("ci.yml", bad)) == 3
    bad = copy.deepcopy(publish)
    bad["jobs"]["build-and-check"]["permissions"]["packages"] = "write"
    bad["jobs"]["push"]["permissions"]["contents"] = "write"
    assert len(permission_problems("publish.yml", bad)) == 2

    bad = copy.deepcopy(convert)
    bad["jobs"]["plan"]["steps"][0]["with"].pop("persist-credentials")
    bad["jobs"]["collect"]["steps"][0]["with"]["persist-credentials"] = "false"  # a string is not false
    assert len(checkout_problems("convert.yml", bad)) == 2

    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    for use, planted in [
        ("actions/checkout@v4", "tag"),
        ("someone/checkout@11bd71901bbe5b1630ceea73d27597364c9af683", "owner"),
        ("actions/checkout@" + "0" * 40, "unknown commit"),
    ]:
        bad = copy.deepcopy(ci)
        bad["jobs"]["lint-and-unit"]["steps"][0]["uses"] = use
        assert action_problems("ci.yml", bad, text), planted
    wrong_comment = text.replace("# v4.2.2", "# v4.1.0", 1)
    assert action_problems("ci.yml", ci, wrong_comment)

    for script in [
        "python -m pip install -e .",
        "pip install cosign",
        "npm install -g x",
        "npx playwright test",
        "invoke browser-check",
        "docker run --rm llm2wasm:app-stable",
        "docker buildx build .",
        "curl -fsSL https://example.invalid/install.sh | sudo bash",
        "sudo apt-get install -y skopeo",
        "go install github.com/sigstore/cosign/v3/cmd/cosign@latest",
        "go install ./cmd/cosign",
    ]:
        assert unpinned_commands(script), script
    for script in [
        "pip install --require-hashes -r requirements.txt",
        "go install github.com/sigstore/cosign/v3/cmd/cosign@v3.1.2",
        'skopeo copy --all "oci:x" "docker://y"',
        "docker login ghcr.io --password-stdin",
    ]:
        assert unpinned_commands(script) == [], script
    bad = copy.deepcopy(publish)
    bad["jobs"]["push"]["steps"].insert(0, {"run": "python -m pip install -e '.[toolkit]'"})
    checkout = "actions/checkout@" + next(iter(PINNED_ACTIONS["actions/checkout"]))
    bad["jobs"]["push"]["steps"].insert(0, {"uses": checkout})
    assert len(write_job_problems("publish.yml", bad)) == 3  # the checkout, pip, and python
    bad = copy.deepcopy(ci)
    bad["permissions"] = "write-all"
    del bad["jobs"]["lint-and-unit"]["permissions"]  # inherits write-all, and runs pip install
    assert write_job_problems("ci.yml", bad)

    bad = copy.deepcopy(convert)
    convert_step = next(s for s in bad["jobs"]["convert"]["steps"] if "batch run" in s.get("run", ""))
    convert_step["env"]["HF_TOKEN"] = "${{ secrets.HF_TOKEN }}"
    bad["jobs"]["collect"]["env"] = {"GH": "${{ github.token }}"}
    plan_step = next(s for s in bad["jobs"]["plan"]["steps"] if "batch matrix" in s.get("run", ""))
    plan_step["run"] = plan_step["run"].replace("docker run --rm", "docker run --rm -e GITHUB_TOKEN", 1)
    assert len(container_token_problems("convert.yml", bad)) == 3

    for image, planted in [
        ("ghcr.io/llm2wasm/llm2wasm:app-stable", "the local name, never pushed"),
        ("ghcr.io/llm2wasm/llm2wasm:stable", "a CUDA image"),
        ("ghcr.io/llm2wasm/llm2wasm:cpu-20261125", "one day's tag"),
        ("ghcr.io/llm2wasm/other:cpu", "another repository"),
    ]:
        bad = copy.deepcopy(convert)
        bad["on"]["workflow_dispatch"]["inputs"]["image"]["default"] = image
        assert convert_default_problems(bad, publish), planted
    bad = copy.deepcopy(publish)
    for job in bad["jobs"].values():
        job["strategy"]["matrix"]["profile"] = ["stable"]
    assert convert_default_problems(convert, bad)


def test_publish_builds_and_checks_read_only_and_pushes_only_that_image():
    data = workflow("publish.yml")
    assert set(data["jobs"]) == {"build-and-check", "push"}
    build, push = data["jobs"]["build-and-check"], data["jobs"]["push"]
    assert build["permissions"] == {"contents": "read"}
    assert push["permissions"] == {"packages": "write", "id-token": "write"}
    # push: after the build, only from main or version tags (never a pull request), each profile on its own
    assert push["needs"] == "build-and-check"
    assert push["if"] == "${{ !cancelled() && " + PUSH_CONDITION + " }}"
    order = steps(build)
    build_step = next(s for s in order if "invoke build" in s.get("run", ""))
    browser = next(s for s in order if "invoke browser-check" in s.get("run", ""))
    export = next(s for s in order if "invoke publish" in s.get("run", ""))
    upload = next(s for s in order if s.get("with", {}).get("name") == "llm2wasm-${{ matrix.profile }}-image")
    assert order.index(build_step) < order.index(browser) < order.index(export) < order.index(upload)
    # no --no-selftest: the build's gate converts in the image; then the browser check, before the export
    assert "--no-selftest" not in build_step["run"]
    assert '--summary "$GITHUB_STEP_SUMMARY"' in browser["run"] and "if" not in browser
    assert "--quantization q4f32_1" in browser["run"]  # the 4-bit path too, not only f32 weights
    assert export["if"] == upload["if"] == PUSH_CONDITION
    # the tags come from the image (publish.py's tags_for) and nothing is pushed from this job
    assert '--to "$repository" --no-push' in export["run"] and 'repository="${REPOSITORY,,}"' in export["run"]
    assert "refs.txt" in export["run"] and "docker push --quiet 127.0.0.1:5000/" in export["run"]
    assert not re.search(r"docker push (?!--quiet 127\.0\.0\.1:5000/)", export["run"])
    # SBOM and provenance, and the exported layers are the verified ones
    assert "--sbom=true --provenance=mode=max" in export["run"] and "type=oci," in export["run"]
    assert "rootfs.diff_ids" in export["run"] and ".RootFS.Layers" in export["run"]
    # the push job pushes that artifact, the tags from it checked, and signs its digest
    download = next(s for s in steps(push) if "download-artifact" in s.get("uses", ""))
    assert download["with"]["name"] == upload["with"]["name"]
    check = next(s for s in steps(push) if "refusing to push" in s.get("run", ""))
    pushing = next(s for s in steps(push) if "skopeo copy" in s.get("run", ""))
    login = next(s for s in steps(push) if "docker login" in s.get("run", ""))
    cosign = next(s for s in steps(push) if "cosign@" in s.get("run", ""))
    push_steps = steps(push)
    assert push_steps.index(download) < push_steps.index(check) < push_steps.index(login) < push_steps.index(pushing)
    assert push_steps.index(cosign) < push_steps.index(login)  # nothing is built while logged in
    assert "--all --preserve-digests" in pushing["run"] and "refs.txt" in pushing["run"]
    assert 'cosign" sign --yes "$repository@$digest"' in pushing["run"]
    assert 'cosign" verify' in pushing["run"] and "https://token.actions.githubusercontent.com" in pushing["run"]
    assert pushing["env"]["CERTIFICATE_IDENTITY"] == "https://github.com/${{ github.workflow_ref }}"
    assert re.search(r"go install github\.com/sigstore/cosign/v3/cmd/cosign@v\d+\.\d+\.\d+\n", cosign["run"])
    # the token reaches the login step only
    assert [s for s in push_steps if "secrets." in str(s) or "github.token" in str(s)] == [login]
    assert "schedule" in data["on"]


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

    from llm2wasm.image.cli import main as llm2wasm

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
