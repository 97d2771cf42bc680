"""SNMF: recovery of planted features, monotone coefficient updates, the Dictionary contract, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from probe.errors import SteerscopeError
from saes.base import load_dictionary
from saes.snmf import SNMF, SNMFConfig, fit_snmf, n_kept, residual_directions, snmf_step, top_contexts

D_MLP, RANK, KEEP, N = 64, 6, 8, 1500
SPARSITY = KEEP / D_MLP


def planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Z [d_mlp, r] with KEEP mixed-sign nonzeros per column and sparse Y [r, N] >= 0."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.zeros(D_MLP, RANK)
    for j in range(RANK):
        idx = torch.randperm(D_MLP, generator=g)[:KEEP]
        Z[idx, j] = torch.randn(KEEP, generator=g).sign() * (0.5 + torch.rand(KEEP, generator=g))
    Y = torch.rand(RANK, N, generator=g) * (torch.rand(RANK, N, generator=g) < 0.3)
    return Z, Y


def mean_max_cos(Z_true: torch.Tensor, Z_learned: torch.Tensor) -> float:
    a = Z_true / Z_true.norm(dim=0)
    b = Z_learned / Z_learned.norm(dim=0).clamp_min(1e-12)
    return float((a.T @ b).abs().max(dim=1).values.mean())


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    Z, Y = planted()
    return (Z @ Y).T  # X = A^T [N, d_mlp]


@pytest.fixture(scope="module")
def fitted(data) -> SNMF:
    return fit_snmf(data, rank=RANK, sparsity=SPARSITY, init="kmeans", max_iter=300, tol=1e-8, seed=0, progress=False)


class FakeStore:
    """The one method of ActivationStore that fit_snmf uses."""

    def __init__(self, X: torch.Tensor):
        self.X, self.calls = X, []

    def batches(self, site, batch_size, shuffle=False):
        self.calls.append((site, batch_size, shuffle))
        for s in range(0, len(self.X), batch_size):
            yield self.X[s:s + batch_size]


# --- the algorithm ----------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["random", "kmeans", "svd"])
def test_recovers_planted_sparse_features(init):
    Z, Y = planted()
    snmf = fit_snmf((Z @ Y).T, rank=RANK, sparsity=SPARSITY, init=init, max_iter=300, tol=1e-8, seed=0, progress=False)
    assert mean_max_cos(Z, snmf.Z) >= 0.9
    assert snmf.cfg.training["fvu_uncentred"] < 1e-2


def test_loss_never_increases_across_a_coefficient_update(fitted):
    res = fitted.fit_result
    assert len(res.losses_before) == len(res.losses_after) == fitted.cfg.training["n_iter"]
    for before, after in zip(res.losses_before, res.losses_after, strict=True):
        assert after <= before * (1 + 1e-5) + 1e-9


def test_step_is_monotone_in_float64_from_a_random_start(data):
    X = data.double()
    G = torch.rand(N, RANK, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 1e-3
    for _ in range(40):
        W, G, before, after = snmf_step(X, G, KEEP)
        assert after <= before * (1 + 1e-12)
        assert bool((G >= 0).all())
        assert math.isclose(after, float((X - G @ W).pow(2).sum()), rel_tol=1e-12)


def test_coefficients_stay_nonnegative(fitted, data):
    assert bool((fitted.fit_result.coefficients >= 0).all())
    noise = torch.randn(200, D_MLP, generator=torch.Generator().manual_seed(2))
    assert bool((fitted.encode(noise) >= 0).all())


@pytest.mark.parametrize("sparsity", [SPARSITY, 0.1, 1 / D_MLP, 1.0])
def test_each_feature_keeps_exactly_the_requested_count(data, sparsity):
    live = data + 0.01 * torch.randn(data.shape, generator=torch.Generator().manual_seed(6))  # no dead neurons
    snmf = fit_snmf(live, rank=RANK, sparsity=sparsity, max_iter=5, seed=0, progress=False)
    want = n_kept(sparsity, D_MLP)
    assert want == max(1, math.ceil(sparsity * D_MLP - 1e-9))
    assert (snmf.W_dec != 0).sum(dim=1).tolist() == [want] * RANK
    torch.testing.assert_close(snmf.W_dec.norm(dim=1), torch.ones(RANK), rtol=0, atol=1e-5)


def test_encode_reproduces_the_training_coefficients(fitted, data):
    G = fitted.fit_result.coefficients
    codes = fitted.encode(data)
    assert float((codes - G).norm() / G.norm()) < 0.02
    out = fitted(data)
    torch.testing.assert_close(out.recon, fitted.decode(out.codes), rtol=0, atol=0)
    assert float((out.recon - data).norm() / data.norm()) < 0.02


def test_encode_recovers_exact_nonnegative_codes_and_keeps_leading_dims(fitted):
    c = torch.rand(3, 5, RANK, generator=torch.Generator().manual_seed(3)) * (torch.rand(3, 5, RANK) < 0.5)
    got = fitted.encode(fitted.decode(c))
    assert got.shape == (3, 5, RANK)
    torch.testing.assert_close(got, c, rtol=0, atol=1e-3)


def test_fit_is_deterministic_and_a_store_matches_a_tensor(data):
    kw = dict(rank=RANK, sparsity=SPARSITY, max_iter=20, seed=4, progress=False)
    a = fit_snmf(data, **kw)
    store = FakeStore(data)
    b = fit_snmf(store, site="blocks.0.mlp.hook_post", batch_size=256, **kw)
    assert store.calls == [("blocks.0.mlp.hook_post", 256, False)]
    torch.testing.assert_close(a.W_dec, b.W_dec, rtol=0, atol=0)
    c = fit_snmf(FakeStore(data), site="s", batch_size=256, n_tokens=700, **kw)
    assert c.cfg.training["n_tokens"] == 700 and c.fit_result.coefficients.shape == (700, RANK)


# --- the Dictionary contract ------------------------------------------------------------------
def test_save_load_round_trip(fitted, data, tmp_path):
    fitted.save(tmp_path / "snmf")
    loaded = load_dictionary(tmp_path / "snmf")
    assert type(loaded) is SNMF and loaded.cfg == fitted.cfg
    torch.testing.assert_close(loaded.W_dec, fitted.W_dec, rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode(data[:50]), fitted.encode(data[:50]), rtol=0, atol=0)


def test_is_not_trained_by_gradient(fitted, data):
    assert SNMF.trainable_by_gradient is False
    with pytest.raises(NotImplementedError, match="fit_snmf"):
        fitted.training_loss(data[:4])
    with pytest.raises(SteerscopeError, match="no target"):
        fitted(data[:4], target=data[:4])


def test_top_contexts_match_a_full_sort_and_chunking(fitted, data):
    top = top_contexts(fitted, data, k=10, batch_size=4096)
    codes = fitted.encode(data).T
    torch.testing.assert_close(top.values, codes.topk(10, dim=1).values, rtol=0, atol=0)
    torch.testing.assert_close(codes.gather(1, top.indices), top.values, rtol=0, atol=0)
    chunked = top_contexts(fitted, data, k=10, batch_size=97)
    torch.testing.assert_close(chunked.values, top.values, rtol=0, atol=1e-6)


def test_residual_directions(fitted):
    W_out = torch.randn(D_MLP, 16, generator=torch.Generator().manual_seed(5))
    dirs = residual_directions(fitted, W_out)
    torch.testing.assert_close(dirs, fitted.Z.T @ W_out, rtol=1e-6, atol=1e-6)
    unit = residual_directions(fitted, W_out, normalize=True)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(RANK), rtol=0, atol=1e-5)
    with pytest.raises(SteerscopeError, match="W_out"):
        residual_directions(fitted, W_out.T)


# --- bad inputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, -3, 2.5])
def test_bad_rank(data, rank):
    with pytest.raises(SteerscopeError, match="rank must be a positive integer"):
        fit_snmf(data, rank=rank, progress=False)


@pytest.mark.parametrize("sparsity", [0.0, -0.1, 1.5])
def test_bad_sparsity(data, sparsity):
    with pytest.raises(SteerscopeError, match=r"sparsity must be in \(0, 1\]"):
        fit_snmf(data, rank=RANK, sparsity=sparsity, progress=False)
    with pytest.raises(SteerscopeError, match="sparsity"):
        SNMFConfig(d_in=D_MLP, d_sae=RANK, sparsity=sparsity)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations(data, bad):
    X = data.clone()
    X[3, 7] = bad
    with pytest.raises(SteerscopeError, match="1 NaN/inf"):
        fit_snmf(X, rank=RANK, progress=False)


def test_other_bad_inputs(data):
    with pytest.raises(SteerscopeError, match="Did you mean: kmeans"):
        fit_snmf(data, rank=RANK, init="kmean", progress=False)
    with pytest.raises(SteerscopeError, match="needs site="):
        fit_snmf(FakeStore(data), rank=RANK, progress=False)
    with pytest.raises(SteerscopeError, match=r"\[N, d_mlp\]"):
        fit_snmf(data[0], rank=RANK, progress=False)
    with pytest.raises(SteerscopeError, match="at least rank"):
        fit_snmf(data[:3], rank=RANK, progress=False)
    with pytest.raises(SteerscopeError, match="d_in=64"):
        SNMF(SNMFConfig(d_in=D_MLP, d_sae=RANK)).encode(torch.zeros(2, D_MLP + 1))
