"""The browser helpers of llm2wasm.host.browser for the tests: the preview runs in the hermetic app image."""

from __future__ import annotations

import subprocess
from pathlib import Path

from llm2wasm.host import browser
from llm2wasm.host.browser import BrowserRun, chromium_path, free_port, run_preview_page
from tests.conftest import app_image

__all__ = ["chromium_path", "free_port", "run_in_one_browser", "run_preview_page", "start_preview"]


def start_preview(bundle: Path | None, record: Path | None = None) -> tuple[str, str]:
    """The preview in the hermetic app image, of a bundle or of a published entry (`record`)."""
    return browser.start_preview(app_image(), bundle, record)


def run_in_one_browser(prompt: str, steps: int, bundles=(), records=()) -> BrowserRun:
    """A preview of each bundle, then of each published entry, all opened in one Chromium (one launch
    pays for the sampler's shader compile once), in that order; the previews are stopped after."""
    previews = [start_preview(bundle) for bundle in bundles]
    previews += [start_preview(None, record=record) for record in records]
    try:
        urls = [url for url, _ in previews]
        return run_preview_page(urls[0], prompt, steps, extra_urls=tuple(urls[1:]))
    finally:
        for _, name in previews:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
