"""Activation / subspace patching, DAS and illusion diagnostics.

Invariants run on a tiny random TL model; DAS and the illusion checks on hand-built 1-layer TL models
whose answers are known (attention and everything not named zeroed, no norms).
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
import torch

from probe.errors import SteerscopeError
from probe.hooks import count_hooks
from probe.models import build_model
from steering.das import interchange_accuracy, split_pairs, train_das
from steering.illusion import illusion_diagnostics, split_direction
from steering.patching import (
    Patch,
    logit_diff,
    patch,
    patching_grid,
    run_patch,
    subspace_patch,
)

RESID = "blocks.1.hook_resid_pre"
POST = "blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def model():
    cfg = dict(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=50, n_ctx=16, act_fn="gelu_new",
               normalization_type="LN", positional_embedding_type="rotary", seed=0)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50, (3, 6), generator=g), torch.randint(0, 50, (3, 6), generator=g)


def clean(model, tokens):
    with torch.no_grad():
        return model(tokens)


def toy(d_model: int, d_mlp: int, d_vocab: int):
    """A 1-layer TL model with every parameter zero: resid_post = W_E[t] + mlp_out, logits = resid @ W_U."""
    cfg = dict(n_layers=1, d_model=d_model, d_head=d_model, n_heads=1, d_mlp=d_mlp, d_vocab=d_vocab, n_ctx=4,
               act_fn="relu", normalization_type=None, positional_embedding_type="standard", seed=0)
    m = build_model(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m


# ------------------------------------------------------------------------------------------------ invariants


@pytest.mark.parametrize("site", [RESID, "blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"])
def test_self_patching_is_bit_identical(model, pair, site):
    base, _ = pair
    ref = clean(model, base)
    d = {RESID: 16, "blocks.0.mlp.hook_post": 32, "blocks.1.attn.hook_z": 4}[site]
    assert torch.equal(patch(model, base, base, site), ref)
    assert torch.equal(subspace_patch(model, base, base, site, torch.randn(d)), ref)
    assert torch.equal(subspace_patch(model, base, base, site, torch.linalg.qr(torch.randn(d, 3)).Q), ref)
    assert count_hooks(model) == 0


def test_zero_direction_changes_nothing(model, pair):
    base, source = pair
    assert torch.equal(subspace_patch(model, base, source, RESID, torch.zeros(16)), clean(model, base))


def test_full_patch_everywhere_at_the_first_site_gives_the_source_run(model, pair):
    base, source = pair
    out = patch(model, base, source, "blocks.0.hook_resid_pre")
    torch.testing.assert_close(out, clean(model, source), atol=1e-6, rtol=0)
    full_rank = subspace_patch(model, base, source, RESID, torch.eye(16))
    torch.testing.assert_close(full_rank, patch(model, base, source, RESID), atol=1e-5, rtol=1e-5)


def test_positions_are_causal(model, pair):
    base, source = pair
    out, ref = patch(model, base, source, RESID, positions=[3, -1]), clean(model, base)
    assert torch.equal(out[:, :3], ref[:, :3]) and not torch.allclose(out[:, 3], ref[:, 3])


def test_direction_patch_formula():
    g = torch.Generator().manual_seed(1)
    v, h_b, h_s = (torch.randn(n, generator=g) for n in (8, 8, 8))
    expected = h_b + ((v @ h_s - v @ h_b) / (v @ v)) * v
    torch.testing.assert_close(Patch.direction("x", v).mix(h_b[None], h_s[None])[0], expected, atol=1e-6, rtol=0)
    b = torch.linalg.qr(torch.randn(8, 3, generator=g)).Q
    torch.testing.assert_close(Patch.subspace("x", b).mix(h_b, h_s), h_b + b @ b.T @ (h_s - h_b), atol=1e-6, rtol=0)


def test_patch_save_load_round_trip(tmp_path):
    b = torch.linalg.qr(torch.randn(8, 2)).Q
    for p in (Patch.subspace(RESID, b, [1, -1]), Patch.full(POST)):
        q = Patch.load(p.save(tmp_path / p.site / str(p.rank)))
        assert (q.site, q.positions, q.rank) == (p.site, p.positions, p.rank)
        assert q.basis is None or torch.equal(q.basis, p.basis)
    assert repr(Patch.subspace(RESID, b, [1, -1])) == "Patch('blocks.1.hook_resid_pre', rank=2, d=8, positions=[1, -1])"
    with pytest.raises(SteerscopeError, match="not a saved patch"):
        Patch.load(tmp_path)


# ------------------------------------------------------------------------------------------------------ DAS


def das_toy():
    """Token t encodes a = t // 2 along u and a distractor b = t % 2 along w; the output is a, read along u."""
    m = toy(d_model=8, d_mlp=4, d_vocab=4)
    u, w = torch.linalg.qr(torch.randn(8, 2, generator=torch.Generator().manual_seed(0))).Q.T
    with torch.no_grad():
        for t in range(4):
            m.W_E[t] = (2 * (t // 2) - 1) * u + (2 * (t % 2) - 1) * 1.5 * w
        m.W_U[:, 0], m.W_U[:, 1] = -3 * u, 3 * u
        m.b_U[2:] = -10
    t_b, t_s = torch.cartesian_prod(torch.arange(4), torch.arange(4)).T
    return m, u, w, t_b[:, None], t_s[:, None], t_s // 2


def test_das_recovers_the_causal_direction():
    m, u, w, base, source, expected = das_toy()
    wrong = interchange_accuracy(m, Patch.direction("blocks.0.hook_resid_pre", w, 0), base, source, expected)
    assert wrong == 0.5  # patching the distractor leaves a at its base value: right only when a_b == a_s
    res = train_das(m, base, source, expected, "blocks.0.hook_resid_pre", position=0, rank=1, steps=100, lr=0.1)
    cu, cw = float(res.basis[:, 0] @ u), float(res.basis[:, 0] @ w)
    # Directions outside span(u, w) never vary, so they are unidentifiable; inside the span DAS must pick u.
    assert res.iia == 1.0 and abs(cu) > 0.95 and abs(cu) / math.hypot(cu, cw) > 0.999
    assert "iia=1.000" in repr(res)
    res2 = train_das(m, base, source, expected, "blocks.0.hook_resid_pre", position=0, rank=2, steps=5, seed=1)
    torch.testing.assert_close(res2.basis.T @ res2.basis, torch.eye(2), atol=1e-5, rtol=0)
    assert all(not p.requires_grad or p.grad is None for p in m.parameters()) and count_hooks(m) == 0


def test_das_reports_iia_on_held_out_pairs():
    m, u, _, base, source, expected = das_toy()
    train, test = split_pairs(len(base), test_frac=0.25, seed=0)
    assert len(train) == 12 and len(test) == 4 and set(train.tolist()) | set(test.tolist()) == set(range(16))
    assert not set(train.tolist()) & set(test.tolist())
    site = "blocks.0.hook_resid_pre"
    # held-out triples labelled with the base's value: the causal direction gets every one of them wrong
    wrong = 1 - expected[test]
    res = train_das(m, base[train], source[train], expected[train], site, position=0, steps=100, lr=0.1,
                    test=(base[test], source[test], wrong))
    assert res.iia == 1.0 and res.n_train == 12 and res.n_test == 4
    assert res.test_iia == interchange_accuracy(m, res.patch, base[test], source[test], wrong)
    assert res.test_iia < 1.0 and "test_iia=" in repr(res) and "(4 pairs)" in repr(res)
    res = train_das(m, base[train], source[train], expected[train], site, position=0, steps=100, lr=0.1,
                    test=(base[test], source[test], expected[test]))
    assert res.test_iia == 1.0
    no_test = train_das(m, base, source, expected, site, position=0, steps=2)
    assert no_test.test_iia is None and "no held-out pairs" in repr(no_test)
    assert [len(x) for x in split_pairs(1)] == [1, 0] and [len(x) for x in split_pairs(2)] == [1, 1]
    with pytest.raises(SteerscopeError, match="triple"):
        train_das(m, base, source, expected, site, 0, steps=1, test=(base, source))


def test_das_bad_inputs():
    m, _, _, base, source, expected = das_toy()
    site = "blocks.0.hook_resid_pre"
    with pytest.raises(SteerscopeError, match="expected_tokens"):
        train_das(m, base, source, expected[:3], site, 0)
    with pytest.raises(SteerscopeError, match="rank"):
        train_das(m, base, source, expected, site, 0, rank=9)
    with pytest.raises(SteerscopeError, match="out of range"):
        train_das(m, base, source, expected, site, position=1)


# ------------------------------------------------------------------------------------------------- illusion


def illusion_toy(faithful: bool):
    """Token 1 sets a = e0 in the residual and MLP unit 0 (h0 = t); logit diff = 2 a.resid_post.

    dormant (faithful=False): W_out reads only unit 1, which is always 0; unit 0 is invisible.
    faithful: W_out reads unit 0 into a; units 1, 2 are unread.
    """
    m = toy(d_model=2, d_mlp=3, d_vocab=2)
    with torch.no_grad():
        m.W_E[1, 0] = 1.0
        m.blocks[0].mlp.W_in[0, 0] = 1.0
        m.blocks[0].mlp.W_out[0 if faithful else 1, 0] = 1.0 if faithful else 2.0
        m.W_U[0, 0], m.W_U[0, 1] = -1.0, 1.0
    return m, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long), logit_diff(1, 0)


def test_dormant_pathway_is_flagged():
    m, base, source, metric = illusion_toy(faithful=False)
    v = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)
    r = illusion_diagnostics(m, base, source, POST, v, metric)
    assert r.effect_v == pytest.approx(1.0)  # the 1-D patch fully "transfers" the variable ...
    assert r.effect_full == pytest.approx(0.0) and r.effect_row == pytest.approx(0.0)  # ... but nothing else does
    assert r.effect_null == pytest.approx(0.0) and r.null_share == pytest.approx(1.0)
    assert r.row_norm == pytest.approx(math.sqrt(0.5)) and r.illusion
    assert "ILLUSION" in repr(r) and isinstance(r.figure(), go.Figure)


def test_faithful_direction_is_not_flagged():
    m, base, source, metric = illusion_toy(faithful=True)
    r = illusion_diagnostics(m, base, source, POST, torch.tensor([1.0, 0.0, 0.5]), metric)
    assert r.effect_full == pytest.approx(0.5) and r.effect_row == pytest.approx(0.5)
    assert r.effect_v == pytest.approx(0.4) and r.effect_null == pytest.approx(0.0)
    assert r.null_share == pytest.approx(0.0) and not r.illusion


def test_illusion_check_is_not_applicable_when_the_reader_sees_everything(model, pair):
    base, source = pair
    r = illusion_diagnostics(model, base, source, RESID, torch.randn(16), logit_diff(1, 2), reader=torch.eye(16),
                             positions=-1)
    assert r.null_dim == 0 and not r.applicable and not r.illusion
    assert "not applicable" in repr(r) and "no illusion flagged" not in repr(r)
    assert "not applicable" in r.figure().layout.title.text
    r = illusion_diagnostics(model, base, source, POST, torch.randn(32), logit_diff(1, 2), positions=-1)
    assert r.null_dim == 16 and r.applicable and "not applicable" not in repr(r)  # W_out [32, 16]


def test_split_against_w_out(model):
    w_out = model.blocks[0].mlp.W_out.detach()  # [d_mlp=32, d_model=16]: a 16-dim null space in R^32
    v = torch.randn(32)
    v_row, v_null = split_direction(v, w_out)
    torch.testing.assert_close(v_row + v_null, v, atol=1e-6, rtol=0)
    torch.testing.assert_close(v_null @ w_out, torch.zeros(16), atol=1e-5, rtol=0)
    assert abs(float(v_row @ v_null)) < 1e-5 and float(v_null.norm()) > 0.1
    v_in_row = w_out @ torch.randn(16)
    torch.testing.assert_close(split_direction(v_in_row, w_out)[0], v_in_row, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- bad inputs


def test_patching_bad_inputs(model, pair):
    base, source = pair
    with pytest.raises(SteerscopeError, match="as many tokens as its source"):
        patch(model, base, source[:, :4], RESID)  # every position, but the source is shorter
    with pytest.raises(SteerscopeError, match="3 base prompts but 2 source prompts"):
        patch(model, base, source[:2], RESID, positions=-1)
    with pytest.raises(SteerscopeError, match="out of range"):
        patch(model, base, source, RESID, positions=6)
    with pytest.raises(SteerscopeError, match="Did you mean"):
        patch(model, base, source, "blocks.1.hook_resid_prex")
    with pytest.raises(SteerscopeError, match="orthonormal"):
        subspace_patch(model, base, source, RESID, torch.ones(16, 2))
    with pytest.raises(SteerscopeError, match="dimension 8"):
        subspace_patch(model, base, source, RESID, torch.randn(8))
    with pytest.raises(SteerscopeError, match="empty prompt list"):
        patch(model, [], [], RESID)
    with pytest.raises(SteerscopeError, match="integer tensor"):
        run_patch(model, Patch.full(RESID), base[0], source[0])
    assert count_hooks(model) == 0


def test_diagnostics_bad_inputs(model, pair):
    base, source = pair
    metric = logit_diff(1, 2)
    with pytest.raises(SteerscopeError, match="no default reader"):
        illusion_diagnostics(model, base, source, RESID, torch.randn(16), metric)
    with pytest.raises(SteerscopeError, match="reader must be"):
        illusion_diagnostics(model, base, source, POST, torch.randn(32), metric, reader=torch.randn(16, 16))
    with pytest.raises(SteerscopeError, match="same on base and source"):
        illusion_diagnostics(model, base, base, POST, torch.randn(32), metric)
    with pytest.raises(SteerscopeError, match="non-zero"):
        illusion_diagnostics(model, base, source, POST, torch.zeros(32), metric)


def test_patching_grid_invariants(model):
    base = torch.tensor([[1, 5, 7, 9, 11, 13]])
    source = base.clone()
    source[0, 2] = 8
    metric = logit_diff(3, 4)
    grid = patching_grid(model, base, source, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"], metric)
    assert grid.sites == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"] and grid.positions == list(range(6))
    first, last = grid.effects.tolist()
    # rotary model: resid_pre of layer 0 is the token embedding, equal wherever the tokens are equal
    assert [e for j, e in enumerate(first) if j != 2] == [0.0] * 5 and first[2] != 0
    # the final residual stream at the read position carries everything; elsewhere nothing
    assert last[5] == pytest.approx(1, abs=1e-5) and last[:5] == [0.0] * 5
    direct = float(run_patch(model, Patch.full("blocks.0.hook_resid_pre", 2), base, source, metric))
    assert first[2] == pytest.approx((direct - grid.metric_base) / (grid.metric_source - grid.metric_base), rel=1e-5)
    assert isinstance(grid.figure(), go.Figure)
    with pytest.raises(SteerscopeError, match="same on base and source"):
        patching_grid(model, base, base, "blocks.0.hook_resid_pre", metric)
