"""Headless Chromium (Debian's package, driven by Python playwright; no browser download) for the report tests.

Every request other than the page file itself is aborted and recorded, console errors and page errors are
collected, and JavaScript dialogs (an ``alert`` from injected markup) are recorded and dismissed. Without Chromium
the tests skip, unless ``SPRAY_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("SPRAY_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def chromium_path() -> str:
    """The browser, or skip (fail when the environment demands a browser)."""
    path = os.environ.get("SPRAY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    problem = None
    if not path:
        problem = "Chromium is not installed (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "playwright is not installed (pip install -e .[test])"
    if problem:
        if os.environ.get("SPRAY_REQUIRE_BROWSER") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    return path


@dataclass
class BrowserLog:
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions
    blocked: list[str] = field(default_factory=list)  # requests that tried to leave the page file
    dialogs: list[str] = field(default_factory=list)  # alert/confirm/prompt messages


@contextmanager
def open_page(path: Path, *, viewport=(1400, 1000)) -> Iterator[tuple[object, BrowserLog]]:
    """A page showing the file at ``path``, loaded with everything outside it blocked."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    log = BrowserLog()
    own = Path(path).resolve().as_uri()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.on(
                "console", lambda m: log.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None
            )
            page.on("pageerror", lambda e: log.errors.append(f"page error: {e}"))

            def on_dialog(dialog) -> None:
                log.dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)

            def route(request_route) -> None:
                url = request_route.request.url
                if url == own or url.startswith("data:"):
                    request_route.continue_()
                else:
                    log.blocked.append(url)
                    request_route.abort()

            page.route("**/*", route)
            page.goto(own, wait_until="load")
            yield page, log
        finally:
            browser.close()


def wait_for_plots(page, timeout: float = 60_000) -> None:
    """Until every placeholder that has been handed to plotly has finished drawing."""
    page.wait_for_function(
        "document.querySelectorAll('[data-rendered]').length === "
        "document.querySelectorAll('[data-rendered=done]').length",
        timeout=timeout,
    )


def open_all_sections(page) -> None:
    page.evaluate(
        "document.querySelectorAll('details').forEach(d => { d.open = true; window.sprayReport.materialize(d); })"
    )
    wait_for_plots(page)


def undecoded_images(page) -> list[str]:
    """Alt texts of the images that did not decode (naturalWidth 0), after waiting for each to settle."""
    return page.evaluate(
        """async () => {
            const images = Array.from(document.images);
            await Promise.all(images.map(i => i.decode().catch(() => null)));
            return images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60));
        }"""
    )


def save_screenshot(page, name: str, *, full_page: bool = False) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=full_page)
    return path
