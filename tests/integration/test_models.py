"""The architecture matrix: models as users bring them convert to bundles that compute the same model.

For each architecture (llm2wasm.image.convert.tiny.ARCHITECTURES): a tiny random model made and saved by
the image's own transformers (5.x: `rope_parameters`, no top-level `rope_theta`) with a rope base
that is not the default, grouped-query attention where the family has it, tied or untied
embeddings as the family has them, made decisive like the browser test's model; converted at
q0f32 by the real hermetic chain; loaded by the real WebLLM in headless Chromium. Its greedy token
ids must equal transformers' (computing with the weights the bundle holds: bf16-rounded, as
mlc_llm stores float32), and the bundle's mlc-chat-config.json must carry the model's rope base
(mlc_llm's own configs fall back to 10000 or fail on the transformers 5 format).

The q0f32 Llama is the browser test's model (tests/integration/test_browser.py); the matrix's
Llama is the same model at 4 bits (q4f32_1), the quantization family users ship. The tied rows
(llama3_2, qwen2_5) are made to compute something other than their input token
(llm2wasm.image.convert.checkmodels.check_model_scales); the rope scalings (Llama 3.2's llama3, Phi-3.5's
longrope) must change the tokens the same weights give with plain rope, so the browser's match
shows mlc_llm applied them.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.browser import chromium_path, run_in_one_browser
from tests.conftest import run_app, shared_library_cache

STEPS = 8
# Every family but llama at q0f32 (the browser test's) — each costs one compile (about a minute).
# "+lora": the same family fine-tuned, through `convert --adapter` (merged by llm2wasm, saved by
# transformers 5 again): a LoRA on every linear layer whose merge changes the greedy tokens; its
# library is its base row's, from the session's shared library cache (issue 30), as a user's is.
# "@q4f32_1": converted at 4 bits (mlc_llm's group quantization), against a reference computing
# with the quantized weights (llm2wasm.image.convert.reference.as_bundle_holds); the others are q0f32. A
# fine-tune at 4 bits is what users ship most.
# "llama3_2" and "qwen2_5": tied embeddings, as the small models users ship most have them (Llama
# 3.2 with Llama 3's rope scaling, at 4 bits: its head is the quantized embedding); "phi3_5": Phi-3.5
# mini's long-context rope (longrope).
ARCHITECTURES = [
    "qwen2", "qwen3", "phi3", "mistral", "gpt_neox", "phi", "stablelm", "qwen2+lora", "mistral+lora", "llama@q4f32_1",
    "qwen2+lora@q4f32_1", "llama3_2@q4f32_1", "qwen2_5", "phi3_5",
]  # fmt: skip

MAKE_MODEL = """
import json
from pathlib import Path
from llm2wasm.image.convert.checkmodels import make_browser_check_adapter, make_browser_check_model
reference = make_browser_check_model(Path("/work/model"), steps=%d, architecture=%r, quantization=%r)
if %r:
    reference = make_browser_check_adapter(Path("/work/model"), Path("/work/adapter"), steps=%d, quantization=%r)
Path("/work/reference.json").write_text(json.dumps(reference))
"""


def convert_one(name: str, work: Path) -> tuple[dict | None, subprocess.CompletedProcess]:
    """Make the model (and adapter) of `name` in the image, then convert it there (q0f32 unless
    `name` says `@quantization`)."""
    name_and_lora, _, quantization = name.partition("@")
    architecture, _, lora = name_and_lora.partition("+")
    quantization = quantization or "q0f32"
    script = MAKE_MODEL % (STEPS, architecture, quantization, bool(lora), STEPS, quantization)
    made = run_app("-c", script, mounts={work: "/work"}, entrypoint="python")
    if made.returncode != 0:
        return None, made
    model_id = f"tiny-{name.replace('+', '-').replace('@', '-')}"
    args = ["convert", "/work/model", "-q", quantization, "--conv-template", "chatml", "--context-window", "256",
            "--prefill-chunk-size", "64", "--model-id", model_id, "-o", "/work/bundle"]  # fmt: skip
    if lora:
        args += ["--adapter", "/work/adapter"]
    converted = run_app(*args, mounts={work: "/work"}, timeout=1800, library_cache=shared_library_cache())
    return json.loads((work / "reference.json").read_text()), converted


@pytest.fixture(scope="module")
def matrix(hermetic_chain, tmp_path_factory):
    """Every conversion of the matrix, two at a time (a conversion's link keeps one core busy)."""
    if chromium_path() is None:
        pytest.fail("Debian's chromium is not installed: run `bash .ci/setup.sh` as root")
    works = {name: tmp_path_factory.mktemp(name.replace("+", "-").replace("@", "-")) for name in ARCHITECTURES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(convert_one, name, work) for name, work in works.items()}
    return {name: (works[name], *futures[name].result()) for name in ARCHITECTURES}


@pytest.fixture(params=ARCHITECTURES)
def converted(request, matrix):
    work, reference, result = matrix[request.param]
    assert reference is not None, f"making the {request.param} model failed:\n{result.stderr}"
    assert result.returncode == 0, result.stderr
    return request.param, work, reference, result


def test_an_adapter_changes_the_greedy_tokens(converted):
    name, _, reference, result = converted
    if "+lora" not in name:
        pytest.skip("no adapter in this conversion")
    assert reference["reference_ids"] != reference["base_reference_ids"]
    assert "merge done" in result.stderr


def test_saved_in_transformers_5_format_with_a_non_default_rope_base(converted):
    _, work, _, _ = converted
    config = json.loads((work / "model" / "config.json").read_text())
    assert config["transformers_version"].startswith("5.") and "rope_theta" not in config
    assert config["rope_parameters"]["rope_theta"] not in (None, 10000, 10000.0)


def test_the_bundle_carries_the_models_rope_base(converted):
    _, work, _, result = converted
    theta = json.loads((work / "model" / "config.json").read_text())["rope_parameters"]["rope_theta"]
    chat_config = json.loads((work / "bundle" / "model" / "resolve" / "main" / "mlc-chat-config.json").read_text())
    model_config = chat_config["model_config"]
    assert theta in (model_config.get("position_embedding_base"), model_config.get("rope_theta")), model_config
    assert "config for mlc_llm" in result.stderr  # the mapping said what it wrote
    # the user's folder is untouched: the adapted config lives in the workspace only
    assert "rope_theta" not in json.loads((work / "model" / "config.json").read_text())


@pytest.fixture(scope="module")
def browser_run(matrix):
    """Every converted row's bundle loaded in one headless Chromium, in ARCHITECTURES order (one
    launch pays for the sampler's shader compile once); rows whose conversion failed are left out."""
    rows = [name for name in ARCHITECTURES if matrix[name][1] is not None and matrix[name][2].returncode == 0]
    prompts = {matrix[name][1]["prompt"] for name in rows}
    assert len(prompts) <= 1, prompts  # the browser-check prompt: one page script serves every row
    if not rows:
        return rows, None
    return rows, run_in_one_browser(prompts.pop(), STEPS, bundles=[matrix[name][0] / "bundle" for name in rows])


def test_webllm_generates_transformers_tokens(converted, browser_run):
    architecture, _, reference, _ = converted
    assert reference["min_margin"] >= 1.0 and len(set(reference["reference_ids"])) >= 3
    rows, run = browser_run
    page = rows.index(architecture)
    own = f"[{page}] "  # this row's page: its console and page errors carry its index
    assert not [e for e in run.page_errors if e.startswith(own)], run.page_errors
    assert not [e for e in run.webgpu_errors if e.startswith(own)], "\n".join(run.webgpu_errors[:5])
    # the browser stops at the first page that does not load: a row after it has no result
    assert page < len(run.results), f"no result for {architecture}: preview errors {run.preview_errors}"
    assert run.results[page]["tokenIds"] == reference["reference_ids"], (architecture, run.results[page], reference)


def bundle_file(work: Path, name: str) -> dict:
    return json.loads((work / "bundle" / "model" / "resolve" / "main" / name).read_text())


def test_a_rope_scaling_is_carried_and_changes_the_greedy_tokens(converted):
    name, work, reference, result = converted
    rope = json.loads((work / "model" / "config.json").read_text())["rope_parameters"]
    if rope.get("rope_type", "default") == "default":
        pytest.skip("no rope scaling in this model")
    # the same weights with plain rope give other tokens, so the browser's match shows the scaling ran
    assert reference["without_rope_scaling_ids"] != reference["reference_ids"]
    scaling = bundle_file(work, "mlc-chat-config.json")["model_config"]["rope_scaling"]
    for key in sorted(set(rope) - {"rope_theta", "partial_rotary_factor"}):  # llama3's factors, longrope's lists
        assert scaling[key] == rope[key], (name, key, scaling)
    if rope["rope_type"] == "longrope":  # the check's context window (256) outgrows the original one
        assert f"beyond {rope['original_max_position_embeddings']} (the model's original context)" in result.stderr


# The output head's parameter in mlc_llm's models: lm_head, or embed_out (GPT-NeoX)
OUTPUT_HEADS = ("lm_head.", "embed_out.")


def test_a_tied_model_has_no_output_head_of_its_own_in_the_bundle(converted):
    name, work, _, _ = converted
    config = json.loads((work / "model" / "config.json").read_text())
    head = [
        record["name"]
        for shard in bundle_file(work, "tensor-cache.json")["records"]
        for record in shard["records"]
        if record["name"].startswith(OUTPUT_HEADS)
    ]
    if config.get("tie_word_embeddings"):
        assert bundle_file(work, "mlc-chat-config.json")["model_config"]["tie_word_embeddings"] is True
        assert not head, head  # mlc_llm computes the head with the embedding, as transformers does
    else:
        assert head, f"{name} is untied but its bundle holds no output head of its own"
