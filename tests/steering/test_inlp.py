"""INLP concept erasure (steering.inlp): planted concepts are erased for a fresh probe while the rest of the
variance survives; P is an orthogonal projection; the hook projects exactly the positions the mode selects,
on the HookedTransformer and on the transformers twin alike; strict save/load; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from torch.testing import assert_close

from probe.errors import SteerscopeError
from probe.hooks import count_hooks, hooks
from steering import INLP, Projection, SteeringVector
from steering.apply import _new_cache, generate_tokens, left_pad, steer
from steering.inlp import _new_directions

D = 32
SITE = "blocks.1.hook_resid_pre"
PROMPTS = ["She walked into the room", "Mr. Darcy", "It is a truth universally acknowledged"]


def _unit(g: torch.Generator, d: int = D) -> torch.Tensor:
    u = torch.randn(d, generator=g, dtype=torch.float64)
    return u / u.norm()


def _binary(n: int, seed: int, u: torch.Tensor):
    """Gaussian data around a common offset; the label is the sign of the projection on the hidden direction u."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, D, generator=g, dtype=torch.float64)
    return (Z + 2.0).float(), (Z @ u > 0).long()


def _three_classes(n: int, seed: int, U: torch.Tensor):
    """Three Gaussian classes whose means differ only inside the planted plane spanned by U's rows [2, D]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    means = torch.tensor([[0.0, 2.0], [1.8, -1.0], [-1.8, -1.0]], dtype=torch.float64) @ U
    return (torch.randn(n, D, generator=g, dtype=torch.float64) + means[y] - 1.0).float(), y


def _fresh_probe_accuracy(erasure: INLP, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(held-out accuracy of a new logistic probe trained on projected data, majority fraction of its test half)."""
    Xp, y = erasure.project(X).double().numpy(), y.numpy()
    half = len(y) // 2
    probe = LogisticRegression(max_iter=2000).fit(Xp[:half], y[:half])
    return float(probe.score(Xp[half:], y[half:])), float(np.bincount(y[half:]).max() / (len(y) - half))


def _variance_kept(erasure: INLP, X: torch.Tensor, outside: torch.Tensor | None = None) -> float:
    """Fraction of X's total variance the erasure keeps (of the part orthogonal to the rows of ``outside``)."""
    Xp = erasure.project(X).double()
    if outside is not None:
        Q = torch.eye(D, dtype=torch.float64) - outside.T @ outside
        X, Xp = X.double() @ Q, Xp @ Q
    return float(Xp.var(0).sum() / X.double().var(0).sum())


# --- planted concepts ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted():
    u = _unit(torch.Generator().manual_seed(0))
    X, y = _binary(2000, 1, u)
    return u, X, y, INLP.fit(X, y, n_iter=10, seed=0)


@pytest.mark.parametrize("classifier", ["logistic", "svm"])
def test_a_planted_direction_is_erased_for_a_fresh_probe_and_the_rest_survives(planted, classifier):
    u, X, y, fitted = planted
    erasure = fitted if classifier == "logistic" else INLP.fit(X, y, n_iter=10, seed=0, classifier="svm")
    assert erasure.accuracies[0] > 0.95 and erasure.converged
    assert erasure.accuracies[-1] < erasure.baseline + 0.01
    assert 1 <= erasure.rank <= 3  # one planted direction (plus at most the residue of its estimate)
    assert abs(float(erasure.basis[0].double() @ u)) > 0.98  # the first probe finds it
    assert float((erasure.basis.double() @ u).norm()) > 0.99  # and it lies in the removed span
    acc, majority = _fresh_probe_accuracy(erasure, *_binary(4000, 2, u))  # new data, new probe
    assert acc < majority + 0.04
    assert _variance_kept(erasure, X) >= 0.90


def test_a_planted_three_class_concept_is_erased():
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=torch.float64))[0].T  # [2, D] orthonormal plane
    X, y = _three_classes(3000, 4, U)
    erasure = INLP.fit(X, y, n_iter=10, seed=0)
    assert erasure.accuracies[0] > 0.8 and erasure.converged
    assert 2 <= erasure.rank <= 6
    assert INLP.fit(X, y, n_iter=1, seed=0).rank == 2  # a 3-class softmax probe spans 2 directions, not 3
    assert (erasure.basis.double() @ U.T).norm(dim=0).min() > 0.99  # the whole planted plane is removed
    acc, majority = _fresh_probe_accuracy(erasure, *_three_classes(4000, 5, U))
    assert acc < majority + 0.04
    assert _variance_kept(erasure, X, outside=U) >= 0.90  # the variance outside the planted plane


def test_without_erasure_a_fresh_probe_does_find_the_concept(planted):
    u, X, y, _ = planted
    identity = INLP(torch.zeros(0, D))
    acc, majority = _fresh_probe_accuracy(identity, *_binary(4000, 2, u))
    assert acc > majority + 0.3  # the check above can fail


def test_P_is_an_orthogonal_projection_of_rank_d_minus_rank(planted):
    erasure = planted[3]
    P = erasure.P
    assert P.dtype == torch.float32 and P.shape == (D, D)
    assert_close(P, P.T, atol=0, rtol=0)
    assert_close(P @ P, P, atol=1e-6, rtol=0)
    eigenvalues = torch.linalg.eigvalsh(P.double())  # ascending: rank zeros, then d - rank ones
    want = torch.cat([torch.zeros(erasure.rank), torch.ones(D - erasure.rank)]).double()
    assert_close(eigenvalues, want, atol=1e-6, rtol=0)
    assert_close(float(torch.trace(P)), float(D - erasure.rank), atol=1e-5, rtol=0)
    assert_close(erasure.basis @ erasure.basis.T, torch.eye(erasure.rank), atol=1e-6, rtol=0)
    assert_close(erasure.basis @ P, torch.zeros(erasure.rank, D), atol=1e-6, rtol=0)


def test_centring_sets_the_removed_directions_to_the_mean_and_uncentred_zeroes_them(planted):
    u, X, y, centred = planted
    plain = INLP.fit(X, y, n_iter=10, seed=0, centre=False)
    assert plain.mean is None and centred.mean is not None
    assert_close(centred.mean, X.double().mean(0).float(), atol=1e-5, rtol=0)
    x = X[:50]
    B, mu = centred.basis, centred.mean
    assert_close(centred.project(x) @ B.T, (mu @ B.T).expand(50, -1), atol=1e-4, rtol=0)
    assert_close(centred.project(x), (x - mu) @ centred.P + mu, atol=0, rtol=0)
    assert_close(plain.project(x), x @ plain.P, atol=0, rtol=0)
    assert_close(plain.project(x) @ plain.basis.T, torch.zeros(50, plain.rank), atol=1e-4, rtol=0)
    # both remove the planted direction (the probes have an intercept, so the offset does not matter)
    assert float((plain.basis.double() @ u).norm()) > 0.99
    # project works on any leading shape and keeps the dtype
    assert centred.project(X[:6].reshape(2, 3, D).double()).dtype == torch.float64
    assert_close(centred.project(X[:6].reshape(2, 3, D)), centred.project(X[:6]).reshape(2, 3, D))


def test_stopping_rules_and_seeds(planted):
    u, X, y, erasure = planted
    forced = INLP.fit(X, y, n_iter=3, seed=0, min_accuracy=0.0)  # never stop early
    assert len(forced.accuracies) == 3 and forced.rank == 3 and not forced.converged
    assert forced.accuracies[0] == erasure.accuracies[0]
    assert len(erasure.accuracies) == erasure.rank + 1  # the last probe, at chance, removed nothing
    once = INLP.fit(X, y, n_iter=1, seed=0, min_accuracy=0.0)
    assert once.rank == 1 and len(once.accuracies) == 1
    again = INLP.fit(X, y, n_iter=10, seed=0)
    assert torch.equal(again.basis, erasure.basis) and again.accuracies == erasure.accuracies
    other = INLP.fit(X, y, n_iter=10, seed=1, dev_fraction=0.4)
    assert abs(other.provenance["n_dev"] - 800) <= 1 and other.accuracies != erasure.accuracies
    assert abs(erasure.provenance["n_dev"] - 500) <= 1 and erasure.provenance["classes"] == [0, 1]
    assert 0.45 < erasure.baseline < 0.55


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_accumulated_basis_spans_every_probe_row_property(d, blocks, seed):
    """Adding probes' weight rows block by block (some rows repeating earlier ones) keeps an orthonormal basis of
    exactly the stacked rowspace, and P = I - B^T B is its orthogonal complement's projection."""
    rng = np.random.default_rng(seed)
    B, rows = np.zeros((0, d)), []
    for k in blocks:
        W = rng.normal(size=(k, d)) * rng.uniform(0.01, 100)
        if rows and rng.random() < 0.5:
            earlier = np.concatenate(rows)
            W[0] = rng.normal(size=len(earlier)) @ earlier  # a row already in the span
        rows.append(W)
        B = np.concatenate([B, _new_directions(W, B)])
    stacked = np.concatenate(rows)
    assert len(B) == np.linalg.matrix_rank(stacked)
    erasure = INLP(torch.from_numpy(B).float())
    P = erasure.P.double()
    assert_close(P, P.T, atol=1e-12, rtol=0)
    assert_close(P @ P, P, atol=1e-6, rtol=0)
    unit_rows = torch.from_numpy(stacked / np.linalg.norm(stacked, axis=1, keepdims=True))
    assert_close(unit_rows @ P, torch.zeros_like(unit_rows), atol=1e-5, rtol=0)  # every probe row is removed
    x = torch.from_numpy(rng.normal(size=(5, d))).float()
    assert_close(erasure.project(erasure.project(x)), erasure.project(x), atol=1e-5, rtol=0)


# --- artifacts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["centred", "uncentred", "empty"])
def test_save_load_round_trips_exactly(planted, tmp_path, kind):
    u, X, y, erasure = planted
    if kind == "uncentred":
        erasure = INLP.fit(X, y, n_iter=10, seed=0, centre=False)
    elif kind == "empty":
        erasure = INLP(torch.zeros(0, D), None, [0.5], 0.5, True)
    back = INLP.load(erasure.save(tmp_path / "inlp"))
    assert torch.equal(back.basis, erasure.basis) and torch.equal(back.P, erasure.P)
    assert (back.mean is None) == (erasure.mean is None)
    if erasure.mean is not None:
        assert torch.equal(back.mean, erasure.mean)
    assert (back.accuracies, back.baseline, back.converged, back.provenance) == \
        (erasure.accuracies, erasure.baseline, erasure.converged, erasure.provenance)
    assert json.loads((tmp_path / "inlp" / "inlp.json").read_text())["format"] == "steerscope.inlp"


def _edit_json(path, **changes):
    meta = json.loads((path / "inlp.json").read_text())
    meta.update(changes)
    (path / "inlp.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "inlp.json").unlink(), "not an INLP directory"),
    (lambda p: (p / "inlp.json").write_text("{not json"), "not valid JSON"),
    (lambda p: _edit_json(p, extra=1), "expected keys"),
    (lambda p: _edit_json(p, format="steerscope.steering_vector"), "not a steerscope INLP"),
    (lambda p: _edit_json(p, format_version=99), "not a steerscope INLP"),
    (lambda p: _edit_json(p, rank="one"), "malformed"),
    (lambda p: _edit_json(p, rank=5), r"basis is torch.float32 \[\d, 32\], inlp.json says float32 \[5, 32\]"),
    (lambda p: _edit_json(p, centred=False), "inlp.json describes"),
    (lambda p: (p / "inlp.safetensors").unlink(), "inlp.safetensors is missing"),
    (lambda p: (p / "inlp.safetensors").write_bytes((p / "inlp.safetensors").read_bytes()[:40]), "corrupted"),
])
def test_damaged_files_give_one_line_errors(planted, tmp_path, damage, message):
    path = planted[3].save(tmp_path / "inlp")
    damage(path)
    with pytest.raises(SteerscopeError, match=message) as e:
        INLP.load(path)
    assert "\n" not in str(e.value)


def test_a_non_orthonormal_saved_basis_and_other_artifacts_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = INLP(torch.eye(2, D), torch.zeros(D)).save(tmp_path / "inlp")
    save_file({"basis": 2 * torch.eye(2, D), "mean": torch.zeros(D)}, str(path / "inlp.safetensors"))
    with pytest.raises(SteerscopeError, match="orthonormal rows"):
        INLP.load(path)
    vector = SteeringVector.from_direction(torch.ones(D), SITE).save(tmp_path / "vector")
    with pytest.raises(SteerscopeError, match="not an INLP directory"):
        INLP.load(vector)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SteerscopeError, match="is a file"):
        INLP(torch.eye(1, D)).save(tmp_path / "file")


# --- bad inputs ------------------------------------------------------------------------------------
_X = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
_Y = torch.arange(40) % 2


@pytest.mark.parametrize("X, y, kw, message", [
    (_X, torch.ones(40, dtype=torch.long), {}, "single class"),
    (_X, _Y[:39], {}, "X has 40 rows but y has 39 labels"),
    (torch.where(torch.arange(4) == 2, float("nan"), _X), _Y, {}, "NaN or infinite values in 40 of its 40 rows"),
    (_X[:, 0], _Y, {}, "2-D"),
    (_X[None], _Y, {}, "2-D"),
    (_X.long(), _Y, {}, "floating point"),
    (_X, _Y.float(), {}, "integer class labels"),
    (_X, _Y, {"n_iter": 0}, "n_iter must be a positive integer"),
    (_X, _Y, {"dev_fraction": 1.0}, "dev_fraction"),
    (_X, _Y, {"classifier": "mlp"}, "classifier must be one of"),
    (_X, _Y, {"C": 0}, "C must be"),
    (_X[:2], _Y[:2], {}, "dev split is empty"),
])
def test_bad_fit_inputs_give_one_line_errors(X, y, kw, message):
    with pytest.raises(SteerscopeError, match=message) as e:
        INLP.fit(X, y, **kw)
    assert "\n" not in str(e.value)


def test_bad_projections_are_refused():
    with pytest.raises(SteerscopeError, match="orthonormal"):
        INLP(torch.ones(2, D))
    with pytest.raises(SteerscopeError, match="square"):
        Projection(SITE, torch.ones(3, 4))
    with pytest.raises(SteerscopeError, match=r"\[\.\.\., 32\]"):
        INLP(torch.eye(1, D)).project(torch.ones(3, 16))


# --- the hook --------------------------------------------------------------------------------------
def _erasure(model, centred: bool, rank: int = 6) -> INLP:
    """A rank-``rank`` erasure at the model's width; centred on the site's mean activation."""
    d = model.cfg.d_model
    B = torch.linalg.qr(torch.randn(d, rank, generator=torch.Generator().manual_seed(7)))[0].T
    if not centred:
        return INLP(B)
    seen: list = []
    with torch.no_grad(), hooks(model, [(SITE, lambda t, h: seen.append(t))]):
        model(model.to_tokens(PROMPTS[2]))
    return INLP(B, seen[0][0].mean(0))


def _record(seen, key):
    return lambda t, h: seen[key].append(t.clone())


@pytest.mark.parametrize("mode", ["prompt", "generated", "all"])
@pytest.mark.parametrize("centred", [False, True])
def test_the_hook_projects_exactly_the_selected_positions(noisy_tiny_dense, mode, centred):
    """Capture the site before and after the projection, on a left-padded cached prefill and a decode pass."""
    model = noisy_tiny_dense
    erasure = _erasure(model, centred)
    p = erasure.at(SITE)
    tokens, mask, pad_left = left_pad(model, PROMPTS)
    P = tokens.shape[1]
    seen: dict[str, list] = {"before": [], "after": []}
    cache = _new_cache(model, len(PROMPTS))
    with torch.no_grad(), hooks(model, [(SITE, _record(seen, "before"))]):
        with steer(model, [p], mode, prompt_len=P, pad_left=pad_left) as pos, hooks(model, [(SITE, _record(seen, "after"))]):
            logits = model(tokens, attention_mask=mask, past_kv_cache=cache)
            pos.start = P
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            model(logits[:, -1:].argmax(-1), attention_mask=mask[:, -1:], past_kv_cache=cache)
    (pre_b, dec_b), (pre_a, dec_a) = seen["before"], seen["after"]
    real = torch.arange(P)[None, :] >= pad_left[:, None]
    keep_prompt = real if mode in ("prompt", "all") else torch.zeros_like(real)
    for before, after, keep in ((pre_b, pre_a, keep_prompt), (dec_b, dec_a, torch.full((3, 1), mode != "prompt"))):
        assert torch.equal(after[~keep], before[~keep])  # unselected positions untouched, bit for bit
        assert torch.equal(after[keep], erasure.project(before)[keep])
        manual = (before - erasure.mean) @ erasure.P + erasure.mean if centred else before @ erasure.P
        assert_close(after[keep], manual[keep], atol=1e-5, rtol=0)
    assert int(keep_prompt.sum()) > 0 or mode == "generated"
    assert count_hooks(model) == 0


def test_steering_with_a_projection_equals_the_manual_forward(noisy_tiny_dense):
    model, erasure = noisy_tiny_dense, _erasure(noisy_tiny_dense, centred=True)
    tokens = model.to_tokens(PROMPTS[0])
    with torch.no_grad():
        with steer(model, [erasure.at(SITE)], mode="all"):
            steered = model(tokens)
        manual = model(erasure.project(model(tokens, stop_at_layer=1)), start_at_layer=1)
    assert_close(steered, manual, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered, model(tokens), atol=1e-3)


def test_a_vector_and_a_projection_apply_in_list_order(noisy_tiny_dense):
    model, erasure = noisy_tiny_dense, _erasure(noisy_tiny_dense, centred=False)
    v = SteeringVector.from_direction(torch.randn(64, generator=torch.Generator().manual_seed(1)), SITE, 4.0)
    tokens = model.to_tokens(PROMPTS[0])
    with torch.no_grad():
        resid = model(tokens, stop_at_layer=1)
        for order, edited in (([v, erasure.at(SITE)], erasure.project(resid + v.scaled())),
                              ([erasure.at(SITE)], erasure.project(resid))):
            with steer(model, order, mode="all"):
                steered = model(tokens)
            assert_close(steered, model(edited, start_at_layer=1), atol=1e-5, rtol=1e-5)


def test_the_identity_projection_changes_generation_not_at_all(noisy_tiny_dense):
    model = noisy_tiny_dense
    kw = dict(max_new_tokens=6, stop_at_eos=False)
    base = generate_tokens(model, PROMPTS, [], "all", **kw)
    same = generate_tokens(model, PROMPTS, [INLP(torch.zeros(0, 64)).at(SITE)], "all", **kw)
    assert torch.equal(same.logits, base.logits) and torch.equal(same.tokens, base.tokens)


@pytest.mark.parametrize("mode", ["prompt", "generated", "all"])
def test_erased_generation_is_cache_and_batch_consistent(noisy_tiny_dense, mode):
    model, erasure = noisy_tiny_dense, _erasure(noisy_tiny_dense, centred=True, rank=24)
    kw = dict(max_new_tokens=6, stop_at_eos=False)
    steered = generate_tokens(model, PROMPTS, [erasure.at(SITE)], mode, **kw)
    assert not torch.equal(steered.logits, generate_tokens(model, PROMPTS, [], mode, **kw).logits)
    full = generate_tokens(model, PROMPTS, [erasure.at(SITE)], mode, use_kv_cache=False, **kw)
    assert torch.equal(full.tokens, steered.tokens)
    assert_close(full.logits, steered.logits, atol=1e-4, rtol=1e-4)
    single = generate_tokens(model, PROMPTS[1:2], [erasure.at(SITE)], mode, **kw)
    assert torch.equal(single.tokens[0, single.prompt_len:], steered.tokens[1, steered.prompt_len:])


def test_a_projection_of_the_wrong_width_or_without_a_site_is_refused(noisy_tiny_dense):
    model = noisy_tiny_dense
    with pytest.raises(SteerscopeError, match=f"width {D}, but {SITE} of this model has width 64"):
        generate_tokens(model, PROMPTS, [INLP(torch.eye(1, D)).at(SITE)], max_new_tokens=2)
    with pytest.raises(SteerscopeError, match=r"no site: pass erasure.at\(site\)"):
        generate_tokens(model, PROMPTS, [INLP(torch.eye(1, 64))], max_new_tokens=2)
    with pytest.raises(SteerscopeError, match="Did you mean"):
        generate_tokens(model, PROMPTS, [INLP(torch.eye(1, 64)).at("blocks.1.hook_resid_pos")], max_new_tokens=2)
    z = INLP(torch.eye(1, 64)).at("blocks.0.attn.hook_z")  # width unknown up front: checked in the hook
    with pytest.raises(SteerscopeError, match="gives activations of shape"), steer(model, [z], mode="all"):
        model(model.to_tokens("Hi"))
    assert count_hooks(model) == 0


# --- the transformers twin -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from probe.models import load_model
    from tests.probe.tiny_gguf import write_tiny_llama

    path = tmp_path_factory.mktemp("twin") / "tiny.gguf"
    write_tiny_llama(path, n_layers=2)
    return load_model(path, device="cpu")


@pytest.mark.parametrize("mode", ["prompt", "generated", "all"])
def test_erased_generation_on_the_twin_equals_the_hooked_transformers(llama, monkeypatch, mode):
    from probe.twin import twin_of

    B = torch.linalg.qr(torch.randn(64, 16, generator=torch.Generator().manual_seed(2)))[0].T
    p = INLP(B, torch.randn(64, generator=torch.Generator().manual_seed(3))).at(SITE)
    prompts = ["Mr. Darcy said nothing; Elizabeth laughed and", "She walked into the room"]
    kw = dict(steer=[p], mode=mode, max_new_tokens=6, stop_at_eos=False)
    assert twin_of(llama, [SITE]) is not None
    fast = generate_tokens(llama, prompts, **kw)
    monkeypatch.setenv("STEERSCOPE_TWIN", "0")
    slow = generate_tokens(llama, prompts, **kw)
    assert fast.tokens.tolist() == slow.tokens.tolist()
    assert_close(fast.logits, slow.logits, atol=2e-4, rtol=0)
    monkeypatch.delenv("STEERSCOPE_TWIN")
    assert not torch.equal(fast.logits, generate_tokens(llama, prompts, max_new_tokens=6, stop_at_eos=False).logits)
