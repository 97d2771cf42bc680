"""Fast kernels (saes.kernels) against the dense reference: values, indices, reconstructions, gradients.

Tolerances (``torch.testing.assert_close``), relative to the data scale:
- fp64: rtol = atol = 1e-9 (the fast path recomputes fp64 values exactly);
- fp32: rtol = atol = 1e-4 (GEMM blocking changes the rounding);
- bf16 / fp16 inputs: selection on fp32 accumulations (exact vs an fp32 reference up to ties),
  values within one output ulp, reconstructions and gradients rtol = atol = 3e-2 / 1e-2.
"Up to ties": with continuous data a selection is accepted when no unselected latent beats the
k-th selected one by more than the tolerance; with integer-valued data (exact arithmetic, many ties)
indices must equal the stable-sort reference exactly (lowest id wins).

The Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess (the interpreter must be enabled
before ``triton`` is first imported, and sae_lens/transformer_lens import it): run this file as a
script to execute those cases.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saes.kernels import auxk_forward, sparse_decode, topk_encode, topk_sae_forward
from saes.kernels.keys import pack_keys, unpack_keys
from saes.kernels.reference import dense_pre_acts, dense_topk_indices, dense_topk_sae

FAST = settings(max_examples=40, deadline=None)
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@st.composite
def problems(draw, max_n=24, max_d=16, max_m=300):
    """(N, d, M, k, tile, integer_valued, seed) with awkward sizes, k = 1 and k close to M."""
    m = draw(st.integers(1, max_m))
    k = draw(st.one_of(st.just(1), st.just(m), st.integers(1, m), st.integers(max(1, m - 3), m)))
    tile = draw(st.one_of(st.none(), st.integers(1, max_m)))
    return (
        draw(st.integers(1, max_n)),
        draw(st.integers(1, max_d)),
        m,
        k,
        tile,
        draw(st.booleans()),
        draw(st.integers(0, 2**31 - 1)),
    )


def make(n, d, m, integer, seed, dtype=torch.float64, d_out=None):
    """x, W_enc, b_enc, W_dec, b_dec; integer-valued data gives exact arithmetic and many ties."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(n, d), (d, m), (m,), (m, d_out or d), (d_out or d,)]
    if integer:
        return [torch.randint(-3, 4, s, generator=gen).to(dtype) for s in shapes]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def check_selection(values, indices, pre, k, tol):
    """``indices`` is a valid top-k of ``pre`` up to ``tol``; values equal ``pre`` there, sorted desc."""
    assert indices.shape == values.shape == (pre.shape[0], k) and indices.dtype == torch.int64
    assert all(len(set(row)) == k for row in indices.tolist())
    torch.testing.assert_close(
        values.to(pre.dtype), pre.gather(1, indices), rtol=tol, atol=tol * pre.abs().max().item()
    )
    assert bool((values[:, :-1] >= values[:, 1:]).all())
    rest = pre.scatter(1, indices, float("-inf"))
    assert bool((rest.amax(1) <= pre.gather(1, indices).amin(1) + tol * (1 + pre.abs().max())).all())


def test_keys_round_trip_and_order():
    v = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.5e-40, -3.5e-40, float("inf"), float("-inf"), 2.0, 2.0])
    i = torch.tensor([5, 3, 0, 1, 2, 9, 7, 8, 6, 4])
    values, indices = unpack_keys(pack_keys(v, i))
    assert torch.equal(indices, i) and torch.equal(values, v + 0.0)  # -0.0 is stored as +0.0
    order = torch.argsort(pack_keys(v, i), descending=True)
    expected = sorted(range(10), key=lambda j: (-(v[j].item() + 0.0), i[j].item()))
    assert order.tolist() == expected


@FAST
@given(problems(), st.booleans())
def test_encode_matches_reference(p, bias):
    n, d, m, k, tile, integer, seed = p
    x, W, b, _, _ = make(n, d, m, integer, seed, torch.float32)
    b = b if bias else None
    values, indices = topk_encode(x, W, b, k, tile=tile, backend="torch")
    pre = dense_pre_acts(x.double(), W.double(), None if b is None else b.double())
    if integer:  # exact arithmetic: ties must go to the lowest latent id
        ref = dense_topk_indices(pre, k)
        assert torch.equal(indices, ref)
        assert torch.equal(values.double(), pre.gather(1, ref))
    else:
        check_selection(values, indices, pre, k, TOL[torch.float32])


@pytest.mark.parametrize(
    ("n", "m", "k", "tile", "integer"),
    [(70, 5000, 32, None, False), (70, 5000, 32, 1000, True), (33, 3001, 128, None, False), (9, 20000, 1, 7000, True)],
)
def test_encode_large_latent_counts(n, m, k, tile, integer):
    """Realistic widths: several tiles, a 3-level max-pyramid, a ragged last tile."""
    x, W, b, _, _ = make(n, 8, m, integer, m + k, torch.float32)
    values, indices = topk_encode(x, W.T.contiguous().T, b, k, tile=tile, backend="torch")
    pre = dense_pre_acts(x.double(), W.double(), b.double())
    if integer:
        assert torch.equal(indices, dense_topk_indices(pre, k))
    else:
        check_selection(values, indices, pre, k, TOL[torch.float32])


PATHS = [("compiled", "openblas"), ("compiled", "torch"), ("torch", "torch")]
"""(selection, GEMM) of the CPU encoder: the default, the compiled selection after torch's GEMMs, torch ops."""


@pytest.mark.parametrize(("select", "gemm"), PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("tile", "rows"), [(None, None), (1000, 7), (97, 16)])
def test_encode_threshold_edge_cases(select, gemm, dtype, tile, rows):
    """Every CPU path: row chunks (and two threads' parts of the rows), rows where hundreds of
    latents tie (a zero input row, so every pre-activation is its bias), NaN latents (they rank
    first) and -inf ones."""
    from saes.kernels.cpu import topk_encode_torch

    n, m, k = 150, 3000, 16
    x, W, b, _, _ = make(n, 6, m, True, 11, dtype)
    x[3] = 0
    b[[17, 2500]] = float("nan")
    b[100] = float("-inf")
    values, indices = topk_encode_torch(x, W, b, k, tile=tile, rows=rows, select=select, gemm=gemm)
    pre = dense_pre_acts(x, W, b)
    ref = dense_topk_indices(pre, k)
    assert torch.equal(indices, ref)
    assert indices[:, :2].tolist() == [[17, 2500]] * n
    torch.testing.assert_close(values.to(dtype), pre.gather(1, ref), rtol=0, atol=0, equal_nan=True)


@FAST
@given(problems(max_n=300), st.integers(1, 30), st.booleans())
def test_cpu_encoder_paths_agree(p, rows, bias):
    """The CPU paths (compiled selection after OpenBLAS or torch GEMMs, torch-op selection) are all
    exact: identical ids and values. Integer-valued data (exact arithmetic, many ties): the paths lay
    out their GEMM blocks differently, which may change the rounding of continuous data by an ulp."""
    from saes.kernels.cpu import topk_encode_torch

    n, d, m, k, tile, _, seed = p
    x, W, b, _, _ = make(n, d, m, True, seed, torch.float32)
    out = [
        topk_encode_torch(x, W, b if bias else None, k, tile=tile, rows=rows, select=s, gemm=g) for s, g in PATHS
    ]
    for values, indices in out[1:]:
        assert torch.equal(indices, out[0][1]) and torch.equal(values, out[0][0])


@FAST
@given(st.integers(1, 40), st.integers(1, 300), st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_first_block_bound_is_below_the_kth_value(rows, width, k, seed, fp64):
    """``first_bounds`` (the first block's threshold) never exceeds a row's k-th value in key order
    (NaN first), with ties, NaN and infinities in the data; it also adds the bias in place."""
    from saes.kernels.cpu_select import first_bounds

    k = min(k, width)
    rng = np.random.default_rng(seed)
    dtype = np.float64 if fp64 else np.float32
    pre = rng.integers(-3, 4, (rows, width)).astype(dtype)
    pre[rng.random((rows, width)) < 0.05] = np.nan
    pre[rng.random((rows, width)) < 0.05] = -np.inf
    bias = rng.integers(-2, 3, width).astype(dtype)
    full = pre + bias
    lows = first_bounds(pre, bias, k)
    np.testing.assert_array_equal(pre, full)
    keys = np.where(np.isnan(full), np.inf, full.astype(np.float32))  # NaN ranks first
    kth = -np.sort(-keys, axis=1)[:, k - 1]
    assert (np.isnan(lows) | (lows <= kth)).all()


def _select_in_child(pre, k) -> None:
    from saes.kernels import cpu_select
    from saes.kernels.cpu import topk_encode_torch

    vals, ids = np.empty((pre.shape[0], k), np.float32), np.empty((pre.shape[0], k), np.int64)
    cpu_select.merge_block(pre, pre.shape[1], 0, vals, ids, np.zeros(pre.shape[0], np.int64), 2)
    assert (ids == np.argsort(-pre, axis=1, kind="stable")[:, :k]).all()
    eye = torch.eye(pre.shape[0])  # the encoder (OpenBLAS GEMMs on two threads) selects from the same
    assert torch.equal(topk_encode_torch(eye, torch.from_numpy(pre), None, k, gemm="openblas")[1], torch.from_numpy(ids))


def test_compiled_selection_is_fork_safe():
    """The compiled selection and the OpenBLAS encoder run on plain threads: a process forked after
    they ran can run them again (numba's OpenMP layer hangs there)."""
    import multiprocessing

    pre = np.random.default_rng(0).standard_normal((512, 3000)).astype(np.float32)
    _select_in_child(pre, 8)
    child = multiprocessing.get_context("fork").Process(target=_select_in_child, args=(pre, 8))
    child.start()
    child.join(60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0


def backward_path(path: str):
    """``compiled``: the numba backward kernels (the CPU default); ``torch``: the torch-op backward."""
    if path == "compiled":
        return contextlib.nullcontext()
    return mock.patch("saes.kernels.autograd._compiled", lambda *tensors: False)


@pytest.mark.parametrize("path", ["compiled", "torch"])
@FAST
@given(problems(max_m=200), st.sampled_from(["relu", "identity"]), st.integers(1, 12))
def test_sae_forward_and_every_gradient(path, p, activation, d_out):
    n, d, m, k, tile, integer, seed = p
    params = make(n, d, m, integer, seed, torch.float64, d_out)
    ours = [t.clone().requires_grad_() for t in params]
    ref = [t.clone().requires_grad_() for t in params]
    out = topk_sae_forward(*ours, k, activation=activation, tile=tile, backend="torch")
    x_hat, _, idx = dense_topk_sae(*ref, k, relu=activation == "relu")
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-9, atol=1e-9)
    g = torch.randn(x_hat.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with backward_path(path):
        (out.x_hat * g).sum().backward()
    (x_hat * g).sum().backward()
    for name, a, r in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], ours, ref, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-9, msg=lambda s, name=name: f"{name}: {s}")


@FAST
@given(problems(max_m=200), st.booleans(), st.booleans())
def test_compiled_and_torch_backward_agree(p, pre_bias, nan):
    """The compiled backward kernels and the torch-op backward give identical gradients on
    integer-valued fp32 data (exact sums whatever the order), NaN in the upstream gradient included."""
    n, d, m, k, tile, _, seed = p
    params = make(n, d, m, True, seed, torch.float32)
    g = torch.randint(-3, 4, (n, d), generator=torch.Generator().manual_seed(seed)).float()
    if nan:
        g[seed % n, seed % d] = float("nan")
    grads = []
    for path in ("compiled", "torch"):
        x, W_enc, b_enc, W_dec, b_dec = [t.clone().requires_grad_() for t in params]
        shift = b_dec if pre_bias else None
        out = topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, tile=tile, pre_bias=shift)
        with backward_path(path):
            (out.x_hat * g).sum().backward()
        grads.append([t.grad for t in (x, W_enc, b_enc, W_dec, b_dec)])
    for name, a, t in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec"], *grads, strict=True):
        torch.testing.assert_close(a, t, rtol=0, atol=0, equal_nan=True, msg=lambda s, name=name: f"{name}: {s}")


@FAST
@given(problems(max_m=200), st.booleans())
def test_pre_bias_equals_subtracting_it(p, bias):
    """``pre_bias=s`` (whose gradient skips the N x d one of ``x - s``) against the dense reference on
    ``x - s``: selection, reconstruction, AuxK, and every gradient, the pre-bias's included."""
    n, d, m, k, tile, integer, seed = p
    params = make(n, d, m, integer, seed, torch.float64)
    params[2] = params[2] if bias else None
    shift = make(1, d, 1, integer, seed + 1, torch.float64)[0][0]
    dead = torch.arange(m) % 3 == 0
    k_aux = min(max(1, k // 2), int(dead.sum()))
    ours = [None if t is None else t.clone().requires_grad_() for t in [*params, shift]]
    ref = [None if t is None else t.clone().requires_grad_() for t in [*params, shift]]
    x, W_enc, b_enc, W_dec, b_dec, s = ours
    out = topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, tile=tile, backend="torch", pre_bias=s)
    aux = auxk_forward(x, W_enc, b_enc, W_dec, k_aux, dead, backend="torch", pre_bias=s)
    rx, rW, rb, rWd, rbd, rs = ref
    x_hat, _, idx = dense_topk_sae(rx - rs, rW, rb, rWd, rbd, k)
    e_hat = dense_auxk(rx - rs, rW, rb, rWd, k_aux, dead)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-9, atol=1e-9)
    gen = torch.Generator().manual_seed(seed)
    g, h = (torch.randn(x_hat.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    ((out.x_hat * g).sum() + (aux.x_hat * h).sum()).backward()
    ((x_hat * g).sum() + (e_hat * h).sum()).backward()
    for name, a, r in zip(["x", "W_enc", "b_enc", "W_dec", "b_dec", "pre_bias"], ours, ref, strict=True):
        if a is not None:
            torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_pre_bias_shape_is_checked():
    x, W, b, _, _ = make(4, 6, 20, False, 0, torch.float32)
    with pytest.raises(ValueError, match=r"pre_bias must have shape \(6,\)"):
        topk_encode(x, W, b, 3, pre_bias=torch.zeros(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    n, d, m, k = 64, 24, 700, 16
    params = [t.to(dtype) for t in make(n, d, m, False, 3, torch.float32)]
    ours = [t.clone().requires_grad_() for t in params]
    ref = [t.float().requires_grad_() for t in params]
    out = topk_sae_forward(*ours, k, backend="torch")
    assert out.x_hat.dtype == out.pre_acts.dtype == dtype
    pre = dense_pre_acts(*ref[:3]).detach()
    assert torch.equal(out.indices, dense_topk_indices(pre, k))  # selection on fp32 accumulations
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    torch.testing.assert_close(out.pre_acts.float(), pre.gather(1, out.indices), rtol=ulp, atol=1e-5)
    x_hat, _, _ = dense_topk_sae(*ref, k)
    tol = TOL[dtype] * x_hat.abs().max().item()
    torch.testing.assert_close(out.x_hat.float(), x_hat, rtol=TOL[dtype], atol=tol)
    out.x_hat.float().pow(2).sum().backward()
    x_hat.pow(2).sum().backward()
    for a, r in zip(ours, ref, strict=True):
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.float(), r.grad, rtol=TOL[dtype], atol=TOL[dtype] * r.grad.abs().max().item())


def dense_auxk(x, W_enc, b_enc, W_dec, k_aux, dead):
    pre = dense_pre_acts(x, W_enc, b_enc)
    masked = torch.where(dead, pre.detach(), float("-inf"))
    idx = dense_topk_indices(masked, k_aux)
    acts = torch.zeros_like(pre).scatter(1, idx, torch.relu(pre.gather(1, idx)))
    return acts @ W_dec


@pytest.mark.parametrize("seed", range(4))
def test_auxk_gradients_reach_the_encoder(seed):
    n, d, m, k, k_aux = 40, 10, 120, 4, 6
    params = make(n, d, m, False, seed, torch.float64)
    dead = torch.zeros(m, dtype=torch.bool)
    dead[torch.randperm(m, generator=torch.Generator().manual_seed(seed))[: 20 + seed]] = True
    ours = [t.clone().requires_grad_() for t in params]
    ref = [t.clone().requires_grad_() for t in params]
    x, W_enc, b_enc, W_dec, b_dec = ours
    out = topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, backend="torch")
    aux = auxk_forward(x, W_enc, b_enc, W_dec, k_aux, dead, backend="torch")
    assert bool(dead[aux.indices].all())
    loss = (out.x_hat - x).pow(2).sum() + 0.5 * (aux.x_hat - (x - out.x_hat).detach()).pow(2).sum()
    loss.backward()
    rx, rW, rb, rWd, rbd = ref
    x_hat, _, _ = dense_topk_sae(rx, rW, rb, rWd, rbd, k)
    e_hat = dense_auxk(rx, rW, rb, rWd, k_aux, dead)
    torch.testing.assert_close(aux.x_hat, e_hat, rtol=1e-9, atol=1e-9)
    ((x_hat - rx).pow(2).sum() + 0.5 * (e_hat - (rx - x_hat).detach()).pow(2).sum()).backward()
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-9, atol=1e-9)
    aux_only = [t.clone().requires_grad_() for t in params]
    e = auxk_forward(aux_only[0], aux_only[1], aux_only[2], aux_only[3], k_aux, dead, backend="torch").x_hat
    e.pow(2).sum().backward()
    assert aux_only[1].grad[:, dead].abs().sum() > 0 and aux_only[1].grad[:, ~dead].abs().sum() == 0


def test_latents_subset_batch_dims_and_partial_grads():
    x, W, b, Wd, bd = make(12, 6, 50, False, 1, torch.float32)
    ids = torch.tensor([40, 3, 7, 7, 22, 11])
    v, i = topk_encode(x.view(3, 4, 6), W, b, 3, latents=ids, backend="torch")
    assert v.shape == i.shape == (3, 4, 3)
    pre = dense_pre_acts(x, W, b)[:, ids.unique()]
    torch.testing.assert_close(i.view(12, 3), ids.unique()[dense_topk_indices(pre, 3)])
    Wd.requires_grad_()
    out = sparse_decode(v, i, Wd, bd, backend="torch")
    assert out.shape == (3, 4, 6) and not v.requires_grad
    out.sum().backward()
    assert Wd.grad is not None and Wd.grad[~torch.isin(torch.arange(50), ids)].abs().sum() == 0


@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_empty_batch(path):
    """Zero rows: empty codes, an empty reconstruction and zero weight gradients, on every CPU path."""
    x, W_enc, b_enc, W_dec, b_dec = [t.requires_grad_() for t in make(0, 6, 40, False, 0, torch.float32)]
    out = topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, 4, pre_bias=b_dec)
    assert out.indices.shape == (0, 4) and out.x_hat.shape == (0, 6)
    with backward_path(path):
        out.x_hat.sum().backward()
    for p in (W_enc, b_enc, W_dec, b_dec):
        assert p.grad is not None and not p.grad.any()


def test_errors():
    x, W, b, Wd, bd = make(4, 6, 10, False, 0, torch.float32)
    with pytest.raises(ValueError, match="k=11"):
        topk_encode(x, W, b, 11)
    with pytest.raises(ValueError, match="W_enc"):
        topk_encode(x, W.T, b, 2)
    with pytest.raises(ValueError, match="b_dec"):
        sparse_decode(x[:, :2], torch.zeros(4, 2, dtype=torch.long), Wd, bd[:3])
    with pytest.raises(ValueError, match="backend"):
        topk_encode(x, W, b, 2, backend="cuda")  # type: ignore[arg-type]
    if os.environ.get("TRITON_INTERPRET") != "1":  # no Triton on CPU tensors without the interpreter
        with pytest.raises(RuntimeError, match="triton|TRITON_INTERPRET"):
            topk_encode(x, W, b, 2, backend="triton")
    from saes.kernels.cpu import topk_encode_torch

    with pytest.raises(ValueError, match="select must be"):
        topk_encode_torch(x, W, b, 2, select="numba")
    with pytest.raises(ValueError, match="gemm"):
        topk_encode_torch(x, W, b, 2, gemm="mkl")
    with pytest.raises(RuntimeError, match="OpenBLAS GEMM path needs"):  # one float dtype
        topk_encode_torch(x, W.double(), b, 2, gemm="openblas")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "triton cases: ok" in proc.stdout


TRITON_CASES = [  # (N, d, M, k, splits, dtype, integer)
    (5, 7, 40, 3, 1, torch.float32, False),
    (19, 33, 300, 17, 3, torch.float32, False),
    (9, 16, 130, 128, 2, torch.float32, False),
    (16, 20, 150, 1, 2, torch.bfloat16, False),
    (8, 16, 64, 64, 1, torch.float16, False),
    (12, 5, 200, 40, 2, torch.float32, True),
]


def run_triton_cases() -> None:
    """Triton kernels vs the reference; needs ``TRITON_INTERPRET=1`` set before triton is imported."""
    from saes.kernels.triton_topk import topk_encode_triton

    for n, d, m, k, splits, dtype, integer in TRITON_CASES:
        x, W, b, Wd, bd = (t.to(dtype) for t in make(n, d, m, integer, n + m, torch.float32))
        values, indices = topk_encode_triton(x, W, b, k, block_m=32, splits=splits)
        pre = dense_pre_acts(x, W, b)
        if integer or dtype != torch.float32:
            assert torch.equal(indices, dense_topk_indices(pre, k)), (n, d, m, k)
            torch.testing.assert_close(values, pre.gather(1, indices), rtol=1e-6, atol=1e-5)
        else:
            check_selection(values, indices, pre.double(), k, TOL[dtype])
        ours = [t.clone().requires_grad_() for t in (x, W, b, Wd, bd)]
        ref = [t.float().requires_grad_() for t in (x, W, b, Wd, bd)]
        out = topk_sae_forward(*ours, k, backend="triton")
        x_hat, _, _ = dense_topk_sae(*ref, k)
        tol = TOL[dtype]
        torch.testing.assert_close(out.x_hat.float(), x_hat, rtol=tol, atol=tol * x_hat.abs().max().item())
        out.x_hat.float().pow(2).sum().backward()
        x_hat.pow(2).sum().backward()
        for a, r in zip(ours, ref, strict=True):
            torch.testing.assert_close(a.grad.float(), r.grad, rtol=tol, atol=tol * r.grad.abs().max().item())
    print("triton cases: ok")


if __name__ == "__main__":
    run_triton_cases()
