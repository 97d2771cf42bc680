"""Codebook features: the bottleneck's forward and straight-through gradient, a fine-tune of a tiny zoo model, its
directory loading back quantised, the codebook read as a dictionary (exactly the model's codes), steering by a
code, and the bad inputs."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.codebook import Codebook
from probe.errors import SteerscopeError
from probe.models import load_model
from saes.base import load_dictionary


def _brute(x, codes, k):
    cos = torch.stack([torch.nn.functional.cosine_similarity(x, c[None], dim=-1) for c in codes], -1)
    ids = cos.topk(k, -1).indices
    return codes[ids].sum(-2)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 12), k=st.integers(1, 3), seed=st.integers(0, 1000))
def test_forward_is_the_sum_of_the_k_most_cosine_similar_codes(n, k, seed):
    k = min(k, n)
    torch.manual_seed(seed)
    cb = Codebook(n, 6, k)
    x = torch.randn(3, 5, 6)
    torch.testing.assert_close(cb(x), _brute(x, cb.codes.detach(), k), rtol=0, atol=1e-6)


def test_gradient_is_straight_through_to_the_input_and_reaches_only_selected_codes():
    torch.manual_seed(0)
    cb = Codebook(16, 8, 2)
    x = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(4, 8)
    (cb(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g)  # identity for the input
    ids, _ = cb.select(x)
    touched = cb.codes.grad.abs().sum(1) > 0
    assert set(touched.nonzero().flatten().tolist()) == set(ids.flatten().tolist())


def test_inputs_that_are_codes_pass_unchanged():
    cb = Codebook(10, 5, 1)
    x = cb.codes.detach()[[3, 7, 7, 0]] * torch.tensor([[2.0], [0.5], [1.0], [3.0]])  # scaled: same angle
    torch.testing.assert_close(cb(x), cb.codes.detach()[[3, 7, 7, 0]])


def test_bad_codebook_shapes_get_one_clear_line():
    with pytest.raises(SteerscopeError, match="at least that many codes"):
        Codebook(4, 8, 5)
    with pytest.raises(SteerscopeError, match="positive integer"):
        Codebook(0, 8, 1)
    with pytest.raises(SteerscopeError, match="width 8 got an activation of width 3"):
        Codebook(4, 8, 1)(torch.randn(2, 3))


@pytest.fixture(scope="module")
def tuned(tiny_zoo, tmp_path_factory):
    from saes.codebook import fine_tune

    out = tmp_path_factory.mktemp("cb") / "model"
    card = fine_tune(str(tiny_zoo), out, n_codes=32, k=2, n_tokens=8 * 256 * 3, refresh_every=2, eval_contexts=4,
                     progress=False)
    return out, card


def test_fine_tune_writes_a_model_directory_that_loads_quantised(tuned):
    out, card = tuned
    m = load_model(str(out))
    assert sorted(m.codebooks) == ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    assert card["test"]["loss_codebook_model"] == pytest.approx(
        __import__("probe.zoo.train", fromlist=["x"]).evaluate_loss(m, _test_tokens(4)), abs=1e-4)
    m.reset_hooks()  # the bottleneck is permanent: clearing hooks does not remove it
    _, cache = m.run_with_cache(_test_tokens(1), names_filter=["blocks.0.hook_mlp_out"])
    y = cache["blocks.0.hook_mlp_out"][0]
    cb = m.codebooks["blocks.0.hook_mlp_out"]
    ids, _ = cb.select(y)  # every output is a sum of k codes: re-selecting finds codes whose sum it is
    assert card["code_usage"]["blocks.0.hook_mlp_out"]["active_codes"] <= 32
    assert torch.isfinite(y).all() and ids.shape[-1] == 2


def _test_tokens(n):
    from probe.zoo.train import load_tokens

    return load_tokens("test")[:n]


def test_the_dictionary_picks_exactly_the_models_codes(tuned):
    out, card = tuned
    m = load_model(str(out))
    d = load_dictionary(out / card["dictionaries"]["blocks.1.hook_mlp_out"])
    assert d.cfg.site == "blocks.1.mlp.hook_post" and d.cfg.target_site == "blocks.1.hook_mlp_out"
    toks = _test_tokens(2)
    _, cache = m.run_with_cache(toks, names_filter=["blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out"])
    codes = d.encode(cache["blocks.1.mlp.hook_post"])
    assert bool(((codes > 0).sum(-1) == 2).all())  # exactly k active codes at every position
    torch.testing.assert_close(d.decode(codes), cache["blocks.1.hook_mlp_out"], rtol=1e-5, atol=1e-5)
    with pytest.raises(SteerscopeError, match="fine-tuning"):
        d.training_loss(cache["blocks.1.mlp.hook_post"])


def test_a_feature_store_of_a_codebook_counts_k_codes_per_token(tuned, tmp_path):
    from app.store import FeatureStore
    from saes.features import build_feature_store

    out, card = tuned
    toks = _test_tokens(2)
    meta = build_feature_store(out / card["dictionaries"]["blocks.0.hook_mlp_out"], str(out), toks, tmp_path / "fs",
                               n_examples=3, n_intervals=2, per_interval=1, n_bins=4, progress=False)
    fs = FeatureStore.open(tmp_path / "fs")
    total = sum(fs.feature(i)["n_fired"] for i in range(32))
    assert total == 2 * meta["n_tokens"]  # k = 2 codes at every scanned token


def test_activating_a_code_adds_its_vector_after_the_bottleneck(tuned):
    from probe.hooks import capture
    from steering.apply import steer
    from steering.vectors import SteeringVector

    out, card = tuned
    m = load_model(str(out))
    d = load_dictionary(out / card["dictionaries"]["blocks.1.hook_mlp_out"])
    code = d.W_dec[5].detach()
    v = SteeringVector.from_feature(d, 5, coeff=float(code.norm()))  # "activate code 5 once"
    assert v.site == "blocks.1.hook_mlp_out"
    toks = _test_tokens(1)[:, :12]
    with capture(m, ["blocks.1.hook_resid_post"]) as base:
        m(toks)
    with steer(m, [v], mode="all"), capture(m, ["blocks.1.hook_resid_post"]) as got:
        m(toks)
    diff = got["blocks.1.hook_resid_post"] - base["blocks.1.hook_resid_post"]
    torch.testing.assert_close(diff, code.expand_as(diff), rtol=1e-4, atol=1e-4)


def test_bad_inputs_get_one_clear_line(tuned, tiny_zoo, tmp_path):
    from saes.codebook import codebook_sites, fine_tune

    out, _ = tuned
    with pytest.raises(SteerscopeError, match="needs a zoo model"):
        fine_tune("not-a-model", tmp_path / "x")
    with pytest.raises(SteerscopeError, match="not empty"):
        fine_tune(str(tiny_zoo), out)
    with pytest.raises(SteerscopeError, match="at least one batch"):
        fine_tune(str(tiny_zoo), tmp_path / "y", n_tokens=10)
    m = load_model(str(tiny_zoo))
    with pytest.raises(SteerscopeError, match=r"layers must be distinct integers in 0\.\.1"):
        codebook_sites(m, [0, 4])
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "codebooks.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SteerscopeError, match="cannot read its codebooks"):
        load_model(str(broken))


def test_moe_models_are_refused(tiny_moe):
    from saes.codebook import codebook_sites

    with pytest.raises(SteerscopeError, match="mixture of experts"):
        codebook_sites(tiny_moe, None)
