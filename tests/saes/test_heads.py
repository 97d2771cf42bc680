"""Circuit heads from discrete SAE codes (saes.circuits.heads) and the head-patching baseline it is measured against."""

from __future__ import annotations

import copy

import pytest
import torch

from probe.errors import SteerscopeError
from probe.hooks import capture
from probe.tokens import encode
from saes.circuits.heads import agreement, code_scores, find_heads, head_outputs, rank_heads

POS = ["When Mary and John went to the store, John gave a drink to", "Then, Jane and Tom had a walk. Tom gave a note to",
       "After Emma and Harriet came in, Harriet gave a book to", "Once Anne and James were home, James sent a box to",
       "While Lucy and Edward sat down, Edward passed a pen to", "When Kitty and Lydia went out, Lydia gave a hat to"]
NEG = ["When Mary and John went to the store, Anne gave a drink to", "Then, Jane and Tom had a walk. Lucy gave a note to",
       "After Emma and Harriet came in, Jane gave a book to", "Once Anne and James were home, Kitty sent a box to",
       "While Lucy and Edward sat down, Emma passed a pen to", "When Kitty and Lydia went out, Tom gave a hat to"]


def test_head_outputs_sum_to_the_attention_output(tiny_dense):
    """Per-head outputs (z_h W_O[h], averaged over tokens) plus b_O add up to the layer's mean hook_attn_out."""
    acts = head_outputs(tiny_dense, POS[:3], batch_size=2)  # two batches, padded rows in the first
    L, H, d = tiny_dense.cfg.n_layers, tiny_dense.cfg.n_heads, tiny_dense.cfg.d_model
    assert acts.shape == (3, L, H, d)
    for i, p in enumerate(POS[:3]):
        with torch.no_grad(), capture(tiny_dense, [f"blocks.{layer}.hook_attn_out" for layer in range(L)]) as got:
            tiny_dense(encode(tiny_dense, p)[None])
        for layer in range(L):
            want = got[f"blocks.{layer}.hook_attn_out"][0].mean(0)
            total = acts[i, layer].sum(0) + tiny_dense.blocks[layer].attn.b_O
            assert torch.allclose(total, want, atol=1e-5)


def test_last_position_outputs_are_the_last_tokens(tiny_dense):
    acts = head_outputs(tiny_dense, POS[:3], batch_size=2, position="last")
    for i, p in enumerate(POS[:3]):
        with torch.no_grad(), capture(tiny_dense, "blocks.1.hook_attn_out") as got:
            tiny_dense(encode(tiny_dense, p)[None])
        want = got["blocks.1.hook_attn_out"][0, -1]
        assert torch.allclose(acts[i, 1].sum(0) + tiny_dense.blocks[1].attn.b_O, want, atol=1e-5)
    with pytest.raises(SteerscopeError, match="'mean' or 'last'"):
        head_outputs(tiny_dense, POS, position="first")


def test_code_scores_count_codes_unique_to_positives():
    # 4 prompts (2 positive), 1 layer, 2 heads
    codes = torch.tensor([[[1, 5]], [[2, 5]], [[2, 6]], [[3, 7]]])
    positive = torch.tensor([True, True, False, False])
    # head 0: P = {1, 2}, N = {2, 3} -> 1 unique (of 3 seen); head 1: P = {5}, N = {6, 7} -> 1 unique (of 3)
    assert code_scores(codes, positive).tolist() == [[1.0, 1.0]]
    assert code_scores(codes, positive, normalise=True).tolist() == [[pytest.approx(1 / 3), pytest.approx(1 / 3)]]
    with pytest.raises(SteerscopeError, match="both positive and negative"):
        code_scores(codes, torch.ones(4, dtype=torch.bool))


def test_agreement_against_a_hand_computed_auc():
    scores = torch.tensor([[3.0, 1.0], [2.0, 0.0]])
    truth = [(0, 0), (0, 1)]  # scores 3 and 1 against 2 and 0: pairs (3>2, 3>0, 1<2, 1>0) -> AUC 3/4
    a = agreement(scores, truth)
    assert a["auc"] == pytest.approx(0.75)
    assert a["precision_at_k"] == 0.5 and a["recall_at_k"] == 0.5  # top 2: (0,0) hit, (1,0) miss
    assert a["n_positive_score"] == 3 and a["precision"] == pytest.approx(2 / 3) and a["recall"] == 1.0
    with pytest.raises(SteerscopeError, match="truth set"):
        agreement(scores, [])


def test_a_planted_head_is_found_first():
    """Every head's vector is one of 6 shared modes (plus noise) on every prompt, except head (1, 2), whose
    positive prompts use 3 modes of their own: its positive codes never occur on negatives, so it ranks first."""
    g = torch.Generator().manual_seed(0)
    n, L, H, d = 24, 2, 4, 16
    modes = torch.randn(9, d, generator=g) * 3
    pick = torch.randint(0, 6, (n, L, H), generator=g)
    positive = torch.arange(n) < 12
    pick[positive, 1, 2] = torch.randint(6, 9, (12,), generator=g)
    acts = modes[pick] + 0.05 * torch.randn(n, L, H, d, generator=g)
    r = rank_heads(acts, positive, n_train=6, d_sae=32, epochs=300)
    assert r.ranking()[0] == (1, 2) and r.scores[1, 2] == 3.0
    others = r.scores.clone()
    others[1, 2] = 0
    assert others.max() < 3.0
    assert r.codes.shape == (n, L, H) and len(r.train) == 12 and positive[r.train].sum() == 6


def test_silent_heads_score_zero(tiny_dense):
    """Heads whose W_O is zero write nothing: one code on every prompt, so no code is unique to positives."""
    model = copy.deepcopy(tiny_dense)
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            model.blocks[layer].attn.W_O[:2].zero_()
    r = find_heads(model, POS, NEG, n_train=3, d_sae=32, epochs=100)
    assert (r.scores[:, :2] == 0).all() and r.seconds > 0


def test_bad_inputs_get_one_line(tiny_dense):
    with pytest.raises(SteerscopeError, match="n_train must be between 1 and 6"):
        find_heads(tiny_dense, POS, NEG, n_train=7)
    with pytest.raises(SteerscopeError, match="positive and negative prompts"):
        find_heads(tiny_dense, POS, [])
    with pytest.raises(SteerscopeError, match="non-empty list"):
        head_outputs(tiny_dense, "one string")
    with pytest.raises(SteerscopeError, match="one label per prompt"):
        rank_heads(torch.zeros(4, 2, 4, 8), torch.tensor([True, False]))
    with pytest.raises(SteerscopeError, match="NaN"):
        rank_heads(torch.full((4, 2, 4, 8), float("nan")), torch.tensor([True, True, False, False]), n_train=2)


def test_head_patching_matches_a_hand_patch_and_ignores_a_silent_head(tiny_dense):
    from steering.padding import end_aligned
    from steering.patching import head_patching, logit_diff, paired_tokens

    model = copy.deepcopy(tiny_dense)
    with torch.no_grad():
        model.blocks[0].attn.W_O[1].zero_()  # head (0, 1) writes nothing: patching it changes nothing
    a, b = encode(model, " Mary")[-1], encode(model, " John")[-1]
    metric = logit_diff(a, b)
    res = head_patching(model, POS[:2], NEG[:2], metric)
    assert res.effects.shape == (2, 4) and res.effects[0, 1] == 0.0
    base, source = paired_tokens(model, POS[:2], NEG[:2])
    with torch.no_grad(), capture(model, "blocks.1.attn.hook_z") as z:
        model(source.tokens)
    z_src = z["blocks.1.attn.hook_z"]

    def fn(t, hook):
        t = t.clone()
        t[:, :, 3] = z_src[:, :, 3]
        return t

    with torch.no_grad():
        m = float(metric(end_aligned(model.run_with_hooks(base.tokens, fwd_hooks=[("blocks.1.attn.hook_z", fn)]),
                                     base.lengths)))
    assert res.effects[1, 3] == pytest.approx((m - res.metric_base) / (res.metric_source - res.metric_base), abs=1e-5)
    assert res.ranking()[0] == divmod(int(res.effects.abs().argmax()), 4)
