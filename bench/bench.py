"""Side-by-side timings, one run, printed as ratios: not a test (nothing here passes or fails).

Builds (hermetic mirror): the seed as one flat Dockerfile (bench/seed-equivalent) against the
llm2wasm layer graph with its checks and the selftest gate (two branches built side by side), cold
(no cache), warm, after a change to the conversion code and after bumping the MLC wheel pin; the
image sizes; and `invoke verify` of every layer.
Conversions (hermetic app image, real mlc_llm on apache-tvm 0.26.0, Debian's emscripten): the tiny
Llama converted with weight conversion and compilation one after the other against at the same time,
the library linked at emcc's -O0 instead of TVM's -O3 (EMCC_CFLAGS, emscripten's own environment
variable), and a re-run (resume).

    python bench/bench.py [--skip-builds | --only-builds]      (starts the mirror itself, like `invoke mirror up`)
Results are appended to bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "hermetic"))

import mirror  # noqa: E402

from llm2wasm.host.pins import resolve_profile  # noqa: E402

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]


def timed(cmd: list[str], **kwargs) -> float:
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.monotonic() - started


# A bump of the MLC wheel pin that the hermetic wheelhouse can satisfy: the pin's text changes (as
# it does when a user moves to a new release), so every build step that uses it runs again.
# The exclusion of a version that does not exist makes the text unique per run: BuildKit's cache
# from an earlier bench run must not answer for the rebuild (a run at 16:09 on 2026-12-02 did).
MLC_AI_BUMPED = f"apache-tvm>=0.26.0,<0.27,!=0.0.{int(time.time())}"


def flat_build(no_cache: bool, mlc_ai_requirement: str | None = None) -> float:
    pins = resolve_profile("hermetic")
    requirements = " ".join(
        [
            pins["torch_requirement"],
            pins["transformers_requirement"],
            pins["peft_requirement"],
            pins["bitsandbytes_requirement"],
            mlc_ai_requirement or pins["mlc_ai_requirement"],
            pins["tvm_ffi_requirement"],
        ]
    )
    requirements += " " + mirror.mlc_llm_requirement()
    cmd = [
        "docker",
        "build",
        "--network",
        "host",
        "-f",
        str(ROOT / "bench/seed-equivalent/Dockerfile"),
        "-t",
        "llm2wasm-bench:flat",
        "--build-arg",
        f"BASE_IMAGE={pins['base_image']}",
        "--build-arg",
        f"PIP_OPTIONS={pins['pip_options']}",
        "--build-arg",
        f"REQUIREMENTS={requirements}",
        "--build-arg",
        f"MLC_LLM_REPO={pins['mlc_llm_repo']}",
        "--build-arg",
        f"MLC_LLM_REF={pins['mlc_llm_ref']}",
        str(ROOT),
    ]
    if no_cache:
        cmd.insert(2, "--no-cache")
    return timed(cmd, env={**os.environ, "DOCKER_BUILDKIT": "1"})


def layered_build(no_cache: bool, mlc_ai_requirement: str | None = None, report: Path | None = None) -> float:
    cmd = [
        *INVOKE,
        "build",
        "--profile",
        "hermetic",
        "--quiet",
        "--repository",
        "llm2wasm-bench",
        "--set",
        f"mlc_llm_requirement={mirror.mlc_llm_requirement()}",
    ]
    if no_cache:
        cmd += ["--no-cache", "--reverify"]
    if mlc_ai_requirement:
        cmd += ["--set", f"mlc_ai_requirement={mlc_ai_requirement}"]
    if report:
        cmd += ["--report", str(report)]
    return timed(cmd)


def verify_all() -> float:
    return timed([*INVOKE, "verify", "--profile", "hermetic", "--repository", "llm2wasm-bench"])


def image_gb(ref: str) -> float:
    out = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", ref], capture_output=True, text=True)
    return int(out.stdout.strip()) / 1e9


def build_rows() -> list[str]:
    report = Path(tempfile.mkdtemp(prefix="llm2wasm-bench-")) / "cold.json"
    builds = {
        "cold": (flat_build(True), layered_build(True, report=report)),
        "warm, nothing changed": (flat_build(False), layered_build(False)),
    }
    touch_conversion_code()
    try:
        builds["after a change to src/"] = (flat_build(False), layered_build(False))
    finally:
        (ROOT / "src" / "llm2wasm" / "convert" / "_bench_marker.py").unlink(missing_ok=True)
    builds[f"after bumping the MLC wheel pin ({MLC_AI_BUMPED})"] = (
        flat_build(False, MLC_AI_BUMPED),
        layered_build(False, MLC_AI_BUMPED),
    )
    cold_layers = json.loads(report.read_text())["layers"]
    verify_in_build = sum(layer["verify_seconds"] for layer in cold_layers)
    verify_seconds = verify_all()
    cold = builds["cold"][1]
    src_change = builds["after a change to src/"][1]
    flat_bump, layered_bump = builds[f"after bumping the MLC wheel pin ({MLC_AI_BUMPED})"]
    flat_gb, layered_gb = image_gb("llm2wasm-bench:flat"), image_gb("llm2wasm-bench:app-hermetic")
    lines = [
        "| build | seed, flat (s) | llm2wasm layers + checks (s) | layers / flat |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {flat:.1f} | {layered:.1f} | {layered / flat:.2f} |" for name, (flat, layered) in builds.items()
    ]
    lines += [
        "",
        "| measure | value | target |",
        "| --- | --- | --- |",
        f"| cold build, layers / flat (the branches built side by side) | {cold / builds['cold'][0]:.2f} | <= 1.0 |",
        f"| rebuild after bumping the MLC wheel pin, layers / flat | {layered_bump / flat_bump:.2f} | <= 0.5 |",
        f"| rebuild with nothing changed (layers) | {builds['warm, nothing changed'][1]:.1f} s | <= 5 s |",
        f"| `invoke verify` of every layer | {verify_seconds:.1f} s | <= 60 s |",
        f"| verify column of the cold build (sum) | {verify_in_build:.1f} s | |",
        f"| rebuild after a change to src/ / cold build | {src_change / cold:.3f} | <= 0.05 |",
        f"| image size, flat seed-style / llm2wasm app | {flat_gb:.2f} GB / {layered_gb:.2f} GB "
        f"({layered_gb / flat_gb:.2f}) | <= 0.8 |",
        "",
    ]
    return lines


def touch_conversion_code() -> None:
    marker = ROOT / "src" / "llm2wasm" / "convert" / "_bench_marker.py"
    marker.write_text(f"# written by bench/bench.py at {time.time()}\n")


def conversions(image: str) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="llm2wasm-bench-"))
    user = f"{os.getuid()}:{os.getgid()}"
    base = ["docker", "run", "--rm", "--network", "none", "--user", user, "-v", f"{work}:/w"]
    timed([*base, image, "selftest", "--keep", "/w/models"])
    args = ["convert", "/w/models/tiny-llama", "-q", "q4f32_1", "--conv-template", "llama-2"]
    results = {
        "sequential (LLM2WASM_STEP_WORKERS=1)": timed(
            [*base, "-e", "LLM2WASM_STEP_WORKERS=1", image, *args, "-o", "/w/sequential"]
        ),
        "concurrent (default)": timed([*base, image, *args, "-o", "/w/concurrent"]),
        "concurrent, link at -O0 (EMCC_CFLAGS=-O0)": timed(
            [*base, "-e", "EMCC_CFLAGS=-O0", image, *args, "-o", "/w/o0"]
        ),
        "re-run, nothing changed": timed([*base, image, *args, "-o", "/w/concurrent"]),
    }
    sizes = {name: (work / name / "lib" / f"{name}.wasm").stat().st_size for name in ("concurrent", "o0")}
    print(f"library size: -O3 {sizes['concurrent'] / 1e6:.1f} MB, -O0 {sizes['o0'] / 1e6:.1f} MB", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return results


COMPILE_DONE = re.compile(r"compile done in ([0-9.]+)s")


def link_rows(image: str) -> list[str]:
    """The compile step three ways: the default (the runtime objects the image prebuilt, linked at
    emcc -O2), the same objects at TVM's own -O3 (`--link-opt O3`), and what it was before both (the
    runtime bitcode, compiled again at every link, at -O3: LLM2WASM_WASM_RUNTIME_DIR pointed at a
    folder holding only the .bc files). Its time, and whether the default's library is equivalent to
    the old one (same exports and imports, size within 10 %). Each twice, alternating, the faster counts."""
    from llm2wasm.image.convert.wasm_lib import inspect_library

    work = Path(tempfile.mkdtemp(prefix="llm2wasm-bench-"))
    user = f"{os.getuid()}:{os.getgid()}"
    base = ["docker", "run", "--rm", "--network", "none", "--user", user, "-v", f"{work}:/w"]
    timed([*base, image, "selftest", "--keep", "/w/models"])
    copy = "mkdir -p /w/bc && cp $LLM2WASM_WASM_RUNTIME_DIR/*.bc /w/bc/"
    timed([*base, "--entrypoint", "sh", image, "-c", copy])
    args = ["convert", "/w/models/tiny-llama", "-q", "q4f32_1", "--conv-template", "llama-2"]
    variants = {
        "prebuilt runtime objects, link at -O2 (default)": ("default", [], []),
        "prebuilt runtime objects, link at -O3 (--link-opt O3)": ("o3", [], ["--link-opt", "O3"]),
        "runtime bitcode compiled at every link, -O3 (before)": (
            "bc",
            ["-e", "LLM2WASM_WASM_RUNTIME_DIR=/w/bc"],
            ["--link-opt", "O3"],
        ),
    }
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for attempt in range(2):
        for name, (tag, env, extra) in variants.items():
            out = f"/w/{attempt}-{tag}"
            result = subprocess.run([*base, *env, image, *args, *extra, "-o", out], capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"conversion failed:\n{result.stderr[-3000:]}")
            runs[name].append(float(COMPILE_DONE.search(result.stderr).group(1)))
    default, before = (inspect_library(next((work / f"0-{tag}" / "lib").glob("*.wasm"))) for tag in ("default", "bc"))
    shutil.rmtree(work, ignore_errors=True)
    best = {name: min(seconds) for name, seconds in runs.items()}
    reference = best["runtime bitcode compiled at every link, -O3 (before)"]
    lines = [
        "| `mlc_llm compile` of the tiny Llama (q4f32_1) | seconds (best of 2) | vs before |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {seconds:.1f} | {seconds / reference:.2f} |" for name, seconds in best.items()]
    lines += [
        "",
        "| library equivalence | default | before | same |",
        "| --- | --- | --- | --- |",
        f"| size | {default.size / 1e6:.2f} MB | {before.size / 1e6:.2f} MB | {default.size / before.size:.3f}x |",
        *(
            f"| {kind} | {len(getattr(default, kind))} | {len(getattr(before, kind))} "
            f"| {sorted(getattr(default, kind)) == sorted(getattr(before, kind))} |"
            for kind in ("exports", "imports")
        ),
        "",
    ]
    return lines


def batch_rows(image: str) -> list[str]:
    """The integration test's batch spec (three conversions and one item that fails) with `invoke batch`
    at --jobs 1 and --jobs 2, each into a fresh output folder; the table of the --jobs 2 run."""
    sys.path.insert(0, str(ROOT))
    from tests.integration.test_batch import MAKE_MODELS, SPEC

    work = Path(tempfile.mkdtemp(prefix="llm2wasm-bench-"))
    user = f"{os.getuid()}:{os.getgid()}"
    timed(["docker", "run", "--rm", "--network", "none", "--user", user, "-v", f"{work}:/work",
           "--entrypoint", "python", image, "-c", MAKE_MODELS])  # fmt: skip
    (work / "models" / "broken").mkdir()
    (work / "models" / "broken" / "config.json").write_text('{"model_type": "llama"}')
    (work / "models.toml").write_text(SPEC)
    seconds, table = {}, ""
    for jobs in (1, 2):
        out = Path(tempfile.mkdtemp(prefix=f"llm2wasm-bench-out-{jobs}-"))  # outside the spec's folder
        cmd = [*INVOKE, "batch", str(work / "models.toml"), "-o", str(out), "--image", image]
        started = time.monotonic()
        result = subprocess.run([*cmd, "--jobs", str(jobs)], capture_output=True, text=True)
        seconds[jobs] = time.monotonic() - started
        if result.returncode != 1 or "failed" not in result.stdout:  # the broken item must fail, the rest pass
            raise SystemExit(f"unexpected batch result:\n{result.stdout}\n{result.stderr[-3000:]}")
        table = result.stdout.strip()
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    lines = ["| batch of 4 items (3 conversions, 1 failing) | seconds | vs --jobs 1 |", "| --- | --- | --- |"]
    lines += [f"| --jobs {jobs} | {value:.1f} | {value / seconds[1]:.2f} |" for jobs, value in seconds.items()]
    return [*lines, "", "The --jobs 2 run's table:", "", table, ""]


def browser(image: str) -> list[str]:
    """The tiny q0f32 bundle in the preview page, headless Chromium on the CPU (SwiftShader): load time,
    time to the first token and decode rate, for a fresh browser page and a second page in it."""
    sys.path.insert(0, str(ROOT))
    from llm2wasm.host.browser import run_preview_page
    from llm2wasm.host.run import PreviewJob, preview_command

    work = Path(tempfile.mkdtemp(prefix="llm2wasm-bench-browser-"))
    user = f"{os.getuid()}:{os.getgid()}"
    base = ["docker", "run", "--rm", "--network", "none", "--user", user, "-v", f"{work}:/w"]
    script = (
        "import json; from pathlib import Path; "
        "from llm2wasm.image.convert.checkmodels import make_browser_check_model; "
        "Path('/w/ref.json').write_text(json.dumps(make_browser_check_model(Path('/w/model'))))"
    )
    timed([*base, "--entrypoint", "python", image, "-c", script])
    convert = ["convert", "/w/model", "-q", "q0f32", "--conv-template", "llama-2", "--context-window", "256"]
    timed([*base, image, *convert, "--prefill-chunk-size", "64", "-o", "/w/bundle"])
    prompt = json.loads((work / "ref.json").read_text())["prompt"]
    job = PreviewJob(image=image, bundle=work / "bundle", port=8799, name="llm2wasm-bench-preview")
    server = subprocess.Popen(preview_command(job), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(5)
        url = "http://127.0.0.1:8799/"
        run = run_preview_page(url, prompt, 32, extra_urls=(url,))
    finally:
        subprocess.run(["docker", "rm", "-f", "llm2wasm-bench-preview"], capture_output=True)
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "| browser (tiny q0f32, SwiftShader) | load (s) | first token (s) | decode tokens/s |",
        "| --- | --- | --- | --- |",
    ]
    for index, result in enumerate(run.results):
        extra = (result.get("usage") or {}).get("extra") or {}
        label = "fresh browser" if index == 0 else "second page, same browser"
        lines.append(
            f"| {label} | {run.timings[f'load_{index}_s']:.1f} "
            f"| {extra.get('time_to_first_token_s', result['firstTokenSeconds']):.2f} "
            f"| {extra.get('decode_tokens_per_s', 0):.1f} |"
        )
    return lines


MATRIX = ("qwen2", "qwen3", "phi3", "gpt_neox")


def matrix_rows(image: str) -> list[str]:
    """The architecture matrix's conversions (tests/integration/test_models.py): one at a time
    against two at a time, the same models (made once, in the image)."""
    from concurrent.futures import ThreadPoolExecutor

    work = Path(tempfile.mkdtemp(prefix="llm2wasm-bench-matrix-"))
    user = f"{os.getuid()}:{os.getgid()}"
    base = ["docker", "run", "--rm", "--network", "none", "--user", user, "-v", f"{work}:/w"]
    for name in MATRIX:
        script = (
            "from pathlib import Path; from llm2wasm.image.convert.checkmodels import make_browser_check_model; "
            f"make_browser_check_model(Path('/w/{name}'), architecture={name!r})"
        )
        timed([*base, "--entrypoint", "python", image, "-c", script])

    def convert(name: str, out: str) -> float:
        return timed([*base, image, "convert", f"/w/{name}", "-q", "q0f32", "--conv-template", "chatml",
                      "--context-window", "256", "--prefill-chunk-size", "64", "-o", f"/w/{out}-{name}"])  # fmt: skip

    started = time.monotonic()
    each = {name: convert(name, "one") for name in MATRIX}
    one_at_a_time = time.monotonic() - started
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda name: convert(name, "two"), MATRIX))
    two_at_a_time = time.monotonic() - started
    shutil.rmtree(work, ignore_errors=True)
    per_model = ", ".join(f"{name} {seconds:.0f}" for name, seconds in each.items())
    return [
        f"| architecture matrix, q0f32 ({len(MATRIX)} models: {per_model} s each) | seconds | vs one at a time |",
        "| --- | --- | --- |",
        f"| one at a time | {one_at_a_time:.1f} | 1.00 |",
        f"| two at a time (the test's way) | {two_at_a_time:.1f} | {two_at_a_time / one_at_a_time:.2f} |",
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-builds", action="store_true")
    parser.add_argument("--only-builds", action="store_true", help="no conversions and no browser")
    parser.add_argument(
        "--only-batch", action="store_true", help="only the batch at --jobs 1 vs 2 (built hermetic image)"
    )
    parser.add_argument(
        "--only-link", action="store_true", help="only the runtime objects vs bitcode link (built hermetic image)"
    )
    parser.add_argument(
        "--only-matrix", action="store_true", help="only the architecture matrix's conversions (built hermetic image)"
    )
    args = parser.parse_args()
    mirror.up()
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({os.cpu_count()} cores)", ""]
    if args.only_matrix:
        return record(lines + matrix_rows("llm2wasm:app-hermetic"))
    if args.only_batch:
        return record(lines + batch_rows("llm2wasm:app-hermetic"))
    if args.only_link:
        return record(lines + link_rows("llm2wasm:app-hermetic"))
    if not args.skip_builds:
        lines += build_rows()
    if args.only_builds:
        return record(lines)
    # the chain this run built, or with --skip-builds the one `invoke build --profile hermetic` made
    image = "llm2wasm:app-hermetic" if args.skip_builds else "llm2wasm-bench:app-hermetic"
    runs = conversions(image)
    browser_lines = browser(image)
    sequential = runs["sequential (LLM2WASM_STEP_WORKERS=1)"]
    lines += ["| conversion (real mlc_llm, tiny Llama, q4f32_1) | seconds | vs sequential |", "| --- | --- | --- |"]
    lines += [f"| {name} | {seconds:.1f} | {seconds / sequential:.2f} |" for name, seconds in runs.items()]
    lines += ["", *browser_lines]
    return record(lines)


def record(lines: list[str]) -> int:
    text = "\n".join(lines) + "\n"
    print(text)
    with open(ROOT / "bench" / "results.md", "a") as handle:
        handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
