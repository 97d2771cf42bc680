"""bench/actadd.py at a tiny size on a tiny zoo model: the rows are what the library computes, coefficient 0
is the unsteered model, the best layer is the one the rule picks, the norms are recomputed independently,
and bad input gets one clear line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import actadd
from probe.errors import SteerscopeError


@pytest.fixture(scope="module")
def result(tiny_zoo):
    return actadd.run(str(tiny_zoo), layers=[0, 1], coeff=3.0, coeffs=[0.0, 6.0], md_coeffs=[0.0, 1.0], samples=1,
                      sweep_samples=2, new_tokens=5, seed=0, pairs=["love"], n_prompts=3, progress=False)


def test_shape_and_sizes(result):
    love = result["pairs"]["love"]
    assert result["layers"] == [0, 1] and love["n_prompts"] == 3
    assert love["layer_sweep"]["continuations"] == 3 and love["coefficient_sweep"]["continuations"] == 6
    assert [r["layer"] for r in love["layer_sweep"]["rows"]] == [0, 1]
    json.dumps(result, allow_nan=False)  # plain JSON: no inf or nan


def test_coefficient_zero_is_the_unsteered_model(result):
    love = result["pairs"]["love"]
    zero = love["coefficient_sweep"]["rows"][0]
    assert zero["coeff"] == 0.0 and zero["kl"] == 0.0 and zero["ppl_ratio"] == 1.0 == zero["ppl_ratio_downstream"]
    assert all("ppl_ratio_downstream" in r for r in love["layer_sweep"]["rows"])
    assert zero["greedy"] == love["greedy_unsteered"]
    assert zero["freq_ratio"] == 1.0 or (zero["baseline_words"] == 0 and zero["freq_ratio"] == "nan")
    md0 = love["mean_difference"]["rows"][0]
    assert md0["kl"] == 0.0 and md0["greedy"] == love["greedy_unsteered"]
    six = love["coefficient_sweep"]["rows"][1]
    assert six["kl"] > 0  # a coefficient of 6 on a random tiny model moves the next-token distribution


def test_best_layer_follows_the_rule(result):
    rows = result["pairs"]["love"]["layer_sweep"]["rows"]
    key = [(r["freq_ratio_lo"] if isinstance(r["freq_ratio_lo"], float) else -math.inf, r["topic_words"]) for r in rows]
    best = result["pairs"]["love"]["best_layer"]
    assert key[[r["layer"] for r in rows].index(best)] == max(key)


def test_norms_recomputed_independently(result, tiny_zoo):
    from probe.models import load_model
    from steering import SteeringVector

    m = load_model(str(tiny_zoo))
    data = actadd.load_data()
    pair = next(p for p in data["pairs"] if p["name"] == "love")
    for row in result["pairs"]["love"]["layer_sweep"]["rows"]:
        site = f"blocks.{row['layer']}.hook_resid_pre"
        norms, first = [], []
        for text in data["off_target"]:
            _, cache = m.run_with_cache(m.to_tokens(text), names_filter=[site])
            norms.append(cache[site][0, 1:].norm(dim=-1))
            first.append(cache[site][0, 0].norm())
        rnorm = float(torch.cat(norms).mean())
        assert row["residual_norm"] == pytest.approx(rnorm, abs=6e-4)  # printed to 3 decimals
        assert row["position0_norm"] == pytest.approx(float(torch.stack(first).mean()), abs=6e-4)
        v = SteeringVector.actadd(m, pair["add"], pair["sub"], layer=row["layer"])
        assert float(v.tensor[0].norm()) == 0.0 == row["row0_over_position0"]  # this model has a BOS: row 0 is zero
        want = 3.0 * float(v.tensor[1:].norm(dim=-1).mean()) / rnorm
        assert row["norm_over_residual"] == pytest.approx(want, rel=1e-3, abs=6e-5)  # 4 decimals


def test_bad_input_gets_one_clear_line(tiny_zoo, tmp_path):
    kw = dict(layers=[0], coeff=1.0, coeffs=[0.0], md_coeffs=[0.0], samples=1, sweep_samples=1, new_tokens=2, seed=0,
              progress=False)
    with pytest.raises(SteerscopeError, match="out of range"):
        actadd.run(str(tiny_zoo), **{**kw, "layers": [9]})
    with pytest.raises(SteerscopeError, match="unknown pair"):
        actadd.run(str(tiny_zoo), **kw, pairs=["joy"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"pairs": [{"name": "x"}], "prompts": ["a"], "off_target": ["b"]}))
    with pytest.raises(SteerscopeError, match="is not an ActAdd data file"):
        actadd.load_data(bad)
    with pytest.raises(SteerscopeError, match="comma-separated numbers"):
        actadd.main(["--coeffs", "1,x"])
