"""Generation-time steering: invariants, manual-forward equivalence, KV cache, left-padded batches."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from probe.errors import SteerscopeError
from probe.hooks import count_hooks, hooks
from probe.models import build_model
from probe.zoo.specs import MODEL_SPECS
from steering.apply import _new_cache, generate, generate_tokens, left_pad, steer
from steering.vectors import SteeringVector

TINY = {**MODEL_SPECS["austen-dense"], "n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}
SITE = "blocks.1.hook_resid_pre"
PROMPTS = ["She walked into the room", "Mr. Darcy", "It is a truth universally acknowledged"]
N_NEW = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(TINY, "probe/zoo/tokenizer.json")
    with torch.no_grad():  # sharper random weights, so greedy tokens vary and steering changes them
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.25)
    return m.eval()


@pytest.fixture(scope="module")
def vectors(model):
    torch.manual_seed(1)
    return {"flat": SteeringVector.from_direction(torch.randn(64), SITE, 4.0),
            "actadd": SteeringVector.actadd(model, "Love", "Hate", layer=1, coeff=2.0)}


CASES = [("flat", "prompt"), ("flat", "generated"), ("flat", "all"), ("flat", "last"), ("actadd", "prompt"),
         ("actadd", "all")]


def _run(model, prompts, vecs, mode, **kw):
    return generate_tokens(model, prompts, vecs, mode, max_new_tokens=N_NEW, stop_at_eos=False, **kw)


def _new(g, row=0):
    return g.tokens[row, g.prompt_len:]


# --- invariants ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, mode", CASES)
def test_zero_vector_changes_nothing_bit_for_bit(model, vectors, kind, mode):
    zero = vectors[kind].with_coeff(0.0)
    base, steered = _run(model, PROMPTS, [], mode), _run(model, PROMPTS, [zero], mode)
    assert torch.equal(steered.logits, base.logits) and torch.equal(steered.tokens, base.tokens)


@pytest.mark.parametrize("kind, mode", CASES)
def test_steering_changes_output(model, vectors, kind, mode):
    base, steered = _run(model, PROMPTS, [], mode), _run(model, PROMPTS, [vectors[kind]], mode)
    assert not torch.equal(steered.tokens, base.tokens)


def test_flat_vector_equals_manual_forward(model, vectors):
    v, tokens = vectors["flat"], model.to_tokens(PROMPTS[0])
    with torch.no_grad():
        with steer(model, [v], mode="all"):
            steered = model(tokens)
        resid = model(tokens, stop_at_layer=1)  # = blocks.1.hook_resid_pre
        manual = model(resid + 4.0 * v.tensor, start_at_layer=1)
    assert_close(steered, manual, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered, model(tokens), atol=1e-3)


def test_actadd_equals_manual_forward_on_first_T_positions(model, vectors):
    v, tokens = vectors["actadd"], model.to_tokens(PROMPTS[0])
    T = v.tensor.shape[0]
    with torch.no_grad():
        with steer(model, [v], mode="prompt"):
            steered = model(tokens)
        resid = model(tokens, stop_at_layer=1).clone()
        resid[0, :T] += 2.0 * v.tensor
        manual = model(resid, start_at_layer=1)
    assert_close(steered, manual, atol=1e-5, rtol=1e-5)


def test_actadd_bos_row_is_exactly_zero(vectors):
    assert torch.equal(vectors["actadd"].tensor[0], torch.zeros(64))


def test_actadd_only_first_T_positions_and_only_prompt_pass(model, vectors):
    """Capture the site before and after the steering hook, on a cached prefill and a decode pass."""
    v = vectors["actadd"]
    T = v.tensor.shape[0]
    seen: dict[str, list] = {"before": [], "after": []}
    rec = lambda key: (lambda t, h: seen[key].append(t.clone()))  # noqa: E731
    tokens, mask, pad_left = left_pad(model, PROMPTS[:1])
    P = tokens.shape[1]
    cache = _new_cache(model, 1)
    with torch.no_grad(), hooks(model, [(SITE, rec("before"))]):
        with steer(model, [v], mode="all", prompt_len=P, pad_left=pad_left) as pos, hooks(model, [(SITE, rec("after"))]):
            logits = model(tokens, attention_mask=mask, past_kv_cache=cache)
            pos.start = P
            model(logits[:, -1:].argmax(-1), attention_mask=mask[:, -1:], past_kv_cache=cache)
    (pre_b, dec_b), (pre_a, dec_a) = seen["before"], seen["after"]
    assert_close(pre_a[0, :T] - pre_b[0, :T], 2.0 * v.tensor, atol=1e-5, rtol=0)
    assert torch.equal(pre_a[0, T:], pre_b[0, T:])
    assert dec_a.shape[1] == 1 and torch.equal(dec_a, dec_b)


def test_last_mode_steers_only_the_last_prompt_position(model, vectors):
    v, tokens = vectors["flat"], model.to_tokens(PROMPTS[2])
    with torch.no_grad():
        with steer(model, [v], mode="last"):
            steered = model(tokens)
        resid = model(tokens, stop_at_layer=1).clone()
        resid[:, -1] += 4.0 * v.tensor
        manual = model(resid, start_at_layer=1)
    assert_close(steered, manual, atol=1e-5, rtol=1e-5)
    assert torch.equal(steered[:, :-1], model(tokens)[:, :-1])  # causal: earlier positions never see it
    g = _run(model, PROMPTS, [v], "last")  # only the prompt pass: the first new token's logits move, as in a
    base = _run(model, PROMPTS, [], "last")  # hand-steered prompt pass
    assert not torch.allclose(g.logits[:, 0], base.logits[:, 0], atol=1e-3)
    with pytest.raises(SteerscopeError, match="ActAdd"):
        _run(model, PROMPTS, [vectors["actadd"]], "last")


def test_generated_mode_leaves_first_token_unsteered(model, vectors):
    base, steered = _run(model, PROMPTS, [], "generated"), _run(model, PROMPTS, [vectors["flat"]], "generated")
    assert torch.equal(steered.logits[:, 0], base.logits[:, 0])
    assert not torch.allclose(steered.logits[:, 1], base.logits[:, 1], atol=1e-3)
    prompt = _run(model, PROMPTS, [vectors["flat"]], "prompt")
    assert not torch.allclose(prompt.logits[:, 0], base.logits[:, 0], atol=1e-3)


# --- KV cache and batching -------------------------------------------------------------------------
@pytest.mark.parametrize("kind, mode", [(None, "prompt"), *CASES])
def test_kv_cache_matches_full_recompute(model, vectors, kind, mode):
    vecs = [vectors[kind]] if kind else []
    cached, full = _run(model, PROMPTS, vecs, mode), _run(model, PROMPTS, vecs, mode, use_kv_cache=False)
    assert torch.equal(cached.tokens, full.tokens)
    assert_close(cached.logits, full.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, mode", [(None, "prompt"), *CASES])
def test_left_padded_batch_matches_single_runs(model, vectors, kind, mode):
    vecs = [vectors[kind]] if kind else []
    batch = _run(model, PROMPTS, vecs, mode)
    assert int(batch.pad_left.max()) > 0
    for r, prompt in enumerate(PROMPTS):
        single = _run(model, [prompt], vecs, mode)
        assert torch.equal(_new(batch, r), _new(single))
        assert_close(batch.logits[r], single.logits[0], atol=1e-4, rtol=1e-4)


def test_several_vectors_and_text_api(model, vectors):
    both = [vectors["flat"], vectors["actadd"]]
    texts = generate(model, PROMPTS, steer=both, mode="all", max_new_tokens=4)
    assert isinstance(texts, list) and len(texts) == 3
    assert isinstance(generate(model, PROMPTS[0], steer=both, mode="all", max_new_tokens=4), str)


@pytest.mark.parametrize("mode", ["prompt", "generated", "all"])
def test_steer_none_is_steer_empty(model, mode):
    none, empty = _run(model, PROMPTS, None, mode), _run(model, PROMPTS, [], mode)
    assert torch.equal(none.tokens, empty.tokens) and torch.equal(none.logits, empty.logits)
    assert generate(model, PROMPTS[0], steer=None, max_new_tokens=4) == generate(model, PROMPTS[0], max_new_tokens=4)
    with steer(model, None) as pos:
        assert count_hooks(model) == 0 and pos.start == 0


def test_sampling_is_seeded(model, vectors):
    kw = dict(do_sample=True, temperature=1.5, top_k=50, top_p=0.9)
    a = _run(model, PROMPTS, [vectors["flat"]], "all", seed=3, **kw)
    b = _run(model, PROMPTS, [vectors["flat"]], "all", seed=3, **kw)
    assert torch.equal(a.tokens, b.tokens)
    greedy = _run(model, PROMPTS, [], "prompt")
    assert torch.equal(_run(model, PROMPTS, [], "prompt", do_sample=True, top_k=1, seed=0).tokens, greedy.tokens)


# --- hooks are always removed ----------------------------------------------------------------------
def test_no_hooks_remain(model, vectors):
    assert count_hooks(model) == 0
    with steer(model, [vectors["flat"], vectors["actadd"]], mode="all"):
        assert count_hooks(model) == 2
    assert count_hooks(model) == 0
    _run(model, PROMPTS, [vectors["flat"]], "all")
    assert count_hooks(model) == 0


def test_no_hooks_remain_after_exceptions(model, vectors):
    with pytest.raises(RuntimeError), steer(model, [vectors["flat"]], mode="all"):
        raise RuntimeError("boom")
    assert count_hooks(model) == 0
    with pytest.raises(SteerscopeError, match="longer than the prompt"), steer(model, [vectors["actadd"]]):
        model(model.to_tokens("I"))  # 2 tokens with BOS; raised inside the hook, mid-forward
    assert count_hooks(model) == 0


# --- bad inputs ------------------------------------------------------------------------------------
def test_dimension_mismatch(model):
    v = SteeringVector.from_direction(torch.ones(32), SITE, 1.0)
    with pytest.raises(SteerscopeError, match="dimension 32.*width 64"):
        generate(model, PROMPTS, steer=[v])
    w = SteeringVector.from_direction(torch.ones(64), "blocks.0.attn.hook_z", 1.0)  # width unknown up front
    with pytest.raises(SteerscopeError, match="shape"), steer(model, [w], mode="all"):
        model(model.to_tokens("Hi"))
    assert count_hooks(model) == 0


def test_unknown_site_suggests(model):
    v = SteeringVector.from_direction(torch.ones(64), "blocks.1.hook_resid_pos", 1.0)
    with pytest.raises(SteerscopeError, match="Did you mean: blocks.1.hook_resid_post"):
        generate(model, PROMPTS, steer=[v])


def test_actadd_longer_than_prompt(model):
    long = SteeringVector.actadd(model, "I talk about weddings constantly", "Hate", layer=1)
    with pytest.raises(SteerscopeError, match="longer than the prompt"):
        generate(model, ["Mr. Darcy", "She walked into the room and sat"], steer=[long])
    with pytest.raises(SteerscopeError, match="use mode='prompt' or 'all'"):
        generate(model, PROMPTS, steer=[long], mode="generated")


@pytest.mark.parametrize("prompts, kw, message", [
    ([], {}, "empty"), (["ok", ""], {}, "empty prompt"), (PROMPTS, {"mode": "both"}, "mode must be"),
    (PROMPTS, {"max_new_tokens": 0}, "max_new_tokens"), (PROMPTS, {"max_new_tokens": 300}, "n_ctx"),
    (PROMPTS, {"top_p": 0.0}, "top_p"), (PROMPTS, {"steer": ["not a vector"]}, "SteeringVector"),
])
def test_bad_generation_inputs(model, prompts, kw, message):
    with pytest.raises(SteerscopeError, match=message):
        generate(model, prompts, **kw)
    assert count_hooks(model) == 0
