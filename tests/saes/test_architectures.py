"""Every registered dictionary, parametrised from the registry: configs, artifacts, gradients, scaling, sparsity.

Checks that do not apply to an architecture are skipped by its ``capabilities`` (and ``max_active()``),
never by its name. Architecture-specific equivalences (JumpReLU's STE against SAELens', BatchTopK's
threshold, the g-SAE selection, ``collect_with_grads`` against a TransformerLens reference) follow.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from probe.errors import SteerscopeError
from saes.base import REGISTRY, _import_all, get_architecture, load_dictionary

_import_all()
ARCHS = sorted(REGISTRY)
D_IN, D_OUT, D_SAE, K, N = 12, 10, 32, 4, 24


def caps(arch: str) -> frozenset[str]:
    return REGISTRY[arch].capabilities


def make(arch: str, seed: int = 0, **over):
    """A tiny instance with every float tensor perturbed (no zero biases) and one training step's state."""
    cls = REGISTRY[arch]
    names = {f.name for f in dataclasses.fields(cls.Config)}
    kw = dict(d_in=D_IN, d_sae=D_SAE, site="blocks.0.hook_resid_post", model="tiny")
    if "needs_target" in caps(arch):
        kw.update(d_out=D_OUT, site="blocks.0.ln2.hook_normalized", target_site="blocks.0.hook_mlp_out")
    if "k" in names:
        kw["k"] = K
    if "init_threshold" in names:
        kw["init_threshold"] = 0.3
    kw.update(over)
    torch.manual_seed(seed)
    d = cls.from_config(cls.Config(**kw))
    with torch.no_grad():
        for v in d.state_dict().values():
            if v.is_floating_point():
                v.mul_(1 + 0.1 * torch.rand_like(v)).add_(0.05 * torch.rand_like(v))
        if "backprop" in caps(arch):
            d.train()
            x, target, extra = split(batch(arch, seed + 1))
            d.training_loss(x, target, **extra)  # sets state such as BatchTopK's threshold
    return d.eval()


def batch(arch: str, seed: int = 1, scale: float = 1.0) -> tuple:
    """(x, target) plus the extra keyword arguments this architecture needs (grad), at ``scale``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g)
    target = torch.randn(N, D_OUT, generator=g) if "needs_target" in caps(arch) else None
    grad = torch.randn(N, D_IN, generator=g) if "needs_grad" in caps(arch) else None
    return (x * scale, None if target is None else target * scale) + (({"grad": grad / scale},) if grad is not None else ())


def call(d, x, target=None, extra=None):
    return d(x, target, **(extra or {}))


def split(b):
    return b[0], b[1], (b[2] if len(b) > 2 else {})


@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trips_through_json(arch):
    cfg = make(arch).cfg
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["architecture"] == arch
    again = REGISTRY[arch].Config.from_dict(d)
    assert type(again) is REGISTRY[arch].Config
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_gives_bit_equal_weights_and_outputs(arch, tmp_path):
    d = make(arch)
    x, target, extra = split(batch(arch, 7))
    before = call(d, x, None, extra)
    d.save(tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert type(loaded) is type(d) and not loaded.training
    assert loaded.state_dict().keys() == d.state_dict().keys()
    for k, v in d.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    after = call(loaded, x, None, extra)
    assert torch.equal(after.recon, before.recon) and torch.equal(after.codes, before.codes)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_loss_backward_gives_finite_gradients_to_every_parameter(arch):
    if "backprop" not in caps(arch):
        pytest.skip(f"{arch} is not trained by gradient descent")
    d = make(arch).train()
    x, target, extra = split(batch(arch, 3))
    dead = torch.arange(D_SAE) % 2 == 0  # exercises AuxK where there is one
    loss, out = d.training_loss(x, target, dead=dead, **extra)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert out.recon.shape == (N, d.cfg.d_out) and out.codes.shape == (N, D_SAE)
    loss.backward()
    for name, p in d.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in d.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_the_input_scale_gives_raw_scale_outputs(arch):
    if "fold_input_scale" not in caps(arch):
        pytest.skip(f"{arch} does not fold an input scale")
    s = 3.7
    d = make(arch).train()
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    for step in range(3):  # trained on scaled inputs (and scaled targets / gradients)
        x_s, t_s, extra_s = split(batch(arch, 10 + step, scale=s))
        loss, _ = d.training_loss(x_s, t_s, **extra_s)
        opt.zero_grad()
        loss.backward()
        opt.step()
    d.eval()
    x_s, _, extra_s = split(batch(arch, 5, scale=s))
    x, _, extra = split(batch(arch, 5))
    scaled = call(d, x_s, None, extra_s)
    folded = copy.deepcopy(d)
    folded.fold_input_scale(s)
    raw = call(folded, x, None, extra)
    assert_close(raw.codes, scaled.codes, rtol=1e-5, atol=1e-5)
    assert_close(raw.recon, scaled.recon / s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_is_as_sparse_as_promised(arch):
    d = make(arch)
    x, _, extra = split(batch(arch, 9))
    codes = call(d, x, None, extra).codes
    assert codes.shape == (N, D_SAE)
    bound = d.max_active()
    if bound is None:
        pytest.skip(f"{arch} promises no per-row bound")
    assert int((codes != 0).sum(-1).max()) <= bound
    assert (codes >= 0).all()


# --- bad inputs: one clear SteerscopeError each -----------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_input_of_the_wrong_width_is_a_clear_error(arch):
    d = make(arch)
    with pytest.raises(SteerscopeError, match=f"d_in={D_IN}"):
        d(torch.randn(3, D_IN + 1))


@pytest.mark.parametrize("arch", [a for a in ARCHS if "k" in {f.name for f in dataclasses.fields(REGISTRY[a].Config)}])
def test_k_larger_than_d_sae_is_a_clear_error(arch):
    with pytest.raises(SteerscopeError, match="k must be between 1 and d_sae"):
        make(arch, k=D_SAE + 1)


def test_unknown_architecture_suggests_close_names(tmp_path):
    with pytest.raises(SteerscopeError, match="Did you mean: topk"):
        get_architecture("topkk")
    make("jumprelu").save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    (tmp_path / "d" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelux"}))
    with pytest.raises(SteerscopeError, match="unknown architecture 'jumprelux'.*Did you mean: jumprelu"):
        load_dictionary(tmp_path / "d")


@pytest.mark.parametrize("arch", ARCHS)
def test_truncated_weights_file_is_a_clear_error(arch, tmp_path):
    make(arch).save(tmp_path / "d")
    f = tmp_path / "d" / "weights.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(SteerscopeError, match="corrupted or truncated"):
        load_dictionary(tmp_path / "d")


@pytest.mark.parametrize("arch", [a for a in ARCHS if "needs_target" in caps(a)])
def test_transcoder_without_a_target_is_a_clear_error(arch):
    with pytest.raises(SteerscopeError, match="target_site"):
        REGISTRY[arch].Config(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT)
    with pytest.raises(SteerscopeError, match="needs target"):
        make(arch).train().training_loss(torch.randn(N, D_IN))
    with pytest.raises(SteerscopeError, match=f"d_out={D_OUT}"):
        make(arch).training_loss(torch.randn(N, D_IN), torch.randn(N, D_OUT + 1))


@pytest.mark.parametrize("arch", [a for a in ARCHS if "needs_grad" in caps(a)])
def test_gradient_dictionary_trained_without_gradients_is_a_clear_error(arch):
    d = make(arch).train()
    with pytest.raises(SteerscopeError, match="needs grad"):
        d.training_loss(torch.randn(N, D_IN))
    with pytest.raises(SteerscopeError, match="grad must have the input's shape"):
        d.training_loss(torch.randn(N, D_IN), grad=torch.randn(N - 1, D_IN))


# --- architecture-specific equivalences ---------------------------------------------------------
def test_jumprelu_straight_through_gradients_equal_saelens():
    from sae_lens.saes.jumprelu_sae import JumpReLU as SLJumpReLU
    from sae_lens.saes.jumprelu_sae import Step as SLStep

    from saes.jumprelu import JumpReLUFn, Step

    torch.manual_seed(0)
    pre0, theta0, eps = torch.randn(64, 16), 0.2 + 0.3 * torch.rand(16), 0.3
    w = torch.randn(64, 16)
    grads = []
    for jump, step in ((JumpReLUFn.apply, Step.apply), (lambda p, t, e: SLJumpReLU.apply(p, t, e, False),
                                                        lambda p, t, e: SLStep.apply(p, t, e, False))):
        pre, theta = pre0.clone().requires_grad_(), theta0.clone().requires_grad_()
        ((jump(pre, theta, eps) * w).sum() + step(pre, theta, eps).sum()).backward()
        grads.append((jump(pre0, theta0, eps), pre.grad, theta.grad))
    for ours, theirs in zip(*grads, strict=True):
        assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert grads[0][2].abs().sum() > 0  # the threshold does learn


def test_jumprelu_codes_are_pre_activations_above_the_threshold():
    d = make("jumprelu")
    x = torch.randn(N, D_IN)
    pre, codes = d.pre_acts(x), d.encode(x)
    theta = d.threshold
    assert torch.equal(codes, torch.where(pre > theta, pre, torch.zeros_like(pre)))


def test_batchtopk_keeps_k_times_n_over_the_batch_and_thresholds_at_inference():
    from saes.batchtopk import batch_topk_codes

    d = make("batchtopk").train()
    x = torch.randn(N, D_IN)
    pre = d.pre_acts(x)
    codes = batch_topk_codes(pre, K)
    assert int((codes != 0).sum()) == min(K * N, int((pre > 0).sum()))
    kept = torch.relu(pre).flatten().topk(K * N).values
    assert_close(codes[codes != 0].sort().values, kept[kept > 0].sort().values)
    theta = float(d.threshold)
    d.training_loss(x)
    m = float(codes[codes > 0].min().detach())
    assert float(d.threshold) == pytest.approx((1 - d.cfg.threshold_lr) * theta + d.cfg.threshold_lr * m)
    d.eval()
    inf = d.encode(x)
    assert torch.equal(inf, torch.relu(pre) * (pre > d.threshold.float()))
    assert_close(d.encode(x[:1]), inf[:1])  # a row's codes do not depend on the rest of the batch


def test_gsae_selects_by_activation_times_gradient_effect_and_falls_back_to_topk():
    from saes.topk import topk_codes

    d = make("gsae", beta=5.0)
    x = torch.randn(N, D_IN)
    g = torch.randn(N, D_IN)
    pre = d.pre_acts(x)
    z = torch.relu(pre)
    score = z * (1 + 5.0 * (g @ d.W_dec.T).abs())
    idx = score.topk(K, dim=-1).indices
    expect = torch.zeros_like(z).scatter(-1, idx, z.gather(-1, idx))
    codes = d.encode(x, g)
    assert torch.equal(codes, expect)
    assert not torch.equal(codes, topk_codes(pre, K))  # the gradient changed the selection
    assert torch.equal(d.encode(x), topk_codes(pre, K))  # no gradient: plain TopK
    assert torch.equal(d.encode(x, torch.zeros_like(g)), topk_codes(pre, K))


def test_collect_with_grads_equals_a_transformerlens_reference_and_leaves_no_hooks():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from probe.hooks import count_hooks
    from saes.gsae import collect_with_grads

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4,
                                                      d_vocab=23, act_fn="relu", normalization_type="LN"))
    site, tokens = "blocks.0.hook_resid_post", torch.randint(0, 23, (3, 7))
    acts, grads = collect_with_grads(model, tokens, site)
    assert acts.shape == grads.shape == (3 * 6, 16)
    assert count_hooks(model) == 0 and all(p.grad is None for p in model.parameters())

    delta = torch.zeros(3, 7, 16, requires_grad=True)
    _, cache = model.run_with_cache(tokens, names_filter=site)
    logits = model.run_with_hooks(tokens, fwd_hooks=[(site, lambda t, hook: t + delta)])
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").backward()
    assert_close(acts, cache[site][:, 1:].reshape(-1, 16), rtol=0, atol=0)
    assert_close(grads, delta.grad[:, 1:].reshape(-1, 16), rtol=1e-5, atol=1e-7)
    assert grads[:-1].abs().sum() > 0 and torch.equal(grads.view(3, 6, 16)[:, -1], torch.zeros(3, 16))

    with pytest.raises(SteerscopeError, match="Did you mean"):
        collect_with_grads(model, tokens, "blocks.0.hook_resid_pots")


def test_skip_transcoder_adds_its_linear_skip_term():
    t = make("skip_transcoder")
    x = torch.randn(N, D_IN)
    with torch.no_grad():
        t.W_skip.normal_()
    out = t(x)
    assert_close(out.recon, t.decode(t.encode(x)) + x @ t.W_skip)
    assert out.recon.shape == (N, D_OUT)
