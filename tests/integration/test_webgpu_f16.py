"""f16 bundles (q4f16_1, what WebLLM ships, and q0f16) generate transformers' greedy tokens in the real
WebLLM, on a WebGPU adapter that has and was given `shader-f16`.

Headless Chromium here offers only SwiftShader, which has no shader-f16, so these run WebLLM in Node on
Dawn's WebGPU (npm `webgpu`) over Mesa 25's lavapipe (tests/webgpu_node: run.mjs, dawn.py, setup.sh).
They skip, with the reason, where that is not installed. The f32 bundle runs too: the same runner on
a bundle the browser check also covers, so a failure that is the runner's shows there as well.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.webgpu_node import dawn

pytestmark = pytest.mark.integration

QUANTIZATIONS = ("q4f16_1", "q0f16", "q4f32_1")
F16 = ("q4f16_1", "q0f16")
# Where the bundles of one tiny decisive Llama and its transformers reference wait until the project
# wires f16_bundles to its conversion fixtures (out-<quantization>/ and llama-reference.json).
F16_WORK = Path(os.environ.get("LLM2WASM_F16_WORK", "/tmp/f16work"))
GENERATE_TIMEOUT = 600  # seconds; about 10-25 s each on two cores, most of it lavapipe compiling shaders


@pytest.fixture(scope="module")
def dawn_ready() -> None:
    reason = dawn.available()
    if reason is not None:
        pytest.skip(f"WebLLM on Dawn/lavapipe is not available here: {reason}")


@pytest.fixture(scope="module")
def f16_bundles() -> dict[str, tuple[Path, dict]]:
    """{quantization: (bundle folder, transformers reference {prompt, prompt_ids, reference_ids})}."""
    reference_file = F16_WORK / "llama-reference.json"
    if not reference_file.is_file():
        pytest.skip(f"no f16 bundles: {reference_file} not found (set LLM2WASM_F16_WORK)")
    reference = json.loads(reference_file.read_text())
    bundles = {q: (F16_WORK / f"out-{q}", reference) for q in QUANTIZATIONS}
    return {q: entry for q, entry in bundles.items() if (entry[0] / "app-config.json").is_file()}


@pytest.fixture(scope="module")
def dawn_run(dawn_ready, f16_bundles):
    """run.mjs's report for a quantization's bundle: one run each, shared by the tests of this module."""
    reports: dict[str, dict] = {}

    def run(quantization: str) -> tuple[dict, dict]:
        if quantization not in f16_bundles:
            pytest.skip(f"no {quantization} bundle among {sorted(f16_bundles)}")
        bundle, reference = f16_bundles[quantization]
        if quantization not in reports:
            steps = len(reference["reference_ids"])
            reports[quantization] = dawn.generate(bundle, reference["prompt"], steps, timeout=GENERATE_TIMEOUT)
        return reports[quantization], reference

    return run


def adapter_name(report: dict) -> str:
    adapter = report["adapter"]
    return f"{adapter['description']} ({adapter['vendor']}, {adapter['architecture']})"


@pytest.mark.parametrize("quantization", F16)
def test_f16_bundle_runs_with_shader_f16_on_lavapipe(dawn_run, quantization, record_property):
    report, _ = dawn_run(quantization)
    adapter = report["adapter"]
    record_property("adapter", adapter_name(report))
    record_property("timings", report["timings"])
    assert "shader-f16" in report["required_features"], f"the {quantization} app config should require shader-f16"
    assert adapter["is_lavapipe"], f"ran on {adapter_name(report)}, not Mesa's lavapipe"
    assert adapter["shader_f16_available"], f"{adapter_name(report)} has no shader-f16"
    assert adapter["shader_f16_requested"] and adapter["shader_f16_granted"], (
        f"WebLLM's device on {adapter_name(report)}: requested {adapter['requested_features']}, "
        f"shader-f16 granted: {adapter['shader_f16_granted']}"
    )


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_greedy_tokens_equal_transformers(dawn_run, quantization, record_property):
    report, reference = dawn_run(quantization)
    result = report["result"]
    record_property("adapter", adapter_name(report))
    record_property("token_ids", result["tokenIds"])
    record_property("timings", report["timings"])
    assert result["tokenIds"] == reference["reference_ids"], (
        f"{quantization} on {adapter_name(report)}: WebLLM's greedy ids {result['tokenIds']} ({result['text']!r}) "
        f"!= transformers' {reference['reference_ids']} for {reference['prompt']!r}; timings {report['timings']}"
    )
