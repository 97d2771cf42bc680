"""Helpers for the browser tests: the dashboard served by the ``steerscope app`` command, driven by Playwright
with Debian's chromium (never a downloaded browser). STEERSCOPE_SKIP_BROWSER=1 skips those tests."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--no-first-run",
        "--disable-component-update", "--disable-sync"]
skip_without_browser = pytest.mark.skipif(os.environ.get("STEERSCOPE_SKIP_BROWSER") == "1",
                                          reason="STEERSCOPE_SKIP_BROWSER=1")


@contextlib.contextmanager
def serve(cmd_prefix: list[str], store: Path, log: Path, *extra: str):
    """``cmd_prefix + [app, --store, STORE, --port, P, ...]`` until /_stcore/health says ok; yields the URL
    (``bench.app_load.serve_app``; a server that does not start fails the test with its log)."""
    from bench.app_load import serve_app

    server = serve_app(store, log, *extra, cmd_prefix=cmd_prefix)
    try:
        url = server.__enter__()
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


STEERSCOPE_CLI = [sys.executable, "-m", "app.cli"]  # the console script's entry point, app.cli:main


@contextlib.contextmanager
def browser_page(width: int = 1440, height: int = 1000):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        pg = browser.new_page(viewport={"width": width, "height": height})
        pg.set_default_timeout(60_000)
        try:
            yield pg
        finally:
            browser.close()


def screenshot_dir(tmp_path_factory) -> Path:
    d = Path(os.environ.get("STEERSCOPE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def settle(page) -> None:
    """Wait until the app is connected and its script has finished running."""
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']")
    page.wait_for_timeout(250)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']")
    # on a new session the elements arrive a moment after the script finished: wait for the placeholders to go
    page.wait_for_function("() => document.querySelectorAll(\"[data-testid='stSkeleton']\").length === 0")


def visit(page, url: str) -> None:
    page.goto(url)
    settle(page)


def no_exception(page) -> None:
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stException")).to_have_count(0)


def metrics(page) -> dict[str, str]:
    """{label: value} of every st.metric on the page."""
    out = {}
    for m in page.get_by_test_id("stMetric").all():
        out[m.get_by_test_id("stMetricLabel").inner_text().strip()] = m.get_by_test_id("stMetricValue").inner_text().strip()
    return out


def plot_data(page, index: int = 0) -> list[dict]:
    """The data traces (z, x, y, text) of the ``index``-th plotly chart, as the browser holds them; arrays that
    plotly received base64-encoded (numpy input) are decoded to nested lists."""
    traces = page.evaluate("(i) => document.querySelectorAll('.js-plotly-plot')[i].data.map(t => "
                           "({z: t.z, x: t.x, y: t.y, text: t.text}))", index)
    for t in traces:
        for key, v in t.items():
            if isinstance(v, dict) and "bdata" in v:
                import base64

                import numpy as np

                a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
                shape = [int(n) for n in str(v.get("shape", len(a))).split(",")]
                t[key] = a.reshape(shape).tolist()
    return traces
