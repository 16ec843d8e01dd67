"""The browser check's job summary says the result, both sides' tokens and whether the WGSL repair was needed."""

from __future__ import annotations

from llm2wasm.host.browser import BrowserRun
from llm2wasm.host.browsercheck import BrowserCheck, summary_markdown

REFERENCE = {"prompt": "hello world", "reference_ids": [11, 13, 9], "min_margin": 2.47, "seed": 0}


def test_a_pass_with_the_repair_named():
    check = BrowserCheck("llm2wasm:app-cpu", "/usr/bin/chromium", REFERENCE, [11, 13, 9], ["k1", "k2"], BrowserRun())
    text = summary_markdown(check)
    assert check.ok and text.startswith("## llm2wasm browser check: passed")
    assert "- WGSL repair: needed: 2 kernel(s)" in text and "(k1, k2)" in text
    assert "- WebLLM greedy ids: `[11, 13, 9]`" in text


def test_a_failure_lists_its_problems():
    check = BrowserCheck(
        "llm2wasm:app-cpu",
        "/usr/bin/chromium",
        REFERENCE,
        [11, 4, 4],
        [],
        BrowserRun(),
        ["WebLLM generated [11, 4, 4]"],
    )
    text = summary_markdown(check)
    assert not check.ok and text.startswith("## llm2wasm browser check: FAILED")
    assert "not needed (every kernel passed Tint as compiled)" in text and "- WebLLM generated [11, 4, 4]" in text


def test_a_quantization_software_webgpu_cannot_run_is_refused_before_anything_runs(tmp_path):
    import pytest

    from llm2wasm.errors import UsageError
    from llm2wasm.host.browsercheck import browser_check

    with pytest.raises(UsageError, match=r"q4f16_1.*q0f32, q4f32_1.*shader-f16"):
        browser_check("llm2wasm:app-none", tmp_path / "work", quantization="q4f16_1")
    assert not (tmp_path / "work").exists()


def test_the_summary_names_the_checked_quantization():
    check = BrowserCheck(
        "llm2wasm:app-cpu", "/usr/bin/chromium", {**REFERENCE, "quantization": "q4f32_1"}, [11, 13, 9], [], BrowserRun()
    )
    assert "q4f32_1, prompt" in summary_markdown(check)
