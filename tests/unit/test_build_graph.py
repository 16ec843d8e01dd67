"""The build runs the layer graph: a layer starts once what it depends on is ready, the two branches
side by side, and a failure starts nothing new."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from llm2wasm.errors import BuildFailed
from llm2wasm.host.build import LayerResult, run_graph
from llm2wasm.host.pins import resolve_profile
from llm2wasm.host.plan import make_plan

STEPS = make_plan(resolve_profile("hermetic")).steps


class FakeBuilds:
    """Each layer takes `seconds[name]` (default 0.01); layers in `failing` fail; start/end times kept."""

    def __init__(self, seconds=None, failing=()):
        self.seconds = seconds or {}
        self.failing = set(failing)
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.lock = threading.Lock()

    def __call__(self, step) -> LayerResult:
        name = step.layer.name
        with self.lock:
            self.started[name] = time.monotonic()
        time.sleep(self.seconds.get(name, 0.01))
        with self.lock:
            self.ended[name] = time.monotonic()
        if name in self.failing:
            raise BuildFailed(name, "checks failed: 1 failed", "")
        return LayerResult(name, step.tag, f"sha256:{name}", 0.0, 0.0, "passed")


def test_every_layer_starts_after_what_it_depends_on_and_results_come_in_plan_order():
    builds = FakeBuilds()
    results = run_graph(STEPS, builds, jobs=2)
    assert [result.layer for result in results] == [step.layer.name for step in STEPS]
    for step in STEPS:
        for dependency in step.layer.depends_on:
            assert builds.started[step.layer.name] >= builds.ended[dependency], (step.layer.name, dependency)


def test_the_web_toolchain_builds_while_the_ml_wheels_do():
    builds = FakeBuilds({"ml": 0.5})
    run_graph(STEPS, builds, jobs=2)
    assert builds.started["emsdk"] < builds.ended["ml"]
    assert builds.ended["web-runtime"] < builds.ended["ml"]
    assert builds.started["runtime-env"] >= max(builds.ended["ml"], builds.ended["web-runtime"])


def test_one_job_builds_one_layer_at_a_time():
    builds = FakeBuilds({"ml": 0.2})
    run_graph(STEPS, builds, jobs=1)
    spans = sorted((builds.started[name], builds.ended[name]) for name in builds.started)
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))


def test_a_failure_builds_nothing_that_depends_on_it_and_starts_nothing_new():
    # ml fails while emsdk is under way: emsdk finishes, web-runtime (not started yet) never starts
    builds = FakeBuilds({"ml": 0.05, "emsdk": 0.3}, failing={"ml"})
    with pytest.raises(BuildFailed) as failure:
        run_graph(STEPS, builds, jobs=2)
    assert failure.value.layer == "ml"
    assert "emsdk" in builds.ended
    assert not {"web-runtime", "runtime-env", "app"} & set(builds.started)
