"""sites.resolve (names, globs, lists, predicates; forward order; errors) and hooks' lifetimes and values."""

from __future__ import annotations

import pytest
import torch

from probe.errors import SteerscopeError
from probe.hooks import capture, count_hooks, hooks
from probe.models import build_model
from probe.sites import all_sites, layer_of, resolve, resolve_one

RESID_POST = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def firing_order(model, tokens) -> list[str]:
    """The hook names in the order they first fire during one forward pass (torch hooks, removed after)."""
    fired: list[str] = []
    handles = [
        hp.register_forward_hook(lambda mod, inp, out, name=name: fired.append(name) if name not in fired else None)
        for name, hp in model.hook_dict.items()
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    return fired


# ---------------------------------------------------------------- resolve
def test_resolve_names_globs_lists_predicates(tiny_dense):
    m = tiny_dense
    assert resolve(m, "blocks.1.hook_resid_post") == ["blocks.1.hook_resid_post"]
    assert resolve(m, "blocks.*.hook_resid_post") == RESID_POST
    attn = ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v", "blocks.1.attn.hook_z"]
    assert resolve(m, "blocks.[1].attn.hook_?") == attn
    # a list: any order in, duplicates and overlaps collapse, forward order out
    spec = ["blocks.1.hook_resid_post", "hook_embed", "blocks.1.hook_resid_post", "blocks.*.hook_resid_pre"]
    assert resolve(m, spec) == ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    assert resolve(m, ("blocks.0.mlp.hook_post",)) == ["blocks.0.mlp.hook_post"]
    assert resolve(m, lambda name: name.endswith("mlp.hook_post")) == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert resolve_one(m, "*.1.hook_resid_post") == "blocks.1.hook_resid_post"
    assert [layer_of(n) for n in ["hook_embed", "blocks.1.attn.hook_z", "ln_final.hook_scale"]] == [None, 1, None]


def test_all_sites_is_forward_order(tiny_model, tokens):
    sites = all_sites(tiny_model)
    assert sorted(sites) == sorted(tiny_model.hook_dict)
    fired = firing_order(tiny_model, tokens)
    assert len(fired) > 40
    assert [s for s in sites if s in fired] == fired
    assert resolve(tiny_model, "*") == sites


def test_forward_order_with_optional_hooks_on(tiny_spec, tokenizer_file, tokens):
    """Hooks TL only calls when asked (split qkv input, per-head result, mlp_in) and a gated dense MLP."""
    model = build_model(tiny_spec("austen-moe", num_experts=None, experts_per_token=None), tokenizer_file).eval()
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    fired = firing_order(model, tokens)
    assert {"blocks.0.hook_q_input", "blocks.0.attn.hook_result", "blocks.0.hook_mlp_in",
            "blocks.0.mlp.hook_pre_linear"} <= set(fired)
    assert [s for s in all_sites(model) if s in fired] == fired


def test_resolve_typo_suggests_close_names(tiny_dense):
    with pytest.raises(SteerscopeError, match=r"unknown site 'blocks\.0\.hook_resid_pots'\. Did you mean: blocks\.0\.hook_resid_post"):
        resolve(tiny_dense, "blocks.0.hook_resid_pots")
    with pytest.raises(SteerscopeError, match=r"Did you mean: .*blocks\.1\.attn\.hook_pattern"):
        resolve(tiny_dense, ["blocks.0.hook_resid_post", "blocks.1.attn.hook_patern"])


def test_resolve_layer_out_of_range_names_the_layer_count(tiny_dense):
    msg = r"the model has 2 layers \(blocks\.0 to blocks\.1\)"
    with pytest.raises(SteerscopeError, match=r"site 'blocks\.5\.hook_resid_post': " + msg):
        resolve(tiny_dense, "blocks.5.hook_resid_post")
    with pytest.raises(SteerscopeError, match=msg):
        resolve(tiny_dense, "blocks.2.*")


def test_resolve_rejects_empty_matches_and_bad_specs(tiny_dense):
    m = tiny_dense
    with pytest.raises(SteerscopeError, match=r"site pattern 'blocks\.\*\.hook_nothing' matches no hook"):
        resolve(m, "blocks.*.hook_nothing")
    with pytest.raises(SteerscopeError, match="the site predicate matched no hook"):
        resolve(m, lambda name: False)
    with pytest.raises(SteerscopeError, match="no sites given"):
        resolve(m, [])
    with pytest.raises(SteerscopeError, match="a site must be a string, got int"):
        resolve(m, ["hook_embed", 3])
    with pytest.raises(SteerscopeError, match="sites must be a name, a glob, a list of them or a predicate; got int"):
        resolve(m, 3)
    with pytest.raises(SteerscopeError, match=r"'blocks\.\*\.hook_resid_post' matches 2 sites; give exactly one"):
        resolve_one(m, "blocks.*.hook_resid_post")


# ---------------------------------------------------------------- hook lifetimes
def test_hooks_are_removed_on_exit_and_on_error(tiny_dense, tokens):
    m = tiny_dense
    assert count_hooks(m) == 0
    noop = [(s, lambda t, hook: None) for s in RESID_POST]
    with hooks(m, noop, bwd=[("hook_embed", lambda g, hook: None)]):
        assert count_hooks(m) == 3
    assert count_hooks(m) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(m, noop):
            assert count_hooks(m) == 2
            raise RuntimeError("boom")
    assert count_hooks(m) == 0
    # a bad second name: the first hook was added, then removed again
    with pytest.raises(SteerscopeError, match="Did you mean: blocks.1.hook_resid_post"):
        with hooks(m, [noop[0], ("blocks.1.hook_resid_pots", noop[0][1])]):
            pass
    assert count_hooks(m) == 0


def test_capture_hooks_are_removed_on_exit_and_on_error(tiny_dense, tokens):
    m = tiny_dense
    assert count_hooks(m) == 0
    with capture(m, "blocks.*.hook_resid_*") as acts:
        assert count_hooks(m) == 6
        m(tokens)
    assert count_hooks(m) == 0 and len(acts) == 6
    with pytest.raises(ValueError, match="inside"):
        with capture(m, RESID_POST):
            assert count_hooks(m) == 2
            raise ValueError("inside")
    assert count_hooks(m) == 0
    with pytest.raises(SteerscopeError):
        with capture(m, "blocks.9.hook_resid_post"):
            pass
    assert count_hooks(m) == 0


# ---------------------------------------------------------------- hook values
def test_capture_equals_run_with_cache(tiny_model, tokens):
    m = tiny_model
    spec = ["hook_embed", "blocks.*.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.0.mlp.*hook_post", "ln_final.hook_normalized"]
    with torch.no_grad():
        with capture(m, spec) as acts:
            logits = m(tokens)
        ref_logits, cache = m.run_with_cache(tokens)
    assert list(acts) != [] and sorted(acts) == sorted(resolve(m, spec))
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for name, value in acts.items():
        assert not value.requires_grad
        torch.testing.assert_close(value, cache[name], rtol=0, atol=0)
    assert acts["blocks.1.hook_resid_post"].shape == (2, tokens.shape[1], 64)
    assert count_hooks(m) == 0


def test_adding_to_the_residual_matches_a_manual_forward(tiny_model, tokens):
    m = tiny_model
    v = torch.linspace(-1.0, 1.0, m.cfg.d_model)
    add_v = lambda t, hook: t + v  # noqa: E731
    with torch.no_grad():
        clean, cache = m.run_with_cache(tokens)
        with hooks(m, [("blocks.1.hook_resid_post", add_v)]):
            steered_last = m(tokens)
        with hooks(m, [("blocks.0.hook_resid_post", add_v)]):
            steered_first = m(tokens)
        # by hand: the final norm and unembedding applied to the shifted residual
        manual_last = m.unembed(m.ln_final(cache["blocks.1.hook_resid_post"] + v))
        # the second block run on the shifted residual (no hooks involved)
        manual_first = m(cache["blocks.0.hook_resid_post"] + v, start_at_layer=1)
    assert count_hooks(m) == 0
    torch.testing.assert_close(steered_last, manual_last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steered_first, manual_first, rtol=1e-5, atol=1e-5)
    assert (steered_last - clean).abs().max() > 1e-2  # the shift really changed the output


def test_backward_hook_sees_and_can_scale_the_gradient(tiny_dense, tokens):
    """Backward hooks are set up during the forward pass: forward and backward both run inside the context."""
    m = tiny_dense
    seen = {}

    def record(grad, hook):
        seen[hook.name] = grad.clone()

    m.zero_grad(set_to_none=True)
    with capture(m, "blocks.0.hook_resid_post", detach=False) as acts:
        with hooks(m, bwd=[("blocks.0.hook_resid_post", record)]):
            loss = m(tokens, return_type="loss")
            (expected,) = torch.autograd.grad(loss, acts["blocks.0.hook_resid_post"], retain_graph=True)
            seen.clear()
            loss.backward()
    torch.testing.assert_close(seen["blocks.0.hook_resid_post"], expected, rtol=0, atol=0)
    grad_plain = m.embed.W_E.grad.clone()

    m.zero_grad(set_to_none=True)
    with hooks(m, bwd=[("hook_embed", lambda grad, hook: 2 * grad)]):
        m(tokens, return_type="loss").backward()
    torch.testing.assert_close(m.embed.W_E.grad, 2 * grad_plain, rtol=1e-6, atol=1e-8)
    m.zero_grad(set_to_none=True)
    assert count_hooks(m) == 0
