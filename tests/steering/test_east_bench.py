"""bench/east.py: the bandit's bookkeeping and the whole comparison at a tiny size (so the script does not rot)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.east import Episodes, at_kl, exploratory, prompt_of, run


def test_exploratory_choices():
    assert exploratory([], 0) is None  # nothing known before the first pull
    assert exploratory([(0, 5)], 1) is True  # a machine never pulled
    assert exploratory([(0, 5)], 0) is False
    assert exploratory([(0, 5), (1, 7)], 0) is True and exploratory([(0, 5), (1, 7)], 1) is False


def test_episodes_share_rewards_and_the_prompt_lists_the_history():
    a, b = Episodes(4, 5, gap=2.0, sd=2.0, seed=3), Episodes(4, 5, gap=2.0, sd=2.0, seed=3)
    assert np.array_equal(a.rewards, b.rewards) and np.array_equal(a.uniforms, b.uniforms)
    assert a.rewards.min() >= 0 and a.rewards.max() <= 10
    p = prompt_of([(0, 4), (1, 9)], steps=5)
    assert "Pull 1: machine A, reward 4\nPull 2: machine B, reward 9" in p and "over 5 pulls" in p
    assert "not pulled any machine yet" in prompt_of([], 5)


def test_at_kl_interpolates_inside_the_sweep_only():
    rows = [{"kl": 0.0, "entropy": 0.1}, {"kl": 0.1, "entropy": 0.3}, {"kl": 0.2, "entropy": 0.7}]
    assert at_kl(rows, 0.05, "entropy") == pytest.approx(0.2) and at_kl(rows, 0.15, "entropy") == pytest.approx(0.5)
    assert at_kl(rows, 0.5, "entropy") is None


def test_run_at_tiny_size(tiny_dense):
    res = run(tiny_dense, layer=1, fit_episodes=3, eval_episodes=2, steps=3, betas=(1.0,), taus=(2.0,))
    json.dumps(res)
    assert res["fit"]["decisions"] == 9 and set(res["arms"]) == {"none", "east", "diff_in_means", "random",
                                                                  "temperature"}
    for rows in res["arms"].values():
        for r in rows:
            assert 0 <= r["entropy"] <= math.log(2) + 1e-9 and 0 <= r["exploratory"] <= 1 and r["kl"] >= -1e-12
    assert res["arms"]["none"][0]["kl"] == 0.0


def test_the_exploit_framing_adds_its_sentence_and_bad_framings_get_one_line(tiny_dense):
    from probe.errors import SteerscopeError

    assert "Always pull the machine that has paid the most so far." in prompt_of([(0, 4)], 5, "exploit")
    assert "paid the most" not in prompt_of([(0, 4)], 5)
    with pytest.raises(SteerscopeError, match="framing must be one of neutral, exploit"):
        run(tiny_dense, framing="greedy")
    res = run(tiny_dense, layer=1, fit_episodes=2, eval_episodes=1, steps=2, betas=(1.0,), taus=(2.0,),
              framing="exploit")
    assert res["framing"] == "exploit" and "paid the most" in res["example_prompt"]
