"""bench/patching_tasks.py: its IOI and capital pairs, and the whole run at a tiny size (so the script does not rot)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.patching_tasks import capital_pairs, ioi_pairs, known_capitals, run, task_data, wilson
from probe.errors import SteerscopeError
from probe.tokens import encode


def test_ioi_pairs_swap_only_the_repeated_subject(tiny_dense):
    p = ioi_pairs(tiny_dense, 6, seed=3)
    for b, s, io, sub in zip(p["base"], p["source"], p["answer"], p["expected"], strict=True):
        tb, ts = encode(tiny_dense, b), encode(tiny_dense, s)
        assert len(tb) == len(ts)
        differ = (tb != ts).nonzero().flatten().tolist()
        assert len(differ) == 1  # one token: the repeat
        assert int(tb[differ[0]]) == int(sub) and int(ts[differ[0]]) == int(io)  # S in the base, IO in the source
        assert int(io) != int(sub)


def test_fixed_ioi_pairs_are_aligned_token_by_token(tiny_dense):
    p = ioi_pairs(tiny_dense, 5, seed=1, fixed=True)
    lengths = {len(encode(tiny_dense, t)) for t in p["base"] + p["source"]}
    assert len(lengths) == 1


def test_capital_pairs_have_different_answers_and_held_out_countries(tiny_dense):
    rows = known_capitals(tiny_dense, [], require_known=False)
    p = capital_pairs(tiny_dense, rows, "The capital city of {X} is", 10, seed=0)
    assert bool((p["answer"] != p["expected"]).all())
    for b, s in zip(p["base"], p["source"], strict=True):
        assert b != s and len(encode(tiny_dense, b)) == len(encode(tiny_dense, s))
    train, test, _, facts = task_data(tiny_dense, "capitals", 8, 8, seed=0, require_known=False)
    country = lambda t: t.rsplit(" of ", 1)[1].removesuffix(" is")  # noqa: E731
    assert not {country(t) for t in train["base"] + train["source"]} & {country(t) for t in test["base"] + test["source"]}
    assert all(t.startswith("The capital of ") for t in test["base"])  # the held-out template
    assert facts["train_countries"] + facts["held_out_countries"] == facts["countries_kept"]


def test_run_at_tiny_size(tiny_dense):
    res = run(tiny_dense, layers=[0, 1], mlp_layer=1, n_train=6, n_test=4, steps=3, grid_pairs=4,
              require_known=False)
    json.dumps(res)
    for task in ("ioi", "capitals"):
        r = res[task]
        assert [s["layer"] for s in r["end_position_sweep"]] == [0, 1]
        for s in r["end_position_sweep"]:
            for arm in ("das", "diff_in_means", "full", "random"):
                assert 0 <= s[arm]["iia"] <= 1 and s[arm]["band"][0] <= s[arm]["iia"] <= s[arm]["band"][1]
        g = r["grid"]
        assert len(g["effects"]) == 2 and len(g["effects"][0]) == len(g["labels"])
        assert r["illusion"]["null_dim"] == tiny_dense.cfg.d_mlp - tiny_dense.cfg.d_model
    # layer 0's residual before block 0 is the token embedding: where base and source share the token the patch
    # changes nothing, so its effect is exactly 0; only the swapped subject can move the metric there. (The IOI
    # grid's pairs are aligned token by token; the tiny tokenizer splits countries unevenly, so capitals are not.)
    g = res["ioi"]["grid"]
    swapped = [j for j, lab in enumerate(g["labels"]) if "/" in lab]
    assert len(swapped) == 1 and all(g["effects"][0][j] == 0 for j in range(len(g["labels"])) if j not in swapped)
    assert g["effects"][0][swapped[0]] == pytest.approx(1.0, abs=1e-4)  # the whole input: the source's metric


def test_layers_out_of_range_get_one_clear_line(tiny_dense):
    with pytest.raises(SteerscopeError, match=r"layers must be in 0\.\.1"):
        run(tiny_dense, layers=[0, 5], n_train=2, n_test=2, steps=1, require_known=False)


def test_an_untrained_model_knows_too_few_capitals(tiny_dense):
    with pytest.raises(SteerscopeError, match="knows only"):
        task_data(tiny_dense, "capitals", 4, 4, seed=0)


def test_wilson_interval_holds_the_proportion():
    for k, n in [(0, 10), (3, 10), (10, 10), (24, 48)]:
        lo, hi = wilson(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
    assert torch.isnan(torch.tensor(wilson(0, 0))).all()
