"""The main path on the real model (slow: about 5 minutes on 2 cores): ``steerscope demo --model
smollm2-135m-instruct`` at small sizes, served and driven in chromium; the numbers each page shows are
checked against the artifacts and a direct computation, with SmolLM2's own tokenization (no BOS)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from app.store import FeatureStore
from tests.browser import (
    STEERSCOPE_CLI,
    browser_page,
    metrics,
    no_exception,
    serve,
    settle,
    skip_without_browser,
    visit,
)

pytestmark = [pytest.mark.slow, skip_without_browser]
MODEL, SITE = "smollm2-135m-instruct", "blocks.15.hook_resid_post"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--model", MODEL, "--n-tokens", "8000", "--d-sae", "512",
                                   "--k", "16", "--no-serve"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def url(run, tmp_path_factory):
    with serve(STEERSCOPE_CLI, run / "features", tmp_path_factory.mktemp("smol-app") / "app.log") as u:
        yield u


@pytest.fixture(scope="module")
def page():
    with browser_page() as pg:
        yield pg


def test_overview_and_feature_pages_show_the_artifacts(page, url, run):
    ev = json.loads((run / "sae" / "eval.json").read_text())
    visit(page, url)
    shown = metrics(page)
    assert shown["FVU"] == f"{ev['fvu']:.3f}" and shown["features"] == "512"
    store = FeatureStore.open(run / "features")
    assert store.meta["site"] == SITE
    fid = int(store.overview().sort_values("density", ascending=False)["feature"].iloc[0])
    top = [r for r in store.examples(fid) if r["kind"] == "top"]
    visit(page, f"{url}/feature?feature={fid}")
    row = page.locator("div.ss-example").first
    assert abs(float(row.locator("span.ss-act").inner_text()) - top[0]["act"]) <= 0.006
    no_exception(page)


def test_search_uses_the_models_own_tokens(page, url, run):
    from probe.hooks import capture
    from probe.models import load_model
    from saes.base import load_dictionary

    text = "The capital of France is Paris."
    visit(page, f"{url}/search")
    box = page.locator(".st-key-search_text textarea")
    box.fill(text)
    box.press("Control+Enter")
    settle(page)
    tips = [t.get_attribute("title") for t in page.locator("div.ss-text span.ss-tok").all()]
    model, sae = load_model(MODEL, device="cpu"), load_dictionary(run / "sae")
    ids = model.to_tokens(text)
    assert ids[0, 0].item() != model.tokenizer.bos_token_id and len(tips) == ids.shape[1]  # no BOS, none dropped
    with torch.no_grad(), capture(model, [SITE]) as acts:
        model(ids, stop_at_layer=16)
        vals, idx = sae.encode(acts[SITE][0]).topk(4, dim=-1)
    for tip, v_row, i_row in zip(tips[1:], vals.tolist()[1:], idx.tolist()[1:], strict=True):
        shown = {int(j): float(v) for j, v in re.findall(r"#(\d+) (-?\d+\.\d+) \(\d+% of max\)", tip)}
        for j, v in zip(i_row, v_row, strict=True):
            if v > 0 and j in shown:
                assert abs(shown[j] - v) <= 0.02 * max(1.0, abs(v))
        assert set(shown) & {j for j, v in zip(i_row, v_row, strict=True) if v > 0}
    no_exception(page)
