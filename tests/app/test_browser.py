"""End to end in a real browser: ``steerscope app`` (``streamlit run``) driven by Playwright with Debian's chromium.

Runs in the default suite; ``make test`` and CI install Debian's chromium with apt (no browser download).
Set STEERSCOPE_SKIP_BROWSER=1 to skip it on a machine without chromium; otherwise a missing browser fails. Screenshots go to $STEERSCOPE_SCREENSHOTS, or to a pytest temporary directory.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.browser import (
    CHROMIUM,
    browser_page,
    no_exception,
    screenshot_dir,
    serve,
    settle,
    skip_without_browser,
    visit,
)

pytestmark = skip_without_browser


def test_browser_is_installed():
    assert CHROMIUM.exists(), "install Debian's chromium (apt-get install chromium) or set STEERSCOPE_SKIP_BROWSER=1"
    assert importlib.util.find_spec("playwright") is not None, "pip install playwright (the dev extra)"


LAUNCH = "import sys, typer; from app.commands_app import register; a = typer.Typer(); register(a); a(sys.argv[1:])"


@pytest.fixture(scope="module")
def server(app_env, tmp_path_factory):
    """The dashboard on a free port, started through the ``app`` command, until /_stcore/health says ok."""
    with serve([sys.executable, "-c", LAUNCH], app_env["store"], tmp_path_factory.mktemp("server") / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    with browser_page() as pg:
        yield pg


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return screenshot_dir(tmp_path_factory)


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
