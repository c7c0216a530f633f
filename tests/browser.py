"""Headless Chromium for the tests that look at a page as a person does: Debian's
``chromium`` driven by the ``playwright`` package (its own driver, no browser download).
The tests skip, saying why, where either is missing; ``.ci/run`` installs both."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Without the background-networking flags Chromium keeps calling home on a closed network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Screenshots the tests keep (git-ignored).
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _playwright_missing() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return True
    return False


needs_browser = pytest.mark.skipif(
    not CHROMIUM or _playwright_missing(),
    reason="headless Chromium or playwright is not installed (apt-get install chromium; "
           "pip install 'kad[test]')")


@contextmanager
def chromium():
    """One headless Chromium for the caller's pages."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def keep_screenshot(page, name: str) -> Path:
    """Save a full-page screenshot as a kept artefact and print where."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def show_all_images(page) -> None:
    """Scroll every image into view (lazy images load only then) and wait until each has
    finished loading or failed."""
    for image in page.locator("img").all():
        image.scroll_into_view_if_needed()
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
