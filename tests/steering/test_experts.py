"""Expert scoring and switching on the tiny random MoE of conftest (2 layers, 8 experts, top-2)."""

from __future__ import annotations

import json

import plotly.graph_objects as go
import pytest
import torch

from probe.errors import SteerscopeError
from probe.hooks import capture, count_hooks, hooks
from steering.experts import ExpertScores, ExpertSwitch, _switch_fn, capture_routing, random_control

PROMPTS = ["Mr. Darcy said", "She walked into the room with Emma", "Bath"]
INDICES = "blocks.*.mlp.hook_expert_indices"


@pytest.fixture
def moe(tiny_moe):
    return tiny_moe


@pytest.fixture
def dense(tiny_dense):
    return tiny_dense


@pytest.fixture
def sentence(moe):
    return moe.to_tokens("She walked into the room")


def run(model, tokens, switch=None):
    with torch.no_grad():
        if switch is None:
            return model(tokens)
        with switch.apply(model):
            return model(tokens)


def selected(model, tokens, switch) -> dict[str, torch.Tensor]:
    with torch.no_grad(), switch.apply(model), capture(model, INDICES) as acts:
        model(tokens)
    return acts


# ------------------------------------------------------------------------------------------ capture / scores


def test_capture_routing_excludes_padding_and_matches_single_prompts(moe):
    r = capture_routing(moe, PROMPTS)
    n_tokens = sum(moe.to_tokens(p).shape[1] for p in PROMPTS)
    assert set(r) == {0, 1}
    for layer, lr in r.items():
        assert lr.probs.shape == (n_tokens, 8) and lr.indices.shape == (n_tokens, 2)
        torch.testing.assert_close(lr.probs.sum(-1), torch.ones(n_tokens), atol=1e-5, rtol=0)
        assert torch.equal(lr.indices, lr.probs.topk(2, dim=-1).indices)
        one_by_one = torch.cat([capture_routing(moe, [p])[layer].probs for p in PROMPTS])
        torch.testing.assert_close(lr.probs, one_by_one, atol=1e-5, rtol=1e-5)


def test_scores_parts_and_top(moe):
    s = ExpertScores.score(moe, PROMPTS[:2], PROMPTS[2:] + ["It is a truth universally acknowledged"])
    assert s.shape == (2, 8)
    for rates in (s.select_behaviour, s.select_control):
        torch.testing.assert_close(rates.sum(-1), torch.full((2,), 2.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.weight_diff.sum(-1), torch.zeros(2), atol=1e-5, rtol=0)
    for by in ("weight", "selection"):
        top = s.top(5, by=by)
        vals = [float(s.diff(by)[layer, e]) for layer, e in top]
        assert vals == sorted(vals, reverse=True) and vals[0] == float(s.diff(by).max())
    assert s.switch(3) == ExpertSwitch(off=s.top(3)) and s.switch(2, action="force").force == tuple(s.top(2))
    assert "2 layers x 8 experts" in repr(s)
    fig = s.heatmap()
    assert isinstance(fig, go.Figure) and tuple(fig.data[0].z.shape) == (2, 8)


def test_identical_prompt_sets_score_zero(moe):
    s = ExpertScores.score(moe, PROMPTS, PROMPTS)
    assert torch.equal(s.weight_diff, torch.zeros(2, 8)) and torch.equal(s.selection_diff, torch.zeros(2, 8))


# ------------------------------------------------------------------------------------------------ switching


def test_empty_switch_is_bit_identical(moe, sentence):
    assert torch.equal(run(moe, sentence, ExpertSwitch()), run(moe, sentence))
    assert not ExpertSwitch()


def test_forcing_the_routers_top_choice_changes_nothing(moe):
    for t in (5, 100, 2000):
        tok = torch.tensor([[t]])
        with capture(moe, "blocks.*.mlp.hook_expert_weights") as acts:
            base = run(moe, tok)
        own = [(layer, int(acts[f"blocks.{layer}.mlp.hook_expert_weights"][0].argmax())) for layer in (0, 1)]
        torch.testing.assert_close(run(moe, tok, ExpertSwitch(force=own)), base, atol=1e-6, rtol=0)


def test_off_for_an_unselected_expert_is_bit_identical(moe):
    tok = moe.to_tokens("Bath")
    used = capture_routing(moe, ["Bath"])[1].indices.unique().tolist()
    idle = next(e for e in range(8) if e not in used)
    assert torch.equal(run(moe, tok, ExpertSwitch(off=[(1, idle)])), run(moe, tok))


def test_off_removes_a_selected_expert(moe, sentence):
    base = run(moe, sentence)
    with capture(moe, INDICES) as acts:
        run(moe, sentence)
    e = int(acts["blocks.0.mlp.hook_expert_indices"][:, 0].mode().values)
    sw = ExpertSwitch(off=[(0, e)])
    assert not torch.allclose(run(moe, sentence, sw), base)
    after = selected(moe, sentence, sw)
    assert (after["blocks.0.mlp.hook_expert_indices"] != e).all()
    assert after["blocks.0.mlp.hook_expert_indices"].shape == acts["blocks.0.mlp.hook_expert_indices"].shape
    assert count_hooks(moe) == 0


def test_force_puts_the_expert_into_every_tokens_selection(moe, sentence):
    sw = ExpertSwitch(force=[(1, 3)], off=[(1, 4)])
    idx = selected(moe, sentence, sw)["blocks.1.mlp.hook_expert_indices"]
    assert (idx == 3).any(-1).all() and not (idx == 4).any()
    assert count_hooks(moe) == 0


@pytest.mark.parametrize("norm_topk", [True, False])
def test_off_equals_masking_the_router_logit(moe, sentence, norm_topk):
    """Reference: softmax with the expert's logit at -inf, then TL's own top-k (and renormalisation)."""
    def reference(p, hook):
        logits = p.log()
        logits[:, 2] = -torch.inf
        return logits.softmax(-1)

    old = moe.cfg.norm_topk_prob
    moe.cfg.norm_topk_prob = norm_topk
    try:
        with torch.no_grad(), hooks(moe, [("blocks.0.mlp.hook_expert_weights", reference)]):
            ref = moe(sentence)
        torch.testing.assert_close(run(moe, sentence, ExpertSwitch(off=[(0, 2)])), ref, atol=1e-5, rtol=1e-5)
    finally:
        moe.cfg.norm_topk_prob = old


def test_switch_probabilities_documented_semantics():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    off = _switch_fn([0], [], renorm=True)(p, None)
    assert off.topk(2).indices.tolist() == [[1, 2]]
    forced = _switch_fn([], [3], renorm=True)(p, None)  # takes the slot of expert 1, with the top weight
    assert forced.topk(2).indices.tolist() == [[3, 0]]
    assert float(forced[0, 3]) == pytest.approx(0.4) and float(forced[0, 3]) > 0.4
    assert torch.equal(_switch_fn([], [0], renorm=True)(p, None), p)  # already the unique top: unchanged
    rescaled = _switch_fn([0], [], renorm=False)(p, None)
    torch.testing.assert_close(rescaled[0, 1:], p[0, 1:] / 0.6)


def test_hooks_removed_also_on_error(moe, sentence):
    with pytest.raises(RuntimeError), ExpertSwitch(off=[(0, 1)]).apply(moe):
        assert count_hooks(moe) == 1
        raise RuntimeError("boom")
    assert count_hooks(moe) == 0


def test_save_load_round_trip_and_repr(tmp_path):
    sw = ExpertSwitch(off=[(0, 1), (1, 7)], force=[(1, 2)])
    assert repr(sw) == "ExpertSwitch(off=[L0E1, L1E7], force=[L1E2])"
    assert ExpertSwitch.load(sw.save(tmp_path / "switch.json")) == sw
    (tmp_path / "bad.json").write_text(json.dumps({"off": [[0, 1]]}))
    with pytest.raises(SteerscopeError, match="not an expert switch"):
        ExpertSwitch.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(SteerscopeError, match="cannot read"):
        ExpertSwitch.load(tmp_path / "junk.json")


def test_random_control(moe):
    s = ExpertScores.score(moe, PROMPTS[:2], PROMPTS[2:])
    top = s.top(4)
    a, b = random_control(s, 4, seed=1), random_control(s, 4, seed=1)
    assert a == b and len(a.off) == 4 and not set(a.off) & set(top)
    for layer in (0, 1):
        assert sum(x == layer for x, _ in a.off) == sum(x == layer for x, _ in top)
    u = random_control(s, 4, seed=2, mode="uniform")
    assert len(u.off) == 4 and not set(u.off) & set(top)
    with pytest.raises(SteerscopeError, match="uniform"):
        random_control(s, 16, seed=0)


# ----------------------------------------------------------------------------------------------- bad inputs


def test_dense_model_is_rejected(dense):
    for call in (lambda: capture_routing(dense, PROMPTS), lambda: ExpertScores.score(dense, PROMPTS, PROMPTS),
                 lambda: ExpertSwitch(off=[(0, 0)]).apply(dense).__enter__()):
        with pytest.raises(SteerscopeError, match="dense model"):
            call()
    assert count_hooks(dense) == 0


@pytest.mark.parametrize("switch, message", [
    (ExpertSwitch(off=[(2, 0)]), "2 layers"),
    (ExpertSwitch(force=[(0, 8)]), "8 experts"),
    (ExpertSwitch(force=[(0, 1), (0, 2), (0, 3)]), "forced"),
    (ExpertSwitch(off=[(1, e) for e in range(7)]), "fewer than"),
])
def test_out_of_range_switch(moe, sentence, switch, message):
    with pytest.raises(SteerscopeError, match=message):
        run(moe, sentence, switch)
    assert count_hooks(moe) == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"off": [(-1, 0)]}, ">= 0"), ({"off": [(0, 1.5)]}, "integer pairs"), ({"force": [(0, 1, 2)]}, "integer pairs"),
    ({"off": [(0, 1), (0, 1)]}, "twice"), ({"off": [(0, 1)], "force": [(0, 1)]}, "both"),
])
def test_malformed_switch(kwargs, message):
    with pytest.raises(SteerscopeError, match=message):
        ExpertSwitch(**kwargs)


def test_empty_prompt_lists_and_bad_top(moe):
    with pytest.raises(SteerscopeError, match="empty prompt list"):
        capture_routing(moe, [])
    with pytest.raises(SteerscopeError, match="empty prompt list"):
        ExpertScores.score(moe, PROMPTS, [])
    s = ExpertScores.score(moe, PROMPTS[:1], PROMPTS[1:])
    with pytest.raises(SteerscopeError, match="1 to 16"):
        s.top(17)
    with pytest.raises(SteerscopeError, match="'weight' or 'selection'"):
        s.top(2, by="rate")
