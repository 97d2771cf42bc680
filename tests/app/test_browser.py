"""End to end in a real browser: ``steerscope app`` (``streamlit run``) driven by Playwright with Debian's chromium.

Runs in the default suite; ``make test`` and CI install Debian's chromium with apt (no browser download).
Set STEERSCOPE_SKIP_BROWSER=1 to skip it on a machine without chromium; otherwise a missing browser fails. Screenshots go to $STEERSCOPE_SCREENSHOTS, or to a pytest temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.app.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(os.environ.get("STEERSCOPE_SKIP_BROWSER") == "1", reason="STEERSCOPE_SKIP_BROWSER=1")


def test_browser_is_installed():
    assert CHROMIUM.exists(), "install Debian's chromium (apt-get install chromium) or set STEERSCOPE_SKIP_BROWSER=1"
    assert importlib.util.find_spec("playwright") is not None, "pip install playwright (the dev extra)"
LAUNCH = "import sys, typer; from app.commands_app import register; a = typer.Typer(); register(a); a(sys.argv[1:])"
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--no-first-run",
        "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app_env, tmp_path_factory):
    """The dashboard on a free port, started through the ``app`` command, until /_stcore/health says ok."""
    port, log = free_port(), tmp_path_factory.mktemp("server") / "streamlit.log"
    cmd = [sys.executable, "-c", LAUNCH, "app", "--store", str(app_env["store"]), "--port", str(port), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 90
    try:
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"the app did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        pg = browser.new_page(viewport={"width": 1440, "height": 1000})
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("STEERSCOPE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def settle(page) -> None:
    """Wait until the app is connected and its script has finished running."""
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']")
    page.wait_for_timeout(250)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']")


def visit(page, url: str) -> None:
    page.goto(url)
    settle(page)


def no_exception(page) -> None:
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stException")).to_have_count(0)


def test_every_page_in_a_real_browser(page, server, shots):
    from playwright.sync_api import expect

    visit(page, f"{server}/feature?feature=5")  # a deep link as the server's first visit still gets the router
    expect(page.get_by_test_id("stHeading").filter(has_text="Feature 5")).to_be_visible()
    nav = page.get_by_test_id("stSidebarNav")
    expect(nav.get_by_text("Interventions", exact=True)).to_be_visible()  # the app's router, not Streamlit's
    expect(nav.get_by_role("link", name="ui", exact=True)).to_have_count(0)  # legacy listing of app/pages/

    visit(page, server)
    expect(page.get_by_test_id("stHeading").first).to_contain_text("Overview")
    expect(page.get_by_text("never fired on the store's tokens")).to_be_visible()
    expect(page.locator(".js-plotly-plot").first).to_be_visible()
    no_exception(page)
    page.screenshot(path=str(shots / "overview.png"), full_page=True)

    visit(page, f"{server}/feature?feature=5")
    expect(page.get_by_test_id("stHeading").filter(has_text="Feature 5")).to_be_visible()
    tok = page.locator("span.ss-tok").first
    expect(tok).to_be_visible()
    assert "activation" in tok.get_attribute("title")
    page.locator(".st-key-feature_next button").click()
    settle(page)
    expect(page.get_by_test_id("stHeading").filter(has_text="Feature 6")).to_be_visible()
    assert "feature=6" in page.url
    expect(page.locator(".js-plotly-plot").first).to_be_visible()
    no_exception(page)
    page.screenshot(path=str(shots / "feature.png"), full_page=True)

    page.get_by_test_id("stSidebarNav").get_by_role("link", name="Search").click()
    settle(page)
    box = page.locator(".st-key-search_text textarea")
    box.fill("Mr. Darcy looked at Elizabeth and smiled")
    box.press("Control+Enter")
    settle(page)
    expect(page.get_by_text("Top features at token")).to_be_visible()
    expect(page.locator("span.ss-tok").first).to_be_visible()
    no_exception(page)
    page.screenshot(path=str(shots / "search.png"), full_page=True)

    visit(page, f"{server}/steer?features=3&coeff=40")
    page.locator(".st-key-steer_run button").click()
    settle(page)
    expect(page.locator("div.ss-gen")).to_have_count(2)
    expect(page.get_by_text("Steered", exact=True)).to_be_visible()
    no_exception(page)
    page.screenshot(path=str(shots / "steer.png"), full_page=True)

    visit(page, f"{server}/experts")
    expect(page.get_by_text("is a dense model")).to_be_visible()
    page.screenshot(path=str(shots / "experts.png"), full_page=True)

    visit(page, f"{server}/patching")
    page.get_by_role("button", name="Locate: patch the residual").click()
    settle(page)
    expect(page.get_by_text("recovered by copying that one residual-stream vector")).to_be_visible()
    page.locator(".st-key-patch_run button").click()
    settle(page)
    expect(page.get_by_text("effect of patching v")).to_be_visible()
    expect(page.locator(".js-plotly-plot")).to_have_count(2)
    no_exception(page)
    page.screenshot(path=str(shots / "patching.png"), full_page=True)
    assert len(list(shots.glob("*.png"))) >= 6
