"""TopK dictionaries train through the fused kernels by default, and that path equals the dense one."""

import dataclasses

import pytest
import torch

from saes.base import get_architecture
from saes.metrics import fired, l0

CASES = [("topk", dict(k=5)), ("transcoder", dict(k=5, target_site="blocks.0.hook_mlp_out", d_out=12)),
         ("skip_transcoder", dict(k=5, target_site="blocks.0.hook_mlp_out", d_out=12))]


@pytest.mark.parametrize("arch,kw", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("with_dead", [False, True])
def test_fused_loss_and_grads_equal_dense(arch, kw, with_dead):
    torch.manual_seed(0)
    cls = get_architecture(arch)
    fused = cls(cls.Config(d_in=16, d_sae=48, **kw)).double()
    assert fused.cfg.fused  # the default
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.1 * torch.randn_like(p))
    dense = cls(dataclasses.replace(fused.cfg, fused=False)).double()
    dense.load_state_dict(fused.state_dict())
    x = torch.randn(20, 16, dtype=torch.float64)
    target = torch.randn(20, kw.get("d_out", 16), dtype=torch.float64) if "target_site" in kw else None
    dead = (torch.arange(48) % 3 == 0) if with_dead else None
    results = []
    for model in (fused, dense):
        loss, out = model.training_loss(x, target, dead=dead)
        loss.backward()
        results.append((loss.detach(), out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lf, of, gf), (ld, od, gd) = results
    torch.testing.assert_close(lf, ld, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(of.recon, od.recon, atol=1e-10, rtol=1e-10)
    assert of.codes.is_sparse and of.codes._nnz() == 20 * model.cfg.k  # no dense N x d_sae tensor in the fused step
    torch.testing.assert_close(of.codes.to_dense(), od.codes, atol=1e-10, rtol=1e-10)
    assert torch.equal(fired(of.codes), fired(od.codes)) and float(l0(of.codes)) == float(l0(od.codes))
    assert set(gf) == set(gd)
    for name in gf:
        torch.testing.assert_close(gf[name], gd[name], atol=1e-9, rtol=1e-9, msg=name)
    if with_dead:
        assert float(of.aux["auxk"]) > 0
