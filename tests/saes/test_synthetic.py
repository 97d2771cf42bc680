"""Ground truth: a TopK SAE trained on features in superposition recovers them (mean max cosine >= 0.95)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from probe.errors import SteerscopeError
from saes.synthetic import mean_max_cosine, superposition
from saes.topk import TopKConfig, TopKSAE

N_FEATURES, D, P_ACTIVE, N_SAMPLES = 64, 32, 0.04, 20_000


def test_superposition_is_sparse_positive_and_exactly_linear():
    data = superposition(N_FEATURES, D, 4096, p_active=P_ACTIVE, min_mag=0.5, max_mag=1.5, seed=3)
    assert data.X.shape == (4096, D) and data.features.shape == (N_FEATURES, D) and data.codes.shape == (4096, N_FEATURES)
    assert_close(data.features.norm(dim=1), torch.ones(N_FEATURES))
    assert_close(data.X, data.codes @ data.features)
    on = data.codes[data.codes != 0]
    assert on.min() >= 0.5 and on.max() <= 1.5
    assert float((data.codes != 0).float().mean()) == pytest.approx(P_ACTIVE, rel=0.1)
    again = superposition(N_FEATURES, D, 4096, p_active=P_ACTIVE, seed=3)
    assert torch.equal(again.X, data.X)


def test_mean_max_cosine_is_one_for_the_truth_and_invariant_to_scale_and_order():
    f = superposition(N_FEATURES, D, 10, seed=0).features
    assert mean_max_cosine(f, f) == pytest.approx(1.0)
    assert mean_max_cosine(3.0 * f[torch.randperm(N_FEATURES)], f) == pytest.approx(1.0)
    assert mean_max_cosine(-f, f) < 0.5  # directions, not lines: a sign flip is not a recovery


def test_topk_sae_recovers_features_in_superposition():
    data = superposition(N_FEATURES, D, N_SAMPLES, p_active=P_ACTIVE, seed=0)
    torch.manual_seed(1234)  # not the data's seed: the SAE must not start on the true features
    sae = TopKSAE(TopKConfig(d_in=D, d_sae=2 * N_FEATURES, k=4))
    with torch.no_grad():
        sae.b_dec.copy_(data.X.mean(0))
    untrained = mean_max_cosine(sae.W_dec.detach(), data.features)
    assert untrained < 0.7  # the criterion below can fail

    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        x = data.X[torch.randint(0, N_SAMPLES, (256,), generator=g)]
        loss, _ = sae.training_loss(x)
        opt.zero_grad()
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
    assert mean_max_cosine(sae.W_dec.detach(), data.features) >= 0.95


def test_bad_superposition_arguments_are_clear_errors():
    with pytest.raises(SteerscopeError, match="d < n_features"):
        superposition(8, 8, 10)
    with pytest.raises(SteerscopeError, match="p_active"):
        superposition(16, 8, 10, p_active=0.0)
