"""The README's main path in a real browser: the stores that ``steerscope demo`` builds (tests/e2e/conftest.py),
served by the ``steerscope`` CLI, every page driven with Playwright in Debian's chromium. Each assertion checks
values against the artifacts or an independent computation, not only that something is on the page.
Screenshots go to $STEERSCOPE_SCREENSHOTS (CI keeps them), else a temporary directory."""

from __future__ import annotations

import json
import re

import pytest
import torch

from app.store import FeatureStore
from tests.browser import (
    STEERSCOPE_CLI,
    browser_page,
    metrics,
    no_exception,
    plot_data,
    screenshot_dir,
    serve,
    settle,
    skip_without_browser,
    visit,
)

pytestmark = skip_without_browser
SITE = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return screenshot_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def page():
    with browser_page() as pg:
        yield pg


@pytest.fixture(scope="module")
def dense_app(demo_runs, tmp_path_factory):
    with serve(STEERSCOPE_CLI, demo_runs["dense"] / "features", tmp_path_factory.mktemp("dense") / "app.log",
               "--transcoders", str(demo_runs["dense"] / "transcoders")) as url:
        yield url


@pytest.fixture(scope="module")
def dense():
    from probe.models import load_model

    return load_model("austen-dense", device="cpu")


def test_overview_shows_the_demo_evaluation(page, dense_app, demo_runs, shots):
    ev = json.loads((demo_runs["dense"] / "sae" / "eval.json").read_text())
    visit(page, dense_app)
    shown = metrics(page)
    assert shown["FVU"] == f"{ev['fvu']:.3f}" and shown["CE score"] == f"{ev['ce_score']:.3f}"
    assert shown["L0"] == f"{ev['l0']:.1f}" and shown["features"] == "512"
    assert page.get_by_text("No evaluation yet").count() == 0
    no_exception(page)
    page.screenshot(path=str(shots / "main-overview.png"), full_page=True)


def test_feature_page_highlights_the_token_of_each_top_example(page, dense_app, demo_runs, shots):
    store = FeatureStore.open(demo_runs["dense"] / "features")
    fid = int(store.overview().sort_values("density", ascending=False)["feature"].iloc[0])
    top = [r for r in store.examples(fid) if r["kind"] == "top"]
    visit(page, f"{dense_app}/feature?feature={fid}")
    rows = page.locator("div.ss-example")
    assert rows.count() >= len(top) > 0
    for i in range(3):
        row = rows.nth(i)
        listed = float(row.locator("span.ss-act").inner_text())
        centre = row.locator("span.ss-center")
        assert centre.count() == 1
        act = float(re.search(r"activation (-?\d+\.\d+)", centre.get_attribute("title")).group(1))
        assert abs(act - listed) <= 0.006 and abs(listed - top[i]["act"]) <= 0.006
        assert centre.inner_text() == top[i]["tokens"][top[i]["center"]].replace("\n", "↵").replace("\t", "⇥") or "∅"
    no_exception(page)
    page.screenshot(path=str(shots / "main-feature.png"), full_page=True)


def test_search_by_text_lists_the_features_that_fire(page, dense_app, demo_runs, dense, shots):
    from probe.hooks import capture
    from saes.base import load_dictionary

    text = "Mr. Darcy looked at Elizabeth and smiled"
    visit(page, f"{dense_app}/search")
    box = page.locator(".st-key-search_text textarea")
    box.fill(text)
    box.press("Control+Enter")
    settle(page)
    tips = [t.get_attribute("title") for t in page.locator("div.ss-text span.ss-tok").all()]
    sae = load_dictionary(demo_runs["dense"] / "sae")
    toks = dense.to_tokens(text, prepend_bos=True)
    with torch.no_grad(), capture(dense, [SITE]) as acts:
        dense(toks, stop_at_layer=3)
        vals, idx = sae.encode(acts[SITE][0, 1:]).topk(8, dim=-1)
    assert len(tips) == toks.shape[1] - 1
    n_firing = 0
    for tip, v_row, i_row in zip(tips, vals.tolist(), idx.tolist(), strict=True):
        shown = {int(j): float(v) for j, v in re.findall(r"#(\d+) (-?\d+\.\d+) \(\d+% of max\)", tip)}
        expected = {j: v for j, v in zip(i_row, v_row, strict=True) if v > 0}
        assert shown.keys() == expected.keys(), tip
        assert all(abs(shown[j] - expected[j]) <= 0.006 for j in shown)
        n_firing += bool(expected)
    assert n_firing == len(tips)  # a TopK SAE fires on every token
    no_exception(page)
    page.screenshot(path=str(shots / "main-search.png"), full_page=True)


def test_steer_changes_the_text_and_reports_where(page, dense_app, demo_runs, dense, shots):
    store = FeatureStore.open(demo_runs["dense"] / "features")
    fid = int(store.overview().sort_values("density", ascending=False)["feature"].iloc[0])
    prompt = "She walked into the room and"
    visit(page, f"{dense_app}/steer?features={fid}&coeff=60")
    page.locator(".st-key-steer_run button").click()
    settle(page)
    base, steered = (g.inner_text() for g in page.locator("div.ss-gen").all())
    assert base.startswith(prompt) and steered.startswith(prompt) and base != steered
    ids = [dense.to_tokens(t[len(prompt):], prepend_bos=False)[0].tolist() for t in (base, steered)]
    first = next(i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b) if ids[0][:len(ids[1])] != ids[1][:len(ids[0])] \
        else min(map(len, ids))
    report = page.locator(".ss-diff").inner_text()
    assert f"at generated token {first + 1};" in report, report
    no_exception(page)
    page.screenshot(path=str(shots / "main-steer.png"), full_page=True)


def test_patching_locate_puts_the_title_information_at_the_title_token(page, dense_app, shots):
    visit(page, f"{dense_app}/patching")
    for key, value in (("patch_base", "Mr. Darcy came in and"), ("patch_source", "Mrs. Darcy came in and")):
        box = page.locator(f".st-key-{key} textarea")
        box.fill(value)
        box.press("Control+Enter")
        settle(page)
    for key, value in (("patch_good", " she"), ("patch_bad", " he")):
        box = page.locator(f".st-key-{key} input")
        box.fill(value)
        box.press("Enter")
        settle(page)
    page.get_by_role("button", name=re.compile("^Locate")).click()
    settle(page)
    no_exception(page)
    (trace,) = plot_data(page, 0)
    z = torch.tensor(trace["z"])
    assert z.shape[0] == 5 and trace["y"][0] == "blocks.0.hook_resid_pre"
    assert bool(((z >= -0.5) & (z <= 1.5)).all()), z
    title = [k for k, label in enumerate(trace["x"]) if "/" in label.split(": ", 1)[1]]
    assert len(title) == 1 and "Mr" in trace["x"][title[0]]
    assert int(z[0].argmax()) == title[0] and float(z[0, title[0]]) > 0.5
    assert trace["text"][0][title[0]] == f"{float(z[0, title[0]]):.2f}"  # the number shown in the cell
    page.screenshot(path=str(shots / "main-patching.png"), full_page=True)


def test_experts_page_on_the_moe_demo_store(page, demo_runs, tmp_path_factory, shots):
    from probe.models import load_model
    from steering import ExpertScores

    with serve(STEERSCOPE_CLI, demo_runs["moe"] / "features", tmp_path_factory.mktemp("moe") / "app.log") as url:
        visit(page, f"{url}/experts")
        behaviour = page.locator(".st-key-experts_behaviour textarea").input_value()
        control = page.locator(".st-key-experts_control textarea").input_value()
        page.locator(".st-key-experts_score button").click()
        settle(page)
        (trace,) = plot_data(page, 0)
        moe = load_model("austen-moe", device="cpu")
        lines = [[p for p in t.splitlines() if p.strip()] for t in (behaviour, control)]
        scores = ExpertScores.score(moe, *lines)
        torch.testing.assert_close(torch.tensor(trace["z"]).float(), scores.diff("weight").float(), atol=1e-5, rtol=0)
        top = ", ".join(f"L{layer}E{e}" for layer, e in scores.top(2))
        page.locator(".st-key-experts_generate button").click()
        settle(page)
        no_exception(page)
        assert page.locator("div.ss-gen").count() == 2
        assert page.get_by_text(f"ExpertSwitch(off=[{top}], force=[])", exact=True).count() == 1
        page.screenshot(path=str(shots / "main-experts.png"), full_page=True)


def test_circuit_page_traces_the_prompt_as_the_library_does(page, dense_app, demo_runs, dense, shots):
    from saes.circuits import load_transcoders
    from saes.circuits.attribution import attribute

    visit(page, f"{dense_app}/circuit")
    settle(page)
    shown = metrics(page)
    g = attribute(dense, load_transcoders(demo_runs["dense"] / "transcoders"), "Mr. Darcy bowed to Elizabeth and said "
                  "that he", max_feature_nodes=1000)
    data = g.to_json(0.8, 0.98)
    assert float(shown["replacement"]) == pytest.approx(g.scores["replacement"], abs=1e-3)
    assert float(shown["completeness"]) == pytest.approx(g.scores["completeness"], abs=1e-3)
    assert shown["active features"] == f"{g.n_features:,}"
    assert shown["nodes · links kept"] == f"{len(data['nodes'])} · {len(data['links'])}"
    traces = plot_data(page)
    drawn = sum(len(t["x"]) for t in traces if t["text"] is None and t["z"] is None and None not in (t["x"] or [None]))
    assert drawn == len(data["nodes"])  # every kept node is a marker (edges are the traces with None breaks)
    assert page.get_by_text("Features in the pruned graph").count() == 1
    assert page.get_by_text("De-embedding").count() == 1
    no_exception(page)
    page.screenshot(path=str(shots / "main-circuit.png"), full_page=True)

    # the demo built a feature store per layer: the selected feature opens in its layer's store, with its connections
    from saes.circuits.connections import de_embedding, upstream

    link = page.get_by_role("link", name=re.compile(r"Open feature \d+ on the Feature page \(layer \d+ store\)"))
    feat, layer = (int(v) for v in re.search(r"feature (\d+) .*layer (\d+)", link.inner_text()).groups())
    link.click()
    settle(page)
    assert page.get_by_role("heading", name=f"Feature {feat}").count() == 1
    assert page.get_by_text(f"blocks.{layer}.ln2.hook_normalized").count() >= 1  # the layer store's site
    assert page.get_by_text("Connections (weights-based, prompt-free)").count() == 1
    tcs = load_transcoders(demo_runs["dense"] / "transcoders")
    assert page.get_by_text("De-embedding").count() == 1  # its table is a canvas grid: the library values are
    assert len(de_embedding(dense, tcs, layer, feat)) == 10  # checked against it in tests/app/test_pages.py
    for r in upstream(tcs, layer, feat)[:3]:  # earlier layers' stores exist too: each connection is a link
        assert page.get_by_role("link", name=f"L{r['layer']} #{r['feature']}  ·  {r['weight']:+.4f}").count() == 1
    no_exception(page)
    page.screenshot(path=str(shots / "main-feature-transcoder.png"), full_page=True)
