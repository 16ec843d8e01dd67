"""The browser helpers of llm2wasm.host.browser for the tests: the preview runs in the hermetic app image."""

from __future__ import annotations

from pathlib import Path

from llm2wasm.host import browser
from llm2wasm.host.browser import chromium_path, free_port, run_preview_page
from tests.conftest import app_image

__all__ = ["chromium_path", "free_port", "run_preview_page", "start_preview"]


def start_preview(bundle: Path | None, record: Path | None = None) -> tuple[str, str]:
    """The preview in the hermetic app image, of a bundle or of a published entry (`record`)."""
    return browser.start_preview(app_image(), bundle, record)
