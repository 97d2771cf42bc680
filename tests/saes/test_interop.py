"""SAELens interop: SAELens loads our exports with equal outputs, we load its saves with equal outputs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.saes.sae import SAEMetadata
from torch.testing import assert_close

from probe.errors import SteerscopeError
from saes.base import REGISTRY, _import_all
from saes.interop import EXPORTS, IMPORTS, export_saelens, import_saelens

_import_all()
D_IN, D_OUT, D_SAE, K, N = 12, 10, 32, 4, 20
SITE, TARGET = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
TOL = dict(rtol=1e-5, atol=1e-5)


def ours(arch: str, seed: int = 0, **over):
    """A tiny dictionary of ours with random, non-degenerate weights (ReLU for transcoders, so SAELens has a class)."""
    cls = REGISTRY[arch]
    names = {f.name for f in dataclasses.fields(cls.Config)}
    kw = dict(d_in=D_IN, d_sae=D_SAE, site=SITE, model="tiny-model")
    kw.update({"d_out": D_OUT, "target_site": TARGET} if "needs_target" in cls.capabilities else {})
    kw.update({f: v for f, v in (("k", K), ("activation", "relu"), ("init_threshold", 0.3)) if f in names})
    kw.update(over)
    torch.manual_seed(seed)
    d = cls.from_config(cls.Config(**kw))
    with torch.no_grad():
        for name, p in d.named_parameters():
            noise = torch.rand_like(p) if name == "log_threshold" else torch.randn_like(p)  # theta in [0.3, 0.4)
            p.add_(0.3 * noise if name == "log_threshold" else 0.2 * noise)
        if arch == "batchtopk":
            d.threshold.fill_(0.4)
    return d.eval()


def grab(sl) -> tuple:
    """(encode, decode, forward) of a SAELens SAE on a fixed batch."""
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(5))
    codes = sl.encode(x)
    return x, codes, sl.decode(codes), sl(x)


@pytest.mark.parametrize("arch", sorted(set(EXPORTS) & set(REGISTRY)))
def test_saelens_loads_our_export_with_equal_outputs(arch, tmp_path):
    d = ours(arch)
    export_saelens(d, tmp_path / "sl")
    sl = SAE.load_from_disk(tmp_path / "sl")
    assert sl.cfg.architecture() == EXPORTS[arch]
    assert sl.cfg.metadata.hook_name == SITE and sl.cfg.metadata.model_name == "tiny-model"
    x, codes, dec, fwd = grab(sl)
    ours_codes = d.encode(x)
    assert (ours_codes != 0).any() and (ours_codes == 0).any()  # a real test of the sparsity pattern
    assert_close(codes, ours_codes, **TOL)
    assert_close(dec, d.decode(codes), **TOL)
    assert_close(fwd, d(x).recon, **TOL)
    if "needs_target" in d.capabilities:
        assert sl.cfg.metadata.hook_name_out == TARGET and sl.cfg.d_out == D_OUT


def _saelens_model(kind: str):
    meta = SAEMetadata(hook_name=SITE, model_name="tiny-model", hook_name_out=TARGET)
    common = dict(d_in=D_IN, d_sae=D_SAE, metadata=meta)
    tc = dict(common, d_out=D_OUT, apply_b_dec_to_input=False)
    return {
        "standard": lambda: StandardSAE(StandardSAEConfig(**common)),
        "standard-no-b_dec-input": lambda: StandardSAE(StandardSAEConfig(**common, apply_b_dec_to_input=False)),
        "topk": lambda: TopKSAE(TopKSAEConfig(**common, k=K)),
        "topk-rescaled": lambda: TopKSAE(TopKSAEConfig(**common, k=K, rescale_acts_by_decoder_norm=True)),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(**common)),
        "transcoder": lambda: Transcoder(TranscoderConfig(**tc)),
        "skip_transcoder": lambda: SkipTranscoder(SkipTranscoderConfig(**tc)),
    }[kind]()


@pytest.mark.parametrize("kind", ["standard", "standard-no-b_dec-input", "topk", "topk-rescaled", "jumprelu",
                                  "transcoder", "skip_transcoder"])
def test_we_load_a_saelens_save_with_equal_outputs(kind, tmp_path):
    torch.manual_seed(1)
    sl = _saelens_model(kind)
    with torch.no_grad():
        for name, p in sl.named_parameters():
            p.copy_(0.5 * torch.rand_like(p) if name == "threshold" else 0.3 * torch.randn_like(p))
        if hasattr(sl, "threshold"):
            sl.threshold[:3] = 0.0  # a zero threshold (plain ReLU) must survive the log
    sl.save_model(tmp_path / "sl")
    d = import_saelens(tmp_path / "sl")
    assert d.architecture == IMPORTS[sl.cfg.architecture()] and not d.training
    assert d.cfg.site == SITE and d.cfg.model == "tiny-model"
    x, codes, dec, fwd = grab(sl)
    assert (codes != 0).any() and (codes == 0).any()
    assert_close(d.encode(x), codes, **TOL)
    assert_close(d.decode(codes), dec, **TOL)
    assert_close(d(x).recon, fwd, **TOL)
    if "needs_target" in d.capabilities:
        assert d.cfg.target_site == TARGET and d.cfg.d_out == D_OUT


@pytest.mark.parametrize("arch", sorted(a for a in REGISTRY if IMPORTS.get(EXPORTS.get(a, "")) == a))
def test_export_then_import_round_trips_config_and_outputs(arch, tmp_path):
    d = ours(arch, training={"steps": 7})
    back = import_saelens(export_saelens(d, tmp_path / "sl"))
    assert type(back) is type(d)
    assert back.cfg.to_dict() == d.cfg.to_dict()
    x = torch.randn(N, D_IN)
    assert_close(back(x).recon, d(x).recon, rtol=1e-6, atol=1e-6)


# --- bad inputs -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(set(REGISTRY) - set(EXPORTS)))
def test_exporting_an_architecture_saelens_lacks_is_a_clear_error(arch, tmp_path):
    cls = REGISTRY[arch]
    d = cls.from_config(cls.Config(d_in=D_IN, d_sae=D_SAE))
    with pytest.raises(SteerscopeError, match="SAELens has no class"):
        export_saelens(d, tmp_path / "sl")


@pytest.mark.parametrize("arch", sorted(a for a in REGISTRY if "needs_target" in REGISTRY[a].capabilities))
def test_exporting_a_topk_transcoder_is_a_clear_error(arch, tmp_path):
    with pytest.raises(SteerscopeError, match="no TopK transcoder"):
        export_saelens(ours(arch, activation="topk"), tmp_path / "sl")


def test_importing_an_unsupported_saelens_architecture_is_a_clear_error(tmp_path):
    GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE)).save_model(tmp_path / "gated")
    with pytest.raises(SteerscopeError, match="'gated' cannot be imported; supported: jumprelu, skip_transcoder"):
        import_saelens(tmp_path / "gated")


def test_importing_a_transcoder_without_an_output_hook_needs_target_site(tmp_path):
    Transcoder(TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False)).save_model(tmp_path / "t")
    with pytest.raises(SteerscopeError, match="pass target_site="):
        import_saelens(tmp_path / "t")
    assert import_saelens(tmp_path / "t", target_site=TARGET).cfg.target_site == TARGET


def test_importing_a_truncated_or_normalised_saelens_save_is_a_clear_error(tmp_path):
    path = export_saelens(ours("relu"), tmp_path / "sl")
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(SteerscopeError, match="normalize_activations='layer_norm'"):
        import_saelens(path)
    f = path / "sae_weights.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(SteerscopeError, match="corrupted or truncated"):
        import_saelens(path)
