"""Training schedules scale with the run: default passes over small data, warmup as a fraction, one warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from saes.schedule import MAX_EPOCHS, MAX_WARMUP, MIN_STEPS
from saes.schedule import resolve_defaults as _resolve
from saes.synthetic import mean_max_cosine, superposition
from saes.train import TrainConfig, lr_at, train


class Finite:
    def __init__(self, rows: int):
        self.default_tokens = rows


def resolved(rows: int, **kw) -> TrainConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _resolve(TrainConfig("topk", d_sae=64, k=4, **kw), Finite(rows))


def test_small_data_gets_enough_passes_and_a_proportional_warmup():
    cfg = resolved(200_000)  # one pass is 49 steps of 4096
    assert cfg.n_tokens == 200_000 * 21 and -(-cfg.n_tokens // 4096) >= MIN_STEPS
    assert cfg.warmup_steps == round(0.05 * -(-cfg.n_tokens // 4096))
    assert resolved(1000).n_tokens == 1000 * MAX_EPOCHS  # capped: tiny data is not repeated forever
    big = resolved(200_000_000)  # one pass is already 48,829 steps: one pass, warmup capped
    assert big.n_tokens == 200_000_000 and big.warmup_steps == MAX_WARMUP
    assert resolved(200_000, n_tokens=300_000, warmup_steps=7).n_tokens == 300_000  # explicit values win
    assert resolved(200_000, n_tokens=300_000, warmup_steps=7).warmup_steps == 7


def test_the_warmup_reaches_the_set_lr_inside_a_short_run():
    cfg = resolved(100_000, n_tokens=300_000, batch_size=4096, lr=1e-3)  # the old demo: 74 steps, warmup was 100
    steps = -(-cfg.n_tokens // cfg.batch_size)
    assert cfg.warmup_steps == 4 and lr_at(cfg, cfg.warmup_steps - 1, 0.5) == pytest.approx(1e-3)
    assert max(lr_at(cfg, s, s / steps) for s in range(steps)) == pytest.approx(1e-3)


def test_a_short_run_warns_once_saying_what_to_pass():
    with pytest.warns(UserWarning, match=r"only 74 steps of 4096 rows.*n_tokens=4096000.*batch_size=300") as got:
        _resolve(TrainConfig("topk", d_sae=64, k=4, n_tokens=300_000), Finite(100_000))
    assert len(got) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _resolve(TrainConfig("topk", d_sae=64, k=4), Finite(200_000))  # the default is long enough: silent


def test_defaults_alone_recover_planted_features_from_200k_rows():
    torch.manual_seed(0)
    data = superposition(64, 16, 200_000, p_active=0.05, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and without a warning
        sae = train("topk", data.X, d_sae=128, k=4, progress=False)
    assert mean_max_cosine(sae.W_dec.detach(), data.features) >= 0.9
