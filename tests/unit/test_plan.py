from llm2wasm.pins import resolve_profile
from llm2wasm.plan import DERIVED, make_plan


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
