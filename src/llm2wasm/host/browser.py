"""Drive the preview page in headless Chromium or Chrome (the machine's own, through Playwright's
Python client with executable_path: no browser is ever downloaded) and run a greedy completion in
WebLLM. Used by `invoke browser-check` (the publish workflow) and the browser tests.

Every request to an address other than 127.0.0.1 is refused and recorded; WebGPU errors in the
console are recorded (a library whose pipelines the browser rejects still "answers", wrongly).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from llm2wasm.host.run import PreviewJob, preview_command

# Debian's chromium, then a GitHub runner's Chrome; LLM2WASM_BROWSER names another.
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium", "/usr/bin/google-chrome")
# WebGPU on the CPU (SwiftShader) needs --enable-unsafe-webgpu; the background-networking flags keep
# Chromium from calling Google's hosts (refused on a closed network, and not ours to call).
CHROMIUM_ARGS = [
    "--enable-unsafe-webgpu",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--metrics-recording-only",
]
WEBGPU_ERROR_MARKERS = (
    "GPUUncapturedErrorEvent",
    "Error while parsing WGSL",
    "Invalid ComputePipeline",
    "Invalid ShaderModule",
    "GPUValidationError",
    "WebGPU uncaptured error",
)


def chromium_path() -> str | None:
    if os.environ.get("LLM2WASM_BROWSER"):
        return os.environ["LLM2WASM_BROWSER"]
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return shutil.which("chromium")


@dataclass
class BrowserRun:
    console: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)
    webgpu_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)
    preview_errors: list[str] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)  # the page's own notes of a load it tried again
    dropped: list[str] = field(default_factory=list)  # requests failed on purpose (drop_first)


def run_preview_page(
    url: str,
    prompt: str,
    max_tokens: int,
    screenshot: Path | None = None,
    load_timeout_s: float = 1800,
    extra_urls: tuple[str, ...] = (),
    chat_system: str | None = None,
    drop_first: tuple[str, ...] = (),
) -> BrowserRun:
    """Open the preview page at `url`, wait for WebLLM to load the bundle, complete `prompt`
    greedily, take a screenshot. `extra_urls`: further preview pages loaded in the same browser
    afterwards (a browser launch pays for compiling the sampler's sort kernel once). With
    `chat_system`, one chat turn instead: `prompt` as the user's message after that system message,
    through `engine.chat.completions` (the bundle's conversation template wraps them).
    `drop_first`: URL endings whose first GET fails as a connection reset does (what a page
    sees when the network changes under it), to show the page loads again."""
    from playwright.sync_api import sync_playwright

    run = BrowserRun()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            context = browser.new_context(viewport={"width": 900, "height": 900})

            dropped: set[str] = set()

            def guard(route):
                host = urlsplit(route.request.url).hostname
                ending = next((end for end in drop_first if route.request.url.endswith(end)), None)
                if route.request.method != "GET":  # the page's HEAD checks pass: WebLLM's own fetch fails
                    ending = None
                if ending is not None and ending not in dropped:
                    dropped.add(ending)
                    run.dropped.append(route.request.url)
                    return route.abort("connectionreset")
                if route.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
                    return route.continue_()
                run.foreign_requests.append(route.request.url)
                return route.abort()

            context.route("**/*", guard)
            for index, page_url in enumerate((url, *extra_urls)):
                page = context.new_page()

                def on_console(message, page_index=index):
                    text = f"[{page_index}] {message.type}: {message.text}"
                    run.console.append(text)
                    if any(marker in message.text for marker in WEBGPU_ERROR_MARKERS):
                        run.webgpu_errors.append(text)

                page.on("console", on_console)
                page.on("pageerror", lambda error, page_index=index: run.page_errors.append(f"[{page_index}] {error}"))
                started = time.monotonic()
                page.goto(page_url)
                page.wait_for_function(
                    "() => window.llm2wasmPreview"
                    " && (window.llm2wasmPreview.ready || window.llm2wasmPreview.errors.length)",
                    timeout=load_timeout_s * 1000,
                    polling=1000,
                )
                run.preview_errors += page.evaluate("() => window.llm2wasmPreview.errors")
                run.retries += page.evaluate("() => window.llm2wasmPreview.retries")
                run.timings[f"load_{index}_s"] = time.monotonic() - started
                if run.preview_errors:
                    break
                started = time.monotonic()
                if chat_system is None:
                    result = page.evaluate(
                        "async ([prompt, maxTokens]) =>"
                        " await window.llm2wasmPreview.complete({prompt, maxTokens, temperature: 0})",
                        [prompt, max_tokens],
                    )
                else:
                    result = page.evaluate(
                        "async ([content, system, maxTokens]) =>"
                        " await window.llm2wasmPreview.chat({content, system, maxTokens, temperature: 0})",
                        [prompt, chat_system, max_tokens],
                    )
                run.timings[f"generate_{index}_s"] = time.monotonic() - started
                run.results.append(result)
                if index == 0 and screenshot is not None:
                    if chat_system is not None:
                        page.fill("#system", chat_system)
                    page.fill("#prompt", prompt)
                    page.fill("#max-tokens", str(max_tokens))
                    page.click("#send")
                    page.wait_for_function(
                        "() => document.getElementById('speed').textContent.length > 0", timeout=600_000
                    )
                    screenshot.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_preview(image: str, bundle: Path | None, record: Path | None = None) -> tuple[str, str]:
    """`llm2wasm preview` in the image, as `invoke preview` runs it, of a bundle or (bundle None) of a
    published model_list entry's file; returns (url, container name)."""
    port, name = free_port(), f"llm2wasm-preview-{uuid.uuid4().hex[:8]}"
    command = preview_command(PreviewJob(image=image, bundle=bundle, port=port, name=name, record=record))
    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "preview-info.json", timeout=2):
                return url, name
        except OSError:
            time.sleep(0.5)
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    raise RuntimeError(f"the preview server of {image} did not answer within 60 s")
