"""Which checks run where: own checks always, parents' checks when the layer changed what they look
at, and every check on the children of a layer that failed (llm2wasm.host.verify)."""

from __future__ import annotations

import pytest

from llm2wasm.host import docker, layerdiff, verify
from llm2wasm.host.layers import LAYERS
from llm2wasm.host.pins import resolve_profile


def module_names(modules) -> list[str]:
    return [path.stem.removeprefix("test_") for path in modules]


def test_the_first_layer_runs_its_own_checks(tmp_path):
    selection = verify.select_checks("base", "img", None, tmp_path)
    assert module_names(selection.modules) == ["base"]
    assert not selection.has_parents and not selection.parents_carried_over


@pytest.mark.parametrize("reasons, expected", [([], ["app"]), (["modified /etc/passwd"], None)])
def test_parents_checks_run_only_with_a_reason(monkeypatch, tmp_path, reasons, expected):
    monkeypatch.setattr(layerdiff, "parent_check_reasons", lambda parent, child, cache: reasons)
    selection = verify.select_checks("app", "child", "parent", tmp_path)
    all_modules = [layer.name.replace("-", "_") for layer in LAYERS]
    assert module_names(selection.modules) == (expected or all_modules)
    assert selection.parents_carried_over == (not reasons)
    assert selection.reasons == reasons


@pytest.fixture
def fake_images(monkeypatch):
    """Every layer image exists; checks are recorded instead of run; layers in `failing` fail."""
    calls: list[tuple[str, list[str]]] = []
    failing: set[str] = set()

    def run_checks(image, layer, profile, *, modules=None, **kwargs):
        names = module_names(modules)
        calls.append((layer, names))
        passed = not (failing & set(names))
        return verify.CheckResult(layer, image, passed, "1 passed" if passed else "1 failed", "", 0.1)

    monkeypatch.setattr(docker, "image_id", lambda ref: "sha256:" + ref)
    monkeypatch.setattr(verify, "run_checks", run_checks)
    monkeypatch.setattr(layerdiff, "parent_check_reasons", lambda parent, child, cache: [])
    return calls, failing


def test_verify_all_carries_parents_over_where_nothing_changed(fake_images, tmp_path):
    calls, _ = fake_images
    results = list(verify.verify_built(resolve_profile("hermetic"), cache_dir=tmp_path))
    assert [result.passed for result, _ in results] == [True] * len(LAYERS)
    # every layer but the join: the joined branch's checks always run on the joined image
    assert {layer: len(names) for layer, names in calls if len(names) > 1} == {"runtime-env": len(LAYERS) - 1}
    assert dict(calls)["runtime-env"] == ["base", "python", "ml", "emsdk", "web_runtime", "runtime_env"]


def test_a_failed_parent_makes_its_children_run_every_check(fake_images, tmp_path):
    _, failing = fake_images
    failing.add("ml")
    results = list(verify.verify_built(resolve_profile("hermetic"), cache_dir=tmp_path))
    by_layer = {result.layer: (result, selection) for result, selection in results}
    assert not by_layer["ml"][0].passed
    # the join runs ml's checks itself, and fails with them
    join_result, join_selection = by_layer["runtime-env"]
    assert join_selection.reasons == ["it joins ml: every branch's checks run on the joined image"]
    assert "ml" in module_names(join_selection.modules)
    assert not join_result.passed
    # the app layer relied on its parents' results, which did not hold: it runs every check itself
    app_result, app_selection = by_layer["app"]
    assert app_selection.reasons == ["a parent failed its checks"] and not app_result.passed
    # the web toolchain's branch does not depend on ml: its results stand on their own
    emsdk_result, emsdk_selection = by_layer["emsdk"]
    assert emsdk_result.passed and emsdk_selection.reasons == []
    assert by_layer["python"][0].passed


def test_one_layer_or_full_runs_every_parents_checks(fake_images, tmp_path):
    calls, _ = fake_images
    list(verify.verify_built(resolve_profile("hermetic"), "web-runtime", cache_dir=tmp_path))
    assert calls[-1] == ("web-runtime", ["base", "python", "emsdk", "web_runtime"])
    calls.clear()
    list(verify.verify_built(resolve_profile("hermetic"), full=True, cache_dir=tmp_path))
    assert len(calls[-1][1]) == len(LAYERS)
