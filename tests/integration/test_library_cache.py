"""Two fine-tunes of one base compile once (issue 30), with the real hermetic chain and the real WebLLM.

A tiny Llama base and two LoRA adapters on every linear layer (different seeds, each changing the
greedy tokens its own way) are made in the app image; `invoke convert --adapter` makes a bundle of
each into its own output folder, sharing one library cache. The first compiles and files its library;
the second finds it (its merged weights differ, its shape and settings do not) and copies it in. Both
bundles then run in one headless Chromium, and each generates its own fine-tune's transformers tokens:
the shared library is right for weights it was not compiled with. `invoke clean --lib-cache` shows
the cache's size and empties it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.browser import chromium_path, run_in_one_browser
from tests.conftest import invoke, run_app

STEPS = 8
MAKE = f"""
import json
from pathlib import Path
from llm2wasm.image.convert.checkmodels import make_browser_check_adapter, make_browser_check_model
make_browser_check_model(Path("/work/base"), steps={STEPS})
a = make_browser_check_adapter(Path("/work/base"), Path("/work/tune-a"), steps={STEPS})
b = make_browser_check_adapter(
    Path("/work/base"), Path("/work/tune-b"), steps={STEPS}, first_seed=a["adapter_seed"] + 1
)
Path("/work/references.json").write_text(json.dumps({{"tune-a": a, "tune-b": b}}))
"""
TUNES = ("tune-a", "tune-b")


@pytest.fixture(scope="module")
def fine_tunes(hermetic_chain, tmp_path_factory):
    """Each fine-tune converted by `invoke convert`, one after the other, into its own folder."""
    work = tmp_path_factory.mktemp("fine-tunes")
    made = run_app("-c", MAKE, mounts={work: "/work"}, entrypoint="python")
    assert made.returncode == 0, made.stderr
    cache = work / "libraries"
    results = {}
    for tune in TUNES:
        results[tune] = invoke(
            "convert", str(work / "base"), "--adapter", str(work / tune), "-q", "q0f32", "-o", str(work / "out" / tune),
            "--conv-template", "chatml", "--context-window", "256", "--prefill-chunk-size", "64",
            "--profile", "hermetic", "--lib-cache", str(cache),
        )  # fmt: skip
        assert results[tune].returncode == 0, results[tune].stderr
    return work, json.loads((work / "references.json").read_text()), results


def compile_record(bundle: Path) -> dict:
    return json.loads((bundle / ".llm2wasm" / "state.json").read_text())["steps"]["compile"]


def library_of(bundle: Path) -> bytes:
    (library,) = (bundle / "lib").glob("*.wasm")
    return library.read_bytes()


def test_the_second_fine_tune_reuses_the_first_ones_library(fine_tunes):
    work, references, results = fine_tunes
    first, second = (compile_record(work / "out" / tune)["library_cache"] for tune in TUNES)
    assert first["hit"] is False and second == {"key": first["key"], "hit": True}
    assert f"library: filed in the library cache (key {first['key']})" in results["tune-a"].stderr
    assert f"library: reused from the library cache (key {first['key']}" in results["tune-b"].stderr
    # the messages name the user's cache folder, not the container's mount point
    assert "/cache/libraries" not in results["tune-a"].stderr + results["tune-b"].stderr
    assert library_of(work / "out" / "tune-a") == library_of(work / "out" / "tune-b")
    # what was reused is the library only: each bundle holds its own merged weights
    shards = [sorted((work / "out" / tune / "model" / "resolve" / "main").glob("params_shard_*.bin")) for tune in TUNES]
    assert shards[0] and [p.read_bytes() for p in shards[0]] != [p.read_bytes() for p in shards[1]]
    assert references["tune-a"]["reference_ids"] != references["tune-b"]["reference_ids"]


def test_both_fine_tunes_generate_their_own_tokens_in_one_browser(fine_tunes):
    if chromium_path() is None:
        pytest.fail("Debian's chromium is not installed: run `bash .ci/setup.sh` as root")
    work, references, _ = fine_tunes
    run = run_in_one_browser(references["tune-a"]["prompt"], STEPS, bundles=[work / "out" / tune for tune in TUNES])
    assert not run.preview_errors and not run.page_errors, (run.preview_errors, run.page_errors)
    assert not run.webgpu_errors, "\n".join(run.webgpu_errors[:5])
    assert [result["tokenIds"] for result in run.results] == [references[t]["reference_ids"] for t in TUNES]


def test_clean_shows_the_caches_size_and_empties_it(fine_tunes):
    work, _, _ = fine_tunes
    cache = work / "libraries"
    result = invoke("clean", "--lib-cache", env={"LLM2WASM_LIB_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert f"library cache {cache}:" in result.stdout and "MiB; emptied" in result.stdout
    assert cache.is_dir() and not list(cache.glob("??/*"))
