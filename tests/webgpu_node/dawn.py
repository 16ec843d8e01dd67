"""WebLLM in Node on Dawn's WebGPU over Mesa's lavapipe: the one place here where f16 bundles
(q4f16_1, what WebLLM ships, and q0f16) can generate tokens, since headless Chromium offers only
SwiftShader, which has no `shader-f16`.

`available()` says whether this machine can (None) or why not; `generate()` runs run.mjs once over
several bundles (one Dawn start for all). setup.sh installs what they need on Debian bookworm
(.ci/setup.sh runs it).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN = HERE / "run.mjs"
PROBE = HERE / "probe.mjs"
LAVAPIPE_ICD = Path("/usr/share/vulkan/icd.d/lvp_icd.json")
NODE_PACKAGES = ("webgpu", "@mlc-ai/web-llm")
SETUP = "run `bash .ci/setup.sh` (or `bash tests/webgpu_node/setup.sh`) as root"


class DawnRunError(RuntimeError):
    """run.mjs failed: the message has its errors and the end of its stderr; `report` its JSON, if any."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


def node() -> str | None:
    return shutil.which("node")


@functools.cache
def available() -> str | None:
    """None when WebLLM can run here on lavapipe with shader-f16, else the reason in words. The probe
    (one f16 compute shader on Dawn's adapter) runs once per process: the answer is cached."""
    if node() is None:
        return f"no `node` on PATH: {SETUP}"
    missing = [name for name in NODE_PACKAGES if not (HERE / "node_modules" / name / "package.json").is_file()]
    if missing:
        return f"{', '.join(missing)} not installed in {HERE / 'node_modules'}: {SETUP} (it runs npm ci)"
    if not LAVAPIPE_ICD.is_file():
        return f"no Mesa lavapipe Vulkan driver ({LAVAPIPE_ICD}): {SETUP} (mesa-vulkan-drivers from bookworm-backports)"
    try:
        result = subprocess.run([node(), str(PROBE)], capture_output=True, text=True, cwd=HERE, timeout=120)
    except subprocess.TimeoutExpired:
        return "the Dawn probe (tests/webgpu_node/probe.mjs) did not answer within 120 s"
    report = last_json(result.stdout)
    if result.returncode == 0 and report is not None and report.get("ok"):
        return None
    reason = (report or {}).get("error") or f"the Dawn probe failed (exit {result.returncode})"
    mesa = mesa_package_version()
    if mesa is not None and mesa.split(".")[0].isdigit() and int(mesa.split(".")[0]) < 25:
        # Dawn refuses bookworm's Mesa 22.3 ("shaderUniform*ArrayDynamicIndexing required")
        reason += f"; mesa-vulkan-drivers {mesa} is too old (Dawn needs Mesa 25 or newer: {SETUP})"
    return f"{reason}\n{tail(result.stderr)}".rstrip()


def generate(bundles: Sequence[Path], prompt: str, max_tokens: int, timeout: float) -> list[dict]:
    """Greedy tokens from each of `bundles` (folders written by llm2wasm convert) by the real WebLLM on
    Dawn, all in one run.mjs process: one report per bundle, in order (ok, errors, adapter,
    required_features, timings, result {text, tokenIds, ...}); a failed bundle's report also has
    `stderr_tail`, and a failure is that bundle's own, the others still run. Raises DawnRunError,
    with the end of stderr, when run.mjs gives no report for every bundle or runs past `timeout`."""
    command = [node() or "node", str(RUN), *map(str, bundles), "--prompt", prompt, "--max-tokens", str(max_tokens)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=HERE, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise DawnRunError(
            f"run.mjs did not finish {len(bundles)} bundle(s) within {timeout:.0f} s\n{tail(stderr)}"
        ) from None
    report = last_json(result.stdout)
    runs = (report or {}).get("runs") or []
    if len(runs) != len(bundles):
        errors = "; ".join((report or {}).get("errors") or []) or "no report on stdout"
        raise DawnRunError(f"run.mjs failed (exit {result.returncode}): {errors}\n{tail(result.stderr)}", report)
    for run in runs:
        if not run.get("ok"):
            run["stderr_tail"] = tail(result.stderr)
    return runs


def last_json(stdout: str) -> dict | None:
    """run.mjs and probe.mjs end with one JSON line; anything before it is not theirs."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def mesa_package_version() -> str | None:
    """Debian's mesa-vulkan-drivers version, to say why Dawn refused lavapipe (22.3 is too old)."""
    if shutil.which("dpkg-query") is None:
        return None
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "mesa-vulkan-drivers"], capture_output=True, text=True, check=False
    )
    return (result.stdout.strip() or None) if result.returncode == 0 else None
