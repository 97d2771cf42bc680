"""Concurrent browser sessions against one served dashboard: every session is its own chromium context
(its own Streamlit session), visiting feature pages and text searches at the same time as the others.

    python -m bench.app_load --store runs/demo/features --sessions 8 --pages 6

Each session opens the app once (the cold load: the browser fetches and starts the Streamlit frontend and
a new server session begins; timed apart), then works inside it as a user does: a feature page is a new
id typed into the Feature page's id box, a search is the Search page picked in the sidebar and a text
submitted. A visit counts from that action until the app is connected, its script has stopped and no
placeholder is left; it is an error when the page shows a Streamlit exception, the expected heading or
tokens are missing, or the wait times out. Prints p50/p95 page time and the error count; ``bench.app``
runs it too (``--sessions``). Debian's chromium, never a downloaded browser.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--no-first-run",
        "--disable-component-update", "--disable-sync"]
SEARCHES = ["Mr. Darcy looked at Elizabeth and smiled", "It is a truth universally acknowledged",
            "She walked to the window", "\"My dear,\" said his lady"]
SETTLED = ("() => { const a = document.querySelector(\"[data-testid='stApp']\");"
           " return a && a.dataset.testConnectionState === 'CONNECTED' && a.dataset.testScriptState === 'notRunning'"
           " && document.querySelectorAll(\"[data-testid='stSkeleton']\").length === 0; }")


@dataclass
class LoadResult:
    times: list[float] = field(default_factory=list)  # seconds per visit that succeeded
    kinds: list[str] = field(default_factory=list)  # "feature" or "search", per entry of times
    errors: list[str] = field(default_factory=list)  # one line per failed visit
    cold: list[float] = field(default_factory=list)  # seconds of each session's first load

    def quantile(self, q: float, kind: str | None = None) -> float:
        t = sorted(x for x, k in zip(self.times, self.kinds, strict=True) if kind in (None, k))
        return statistics.quantiles(t, n=100, method="inclusive")[round(q * 100) - 1] if len(t) > 1 else t[0]

    def summary(self) -> str:
        if not self.times:
            return f"no visit succeeded; {len(self.errors)} errors (first: {self.errors[:1]})"
        per_kind = "; ".join(f"{k} p50 {self.quantile(.5, k) * 1e3:.0f} ms p95 {self.quantile(.95, k) * 1e3:.0f} ms"
                             for k in sorted(set(self.kinds)))
        cold = f"cold load p50 {statistics.median(self.cold) * 1e3:.0f} ms; " if self.cold else ""
        return (f"{cold}{len(self.times) + len(self.errors)} visits: p50 {self.quantile(.5) * 1e3:.0f} ms, "
                f"p95 {self.quantile(.95) * 1e3:.0f} ms, {len(self.errors)} errors ({per_kind})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(store: Path, log: Path, *extra: str, cmd_prefix: list[str] | None = None,
              timeout: float = 90.0) -> Iterator[str]:
    """``CMD_PREFIX app --store STORE --port P --device cpu EXTRA...`` (default prefix: ``python -m app.cli``, the
    ``steerscope`` entry point) on a free 127.0.0.1 port until its health check says ok; yields the URL."""
    port = free_port()
    cmd = [*(cmd_prefix or [sys.executable, "-m", "app.cli"]), "app", "--store", str(store), "--port", str(port),
           "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + timeout
    try:
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the app did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def plan(n_features: int, sessions: int, pages: int, seed: int = 0) -> list[list[tuple[str, str | int]]]:
    """Per session, ``pages`` visits alternating feature pages (random ids) and searches (fixed texts)."""
    rng = random.Random(seed)
    return [[("feature", rng.randrange(n_features)) if (s + j) % 2 == 0 else ("search", SEARCHES[(s + j) % len(SEARCHES)])
             for j in range(pages)] for s in range(sessions)]


async def _settle(page, timeout_ms: float) -> None:
    await page.wait_for_timeout(100)  # the script starts a moment after the action
    await page.wait_for_function(SETTLED, timeout=timeout_ms)


async def _visit(page, kind: str, arg, timeout_ms: float) -> float:
    t0 = time.perf_counter()
    if kind == "feature":
        if not await page.locator(".st-key-feature_id input").count():
            await page.get_by_test_id("stSidebarNavLink").filter(has_text="Feature").click()
            await _settle(page, timeout_ms)
        box = page.locator(".st-key-feature_id input")
        await box.fill(str(arg))
        await box.press("Enter")
        heading = page.get_by_role("heading", name=f"Feature {arg}", exact=True)
        await heading.wait_for(timeout=timeout_ms)  # the new page, not the one before the action
        await _settle(page, timeout_ms)
    else:
        await page.get_by_test_id("stSidebarNavLink").filter(has_text="Search").click()
        await _settle(page, timeout_ms)
        box = page.locator(".st-key-search_text textarea")
        await box.fill(arg)
        await box.press("Control+Enter")
        await page.wait_for_function("(w) => { const t = document.querySelector('div.ss-text');"
                                     " return t && t.innerText.replace(/[\\s\"]/g, '').includes(w); }",
                                     arg=re.sub(r'[\s"]', "", arg)[:12], timeout=timeout_ms)
        await _settle(page, timeout_ms)
        heading = page.locator("div.ss-text span.ss-tok").first
    elapsed = time.perf_counter() - t0
    if await page.get_by_test_id("stException").count():
        raise RuntimeError((await page.get_by_test_id("stException").first.inner_text()).splitlines()[0][:200])
    if not await heading.count():
        raise RuntimeError("the expected heading/tokens are missing")
    return elapsed


async def _session(browser, url: str, visits, result: LoadResult, timeout_ms: float) -> None:
    ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await ctx.new_page()
    try:
        t0 = time.perf_counter()
        await page.goto(f"{url}/feature?feature=0")
        await page.wait_for_function(SETTLED, timeout=timeout_ms)
        result.cold.append(time.perf_counter() - t0)
        for kind, arg in visits:
            try:
                result.times.append(await _visit(page, kind, arg, timeout_ms))
                result.kinds.append(kind)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported, none stops the others
                result.errors.append(f"{kind} {arg!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        await ctx.close()


async def _load(url: str, visits_per_session, timeout_ms: float) -> LoadResult:
    from playwright.async_api import async_playwright

    result = LoadResult()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            await asyncio.gather(*[_session(browser, url, v, result, timeout_ms) for v in visits_per_session])
        finally:
            await browser.close()
    return result


def load(url: str, n_features: int, sessions: int = 8, pages: int = 6, timeout_s: float = 120.0) -> LoadResult:
    """Run ``sessions`` browser sessions at once against ``url``, ``pages`` visits each."""
    return asyncio.run(_load(url, plan(n_features, sessions, pages), timeout_s * 1e3))


def main() -> None:
    import tempfile

    from app.store import FeatureStore

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True, help="a feature store directory (steerscope features)")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--pages", type=int, default=6, help="visits per session")
    args = ap.parse_args()
    n = FeatureStore.open(args.store).n_features
    with tempfile.TemporaryDirectory() as tmp, serve_app(args.store, Path(tmp) / "app.log") as url:
        res = load(url, n, args.sessions, args.pages)
    print(f"{args.sessions} concurrent sessions on {n:,} features: {res.summary()}")
    for e in res.errors[:10]:
        print("  error:", e)


if __name__ == "__main__":
    main()
