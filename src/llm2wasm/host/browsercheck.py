"""`invoke browser-check`: a bundle made in the image generates transformers' tokens in a real browser.

The last gate of the publish workflow, and what the browser tests run against the hermetic image:
in the image, a tiny decisive model is made and saved by the image's own transformers
(llm2wasm.image.convert.checkmodels.make_browser_check_model) with its greedy reference from transformers,
converted at q0f32 or q4f32_1 (f32: a software WebGPU adapter has no shader-f16; the reference
computes with the weights the bundle holds), served by `llm2wasm preview`
from the image, and completed greedily by WebLLM in the machine's headless Chromium or Chrome
(WebGPU on SwiftShader). It passes when WebLLM's token ids equal transformers', the page and WebGPU
report no error, and no request leaves 127.0.0.1. WORK keeps the model, the bundle, the conversion's
output (convert.log) and the browser's record (run.json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llm2wasm.errors import UsageError
from llm2wasm.host import docker
from llm2wasm.host.browser import BrowserRun, chromium_path, run_preview_page, start_preview
from llm2wasm.image.convert.reference import REFERENCE_QUANTIZATIONS

STEPS = 8
MAKE_MODEL = """
import json
from pathlib import Path
from llm2wasm.image.convert.checkmodels import make_browser_check_model
reference = make_browser_check_model(Path("/work/model"), steps=%d, quantization=%r)
Path("/work/reference.json").write_text(json.dumps(reference))
"""


class BrowserCheckFailed(Exception):
    """A step before the browser failed (making the model, converting it): the output says why."""


@dataclass
class BrowserCheck:
    image: str
    browser: str
    reference: dict
    tokens: list[int] | None
    repaired_kernels: list[str]
    run: BrowserRun
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _in_image(image: str, work: Path, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["run", "--rm", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}", "-v", f"{work}:/work"]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return docker.run([*cmd, image, *args], check=False, timeout=3600)


def browser_check(
    image: str, work: Path, screenshot: Path | None = None, say=print, quantization: str = "q0f32"
) -> BrowserCheck:
    if quantization not in REFERENCE_QUANTIZATIONS:
        raise UsageError(
            f"browser-check cannot check quantization {quantization!r}: pass one of "
            f"{', '.join(REFERENCE_QUANTIZATIONS)} "
            "(f16 ones need shader-f16, which the software WebGPU of a headless browser lacks)"
        )
    browser = chromium_path()
    if browser is None:
        raise UsageError(
            "no Chromium or Chrome found: install Debian's chromium (`bash .ci/setup.sh` as root) or "
            "set LLM2WASM_BROWSER to the browser's executable"
        )
    docker.require_image(image)
    work.mkdir(parents=True, exist_ok=True)
    say(f"browser-check: making a tiny decisive model and its transformers reference in {image}")
    made = _in_image(image, work, "-c", MAKE_MODEL % (STEPS, quantization), entrypoint="python")
    if made.returncode != 0:
        raise BrowserCheckFailed(f"making the model failed:\n{made.stderr[-3000:]}")
    reference = json.loads((work / "reference.json").read_text())
    say(f"browser-check: converting it at {quantization} in the image")
    converted = _in_image(
        image, work, "convert", "/work/model", "-q", quantization, "--conv-template", "llama-2",
        "--context-window", "256", "--prefill-chunk-size", "64", "--model-id", f"tiny-{quantization}",
        "-o", "/work/bundle",
    )  # fmt: skip
    (work / "convert.log").write_text(converted.stderr)
    if converted.returncode != 0:
        raise BrowserCheckFailed(f"the conversion failed:\n{converted.stderr[-3000:]}")
    state = json.loads((work / "bundle" / ".llm2wasm" / "state.json").read_text())
    repaired = state["steps"]["compile"].get("wgsl", {}).get("repaired", [])
    say(f"browser-check: WebLLM in {browser} (WebGPU on the CPU), greedy, {STEPS} tokens")
    url, name = start_preview(image, work / "bundle")
    try:
        run = run_preview_page(url, reference["prompt"], STEPS, screenshot=screenshot)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    (work / "run.json").write_text(json.dumps({"reference": reference, **asdict(run)}, indent=2))
    tokens = run.results[0]["tokenIds"] if run.results else None
    problems = [f"preview: {e}" for e in run.preview_errors] + [f"page: {e}" for e in run.page_errors]
    problems += [f"WebGPU: {e}" for e in run.webgpu_errors[:5]]
    problems += [f"request off 127.0.0.1: {request}" for request in run.foreign_requests]
    if tokens != reference["reference_ids"]:
        problems.append(f"WebLLM generated {tokens}, transformers {reference['reference_ids']}")
    return BrowserCheck(image, browser, reference, tokens, repaired, run, problems)


def summary_markdown(check: BrowserCheck) -> str:
    """The job summary: the result, the tokens on both sides, whether the WGSL repair was needed."""
    verdict = "passed" if check.ok else "FAILED"
    repair = (
        f"needed: {len(check.repaired_kernels)} kernel(s) had never-written buffers declared read_write "
        f"({', '.join(check.repaired_kernels)})"
        if check.repaired_kernels
        else "not needed (every kernel passed Tint as compiled)"
    )
    lines = [
        f"## llm2wasm browser check: {verdict}",
        "",
        f"- image: `{check.image}`",
        f"- browser: `{check.browser}` (WebGPU on SwiftShader), WebLLM from the image",
        f"- model: tiny decisive Llama (seed {check.reference.get('seed')}), "
        f"{check.reference.get('quantization', 'q0f32')}, prompt "
        f"`{check.reference['prompt']}`",
        f"- transformers greedy ids: `{check.reference['reference_ids']}` (smallest margin "
        f"{check.reference['min_margin']:.2f} logits)",
        f"- WebLLM greedy ids: `{check.tokens}`",
        f"- WGSL repair: {repair}",
    ]
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in check.run.timings.items())
    if timings:
        lines.append(f"- timings: {timings}")
    if check.problems:
        lines += ["", "### Problems", *(f"- {p}" for p in check.problems)]
    return "\n".join(lines) + "\n"


def browser_check_command(
    image: str, keep: Path | None, *, screenshot: Path | None, summary: Path | None, quantization: str
) -> bool:
    """`invoke browser-check`: the check in `keep` (or a temporary folder), its Markdown printed and
    appended to `summary`; whether it passed (BrowserCheckFailed: it could not run)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llm2wasm-browser-check-") as scratch:
        check = browser_check(
            image,
            keep or Path(scratch),
            screenshot,
            say=lambda message: print(message, file=sys.stderr),
            quantization=quantization,
        )
    text = summary_markdown(check)
    print(text)
    if summary is not None:
        with open(summary, "a") as handle:
            handle.write(text)
    return check.ok
