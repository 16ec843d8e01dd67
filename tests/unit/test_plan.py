import importlib.util
import io

import pytest
from invoke import Context

from llm2wasm.host import build as build_module
from llm2wasm.host import preflight as preflight_module
from llm2wasm.host.build import build_plan
from llm2wasm.host.pins import PROJECT_ROOT, resolve_profile
from llm2wasm.host.plan import DERIVED, make_plan, pending_value


def test_plan_chains_tags_and_feeds_pins():
    plan = make_plan(resolve_profile("stable"))
    tags = [step.tag for step in plan.steps]
    assert tags[0] == "llm2wasm:base-stable" and tags[-1] == "llm2wasm:app-stable"
    assert plan.steps[0].build_args["BASE_IMAGE"] == "ubuntu:24.04"
    tag_of = {step.layer.name: step.tag for step in plan.steps}
    for step in plan.steps[1:]:
        assert step.build_args["BASE_IMAGE"] == tag_of[step.layer.parent]
    # the web toolchain is built on Python, not on the ML wheels; the join names both images
    assert tag_of["emsdk"] and next(s for s in plan.steps if s.layer.name == "emsdk").build_args["BASE_IMAGE"] == (
        "llm2wasm:python-stable"
    )
    emsdk = next(step for step in plan.steps if step.layer.name == "emsdk")
    assert emsdk.build_args["EMSDK_VERSION"] == "3.1.56"
    assert emsdk.sources["EMSDK_VERSION"] == "emsdk_version"
    runtime = next(step for step in plan.steps if step.layer.name == "runtime-env")
    assert runtime.build_args["BASE_IMAGE"] == "llm2wasm:web-runtime-stable"
    assert runtime.build_args["ML_IMAGE"] == "llm2wasm:ml-stable"
    assert runtime.build_args["CUDA_LIBRARY_PATH"] == DERIVED.format("ml")


def test_overrides_reach_the_build_args():
    plan = make_plan(resolve_profile("stable", ["mlc_llm_ref=main"]), until="web-runtime")
    assert plan.steps[-1].layer.name == "web-runtime"
    assert plan.steps[-1].build_args["MLC_LLM_REF"] == "main"


def test_dry_run_text_names_images_args_and_sources():
    text = make_plan(resolve_profile("stable")).describe()
    assert "[3/7] ml -> llm2wasm:ml-stable (from python)" in text
    assert "[6/7] runtime-env -> llm2wasm:runtime-env-stable (from web-runtime, joins ml)" in text
    assert "--build-arg MLC_AI_REQUIREMENT=mlc-ai-cu130==0.20.0  (pin mlc_ai_requirement)" in text
    assert "--build-arg EMSDK_REPO=https://github.com/emscripten-core/emsdk.git  (pin emsdk_repo)" in text
    assert "verify/test_emsdk.py" in text


def test_repository_and_network():
    plan = make_plan(resolve_profile("hermetic"), repository="example/llm2wasm")
    assert plan.steps[0].tag == "example/llm2wasm:base-hermetic"
    assert {step.network for step in plan.steps} == {"host"}


# --- what the preflight resolves: the base image's digest, the commits of the git refs ---------------

DIGEST = "sha256:" + "d" * 64
EMSDK_COMMIT = "e" * 40
MLC_COMMIT = "c" * 40
RESOLVED = {"base_image": DIGEST, "emsdk_ref": EMSDK_COMMIT, "mlc_llm_ref": MLC_COMMIT}


def args_of(plan, layer: str) -> dict[str, str]:
    return next(step for step in plan.steps if step.layer.name == layer).build_args


def test_the_dry_run_shows_where_the_preflight_fills_in_the_digest_and_the_commits():
    plan = make_plan(resolve_profile("stable"))
    text = plan.describe()
    assert "--build-arg BASE_IMAGE=ubuntu:24.04  (pin base_image)" in text
    assert "--build-arg BASE_IMAGE_NAME=ubuntu:24.04  (pin base_image)" in text
    assert f"--build-arg BASE_IMAGE_DIGEST={pending_value('base_image')}  (pin base_image, via the preflight)" in text
    assert "manifest digest that pin base_image names then (BASE_IMAGE becomes NAME:TAG@DIGEST)" in text
    assert f"--build-arg EMSDK_COMMIT={pending_value('emsdk_ref')}  (pin emsdk_ref, via the preflight)" in text
    assert f"--build-arg MLC_LLM_COMMIT={pending_value('mlc_llm_ref')}  (pin mlc_llm_ref, via the preflight)" in text
    assert "the commit that pin mlc_llm_ref names then" in text
    assert sorted(plan.pending_args()) == ["base BASE_IMAGE_DIGEST", "emsdk EMSDK_COMMIT", "web-runtime MLC_LLM_COMMIT"]


def test_the_build_is_pinned_to_what_the_preflight_resolved():
    unresolved = make_plan(resolve_profile("stable"))
    plan = unresolved.with_resolved(RESOLVED)
    assert args_of(plan, "base")["BASE_IMAGE"] == f"ubuntu:24.04@{DIGEST}"
    assert args_of(plan, "base")["BASE_IMAGE_NAME"] == "ubuntu:24.04"
    assert args_of(plan, "base")["BASE_IMAGE_DIGEST"] == DIGEST
    assert args_of(plan, "emsdk")["EMSDK_COMMIT"] == EMSDK_COMMIT
    assert args_of(plan, "web-runtime")["MLC_LLM_COMMIT"] == MLC_COMMIT
    assert args_of(plan, "python")["BASE_IMAGE"] == "llm2wasm:base-stable"  # the chain is by tag
    assert plan.pending_args() == []
    assert unresolved.pending_args()  # the plan it came from is left as it was
    assert make_plan(resolve_profile("stable"), resolved=RESOLVED).steps == plan.steps
    text = "\n".join(plan.resolution_lines())
    assert f"base_image ubuntu:24.04 is {DIGEST}: base layer built with FROM ubuntu:24.04@{DIGEST}" in text
    assert f"emsdk_ref 3.1.56 is {EMSDK_COMMIT}: emsdk layer built with EMSDK_COMMIT={EMSDK_COMMIT}" in text
    assert f"mlc_llm_ref v0.20.0 is {MLC_COMMIT}: web-runtime layer built with MLC_LLM_COMMIT={MLC_COMMIT}" in text
    assert f"--build-arg MLC_LLM_COMMIT={MLC_COMMIT}  (pin mlc_llm_ref, via the preflight)" in plan.describe()


def test_without_the_preflight_the_build_goes_by_tag_and_checks_no_commit():
    plan = make_plan(resolve_profile("stable"), resolved={})
    assert args_of(plan, "base")["BASE_IMAGE"] == "ubuntu:24.04"
    assert args_of(plan, "base")["BASE_IMAGE_DIGEST"] == ""
    assert args_of(plan, "emsdk")["EMSDK_COMMIT"] == ""
    assert args_of(plan, "web-runtime")["MLC_LLM_COMMIT"] == ""
    assert plan.pending_args() == [] and plan.resolution_lines() == []
    assert "pulled by tag (ubuntu:24.04), not by digest" in plan.unpinned_note()


def test_a_pin_the_preflight_does_not_resolve_stays_empty():
    # hermetic: emscripten from Debian, so no emsdk clone and no emsdk_ref to resolve
    plan = make_plan(resolve_profile("hermetic"), resolved={"base_image": DIGEST, "mlc_llm_ref": MLC_COMMIT})
    assert args_of(plan, "base")["BASE_IMAGE"] == f"127.0.0.1:38474/llm2wasm-hermetic/debian:bookworm@{DIGEST}"
    assert args_of(plan, "emsdk")["EMSDK_COMMIT"] == ""
    assert len(plan.resolution_lines()) == 2


@pytest.mark.parametrize("value", ["v0.20.0", "c" * 12, "c; rm -rf /"])
def test_a_resolved_commit_must_be_a_full_commit_id(value):
    with pytest.raises(ValueError, match="not a full commit id"):
        make_plan(resolve_profile("stable"), resolved={"mlc_llm_ref": value})


def test_a_plan_still_waiting_for_the_preflight_is_never_built(monkeypatch):
    def no_docker():
        raise AssertionError("reached docker")

    monkeypatch.setattr(build_module.docker, "ensure_engine", no_docker)
    with pytest.raises(ValueError, match="build args still wait for the preflight: base BASE_IMAGE_DIGEST"):
        build_plan(make_plan(resolve_profile("stable"), until="base"))


# --- invoke build: from the preflight to the plan that is built ------------------------------------


class Built(Exception):
    """Raised by the stand-in build_plan: the plan it was given is what the test looks at."""


@pytest.fixture
def tasks(monkeypatch):
    spec = importlib.util.spec_from_file_location("llm2wasm_tasks_for_plan", PROJECT_ROOT / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built: list = []

    def fake_build_plan(plan, reporter=None, **kwargs):
        assert plan.pending_args() == []
        built.append(plan)
        raise Built

    monkeypatch.setattr(build_module, "build_plan", fake_build_plan)
    said = io.StringIO()
    reporter = build_module.Reporter
    monkeypatch.setattr(build_module, "Reporter", lambda quiet=False: reporter(quiet=quiet, stream=said))
    module.built, module.said = built, said
    return module


def test_invoke_build_carries_the_preflights_findings_into_the_build(tasks, monkeypatch):
    monkeypatch.setattr(preflight_module, "preflight_or_stop", lambda profile, layers, say: dict(RESOLVED))
    with pytest.raises(Built):
        tasks.build(Context(), until="web-runtime")
    plan = tasks.built[0]
    assert args_of(plan, "base")["BASE_IMAGE"] == f"ubuntu:24.04@{DIGEST}"
    assert args_of(plan, "web-runtime")["MLC_LLM_COMMIT"] == MLC_COMMIT
    assert f"pinned: mlc_llm_ref v0.20.0 is {MLC_COMMIT}" in tasks.said.getvalue()


def test_invoke_build_without_the_preflight_says_it_builds_by_tag(tasks, monkeypatch):
    def must_not_run(*args):
        raise AssertionError("the preflight ran under --no-preflight")

    monkeypatch.setattr(preflight_module, "preflight_or_stop", must_not_run)
    with pytest.raises(Built):
        tasks.build(Context(), until="web-runtime", no_preflight=True)
    assert args_of(tasks.built[0], "base")["BASE_IMAGE"] == "ubuntu:24.04"
    assert args_of(tasks.built[0], "web-runtime")["MLC_LLM_COMMIT"] == ""
    assert "preflight skipped (--no-preflight): the base image is pulled by tag (ubuntu:24.04)" in tasks.said.getvalue()


def test_invoke_build_dry_run_prints_the_placeholders_or_nothing_without_the_preflight(tasks, capsys):
    tasks.build(Context(), dry_run=True)
    out = capsys.readouterr().out
    assert f"--build-arg MLC_LLM_COMMIT={pending_value('mlc_llm_ref')}" in out
    tasks.build(Context(), dry_run=True, no_preflight=True)
    out = capsys.readouterr().out
    assert "--build-arg MLC_LLM_COMMIT=  (pin mlc_llm_ref, via the preflight)" in out
    assert "--build-arg BASE_IMAGE_DIGEST=  (pin base_image, via the preflight)" in out
    assert tasks.built == []
