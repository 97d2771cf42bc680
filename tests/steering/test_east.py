"""EAST (steering.east): the entropy-weighted, episode-centred vector and the decision-position readout."""

from __future__ import annotations

import math

import pytest
import torch

from probe.errors import SteerscopeError
from probe.hooks import capture
from probe.tokens import encode
from steering.east import EAST, decision_states, entropy
from steering.vectors import SteeringVector

SITE = "blocks.1.hook_resid_post"


def test_entropy_in_nats():
    assert float(entropy(torch.tensor([0.5, 0.5]))) == pytest.approx(math.log(2))
    assert float(entropy(torch.tensor([1.0, 0.0]))) == 0.0  # 0 log 0 = 0
    assert entropy(torch.tensor([[0.25] * 4, [1.0, 0, 0, 0]])).tolist() == pytest.approx([math.log(4), 0.0])


def test_fit_is_the_formula_on_a_hand_example():
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [10.0, 10.0], [12.0, 10.0]])
    h = torch.tensor([1.0, 3.0, 0.0, 2.0])
    ep = torch.tensor([0, 0, 1, 1])
    # centred: episode 0 mean (2, 1) -> (-1, -1), (1, 1); episode 1 mean (11, 10) -> (-1, 0), (1, 0)
    # u = (1 * (-1, -1) + 3 * (1, 1) + 0 + 2 * (1, 0)) / 6 = (4, 2) / 6
    v = EAST.fit(z, h, ep, SITE)
    assert v.tensor.tolist() == pytest.approx([4 / 6, 2 / 6]) and v.site == SITE and v.coeff == 1.0
    assert v.provenance["method"] == "east" and v.provenance["n_episodes"] == 2


def test_fit_recovers_the_direction_uncertainty_moves_along():
    """States move along d in proportion to the entropy, on top of a large per-episode offset: u points along d,
    and the offsets cancel (shifting one episode's states changes nothing)."""
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    n_ep, T = 12, 10
    ep = torch.arange(n_ep).repeat_interleave(T)
    h = torch.rand(n_ep * T, generator=g) * math.log(2)
    z = 20 * torch.randn(n_ep, 32, generator=g)[ep] + 3 * h[:, None] * d + 0.05 * torch.randn(n_ep * T, 32, generator=g)
    u = EAST.fit(z, h, ep, SITE).tensor
    assert float(torch.nn.functional.cosine_similarity(u, d, dim=0)) > 0.98
    shifted = z.clone()
    shifted[ep == 3] += 100.0
    assert torch.allclose(EAST.fit(shifted, h, ep, SITE).tensor, u, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(4, 2), torch.ones(3), torch.zeros(4)), "one entropy and one episode id"),
    ((torch.zeros(4, 2), torch.zeros(4), torch.tensor([0, 0, 1, 1])), "zero entropy"),
    ((torch.zeros(4, 2), torch.ones(4), torch.arange(4)), "one decision"),
    ((torch.full((4, 2), float("nan")), torch.ones(4), torch.zeros(4)), "NaN"),
    ((torch.zeros(4, 2), -torch.ones(4), torch.zeros(4)), ">= 0"),
])
def test_bad_fit_inputs_get_one_line(args, message):
    with pytest.raises(SteerscopeError, match=message):
        EAST.fit(*args, SITE)


def test_decision_states_read_the_last_token(tiny_dense):
    prompts = ["Mr. Darcy bowed to", "It is a truth universally acknowledged that a man"]
    a, b = int(encode(tiny_dense, " Elizabeth")[-1]), int(encode(tiny_dense, " Jane")[-1])
    d = decision_states(tiny_dense, prompts, [a, b], site=SITE)
    assert d.probs.shape == (2, 2) and torch.allclose(d.probs.sum(1), torch.ones(2))
    for i, p in enumerate(prompts):  # each row alone, unpadded, through the plain forward
        tokens = encode(tiny_dense, p)[None]
        with torch.no_grad(), capture(tiny_dense, SITE) as acts:
            logits = tiny_dense(tokens)[0, -1]
        lp = logits.log_softmax(-1)[[a, b]]
        assert torch.allclose(d.probs[i], lp.softmax(-1), atol=1e-4)
        assert float(d.mass[i]) == pytest.approx(float(lp.exp().sum()), rel=1e-3)
        assert torch.allclose(d.z[i], acts[SITE][0, -1], atol=1e-4)
    v = SteeringVector(SITE, torch.randn(tiny_dense.cfg.d_model), 6.0)
    steered = decision_states(tiny_dense, prompts, [a, b], steer=[v])
    assert not torch.allclose(steered.probs, d.probs, atol=1e-3) and steered.z is None
    assert torch.equal(decision_states(tiny_dense, prompts, [a, b], steer=[v.with_coeff(0.0)]).probs,
                       decision_states(tiny_dense, prompts, [a, b]).probs)
    with pytest.raises(SteerscopeError, match="at least two action"):
        decision_states(tiny_dense, prompts, [a])
    with pytest.raises(SteerscopeError, match="must be in"):
        decision_states(tiny_dense, prompts, [a, 10**7])
