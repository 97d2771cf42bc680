"""SteeringVector: constructors against hand computations, strict save/load, GGUF export, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from probe.errors import SteerscopeError
from probe.hooks import capture, hooks
from probe.models import build_model
from probe.zoo.specs import MODEL_SPECS
from steering.gguf_export import export_gguf, gguf_layer, import_gguf
from steering.vectors import SteeringVector, principal_direction, read_activations

TINY = {**MODEL_SPECS["austen-dense"], "n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}
SITE = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(TINY, "probe/zoo/tokenizer.json")
    with torch.no_grad():  # sharper random weights, so different inputs give clearly different outputs
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.25)
    return m.eval()


def _acts(model, text: str, site: str = SITE) -> torch.Tensor:
    with torch.no_grad(), capture(model, [site]) as a:
        model(model.to_tokens(text), return_type=None)
    return a[site][0]


# --- the dataclass -------------------------------------------------------------------------------
def test_repr_is_readable():
    v = SteeringVector.from_direction(torch.ones(4), SITE, 2.5)
    assert repr(v) == f"SteeringVector(direction, site='{SITE}', shape=[4], coeff=2.5, norm=2)"


@pytest.mark.parametrize("tensor", [torch.zeros(2, 3, 4), torch.zeros(0), torch.tensor([1.0, float("nan")]),
                                    torch.tensor([1, 2])])
def test_bad_tensors_rejected(tensor):
    with pytest.raises(SteerscopeError):
        SteeringVector(SITE, tensor, 1.0)


@pytest.mark.parametrize("coeff", [float("inf"), "2", True])
def test_bad_coeff_rejected(coeff):
    with pytest.raises(SteerscopeError, match="coeff"):
        SteeringVector(SITE, torch.ones(3), coeff)


def test_save_load_round_trip_exact(tmp_path, model):
    v = SteeringVector.actadd(model, "Love", "Hate", layer=1, coeff=5.0)
    w = SteeringVector.load(v.save(tmp_path / "v"))
    assert torch.equal(w.tensor, v.tensor) and (w.site, w.coeff, w.provenance) == (v.site, v.coeff, v.provenance)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "vector.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "vector.safetensors").unlink(), "missing"),
    (lambda d: (d / "vector.json").unlink(), "no vector.json"),
    (lambda d: (d / "vector.safetensors").write_bytes(b"\x00" * 5), "corrupted"),
    (lambda d: _edit_json(d, shape=[5]), "shape"),
    (lambda d: _edit_json(d, extra=1), "expected keys"),
    (lambda d: _edit_json(d, format="other"), "not a steerscope"),
    (lambda d: _edit_json(d, dtype="float16"), "dtype"),
])
def test_malformed_files_rejected(tmp_path, damage, message):
    d = SteeringVector.from_direction(torch.arange(4.0), SITE, 1.0).save(tmp_path / "v")
    damage(d)
    with pytest.raises(SteerscopeError, match=message):
        SteeringVector.load(d)


def _edit_json(d, **changes):
    meta = json.loads((d / "vector.json").read_text())
    (d / "vector.json").write_text(json.dumps({**meta, **changes}))


def test_unserialisable_provenance_rejected(tmp_path):
    v = SteeringVector(SITE, torch.ones(3), 1.0, {"bad": object()})
    with pytest.raises(SteerscopeError, match="JSON"):
        v.save(tmp_path / "v")


# --- ActAdd ----------------------------------------------------------------------------------------
def test_actadd_is_per_position_difference_with_space_padding(model):
    v = SteeringVector.actadd(model, "I talk about weddings", "Hate", layer=1, coeff=4.0)
    add, sub = model.to_tokens("I talk about weddings")[0], model.to_tokens("Hate")[0]
    T, space = len(add), model.to_single_token(" ")
    sub_padded = torch.cat([sub, sub.new_full((T - len(sub),), space)])
    assert v.tensor.shape == (T, 64) and v.site == SITE and v.coeff == 4.0
    assert torch.equal(v.tensor[0], torch.zeros(64))  # BOS row exactly zero
    with torch.no_grad(), capture(model, [SITE]) as a:
        model(sub_padded[None], return_type=None)
    assert_close(v.tensor, _acts(model, "I talk about weddings") - a[SITE][0], atol=1e-5, rtol=0)
    assert v.provenance["tokens_sub"][len(sub):] == [" "] * (T - len(sub))


def test_actadd_layer_and_site_errors(model):
    with pytest.raises(SteerscopeError, match="layer 2 out of range"):
        SteeringVector.actadd(model, "Love", "Hate", layer=2)
    with pytest.raises(SteerscopeError, match="Did you mean"):
        SteeringVector.actadd(model, "Love", "Hate", layer=1, site="blocks.1.hook_resid_pr")
    with pytest.raises(SteerscopeError, match="empty prompt"):
        SteeringVector.actadd(model, "", "Hate", layer=1)


# --- mean difference (CAA) -------------------------------------------------------------------------
POS = ["She was very happy indeed", "Joy", "They laughed and danced all night"]
NEG = ["She was sad", "Grief and sorrow filled the long cold house", "Tears"]


@pytest.mark.parametrize("position", ["last", "mean"])
def test_mean_diff_masks_padding(model, position):
    v = SteeringVector.mean_diff(model, POS, NEG, SITE, position=position)

    def one(text):  # unpadded, one prompt at a time
        a = _acts(model, text)
        return a[-1] if position == "last" else a[1:].mean(0)

    expected = torch.stack([one(t) for t in POS]).mean(0) - torch.stack([one(t) for t in NEG]).mean(0)
    assert v.tensor.shape == (64,)
    assert_close(v.tensor, expected, atol=1e-5, rtol=0)
    assert_close(read_activations(model, POS, SITE, position, batch_size=1),
                 read_activations(model, POS, SITE, position, batch_size=8), atol=1e-5, rtol=0)


def test_mean_diff_bad_inputs(model):
    with pytest.raises(SteerscopeError, match="empty"):
        SteeringVector.mean_diff(model, [], NEG, SITE)
    with pytest.raises(SteerscopeError, match="empty prompt"):
        SteeringVector.mean_diff(model, ["ok", ""], NEG, SITE)
    with pytest.raises(SteerscopeError, match="Did you mean"):
        SteeringVector.mean_diff(model, POS, NEG, "blocks.1.hook_resid_psot")
    with pytest.raises(SteerscopeError, match="position"):
        SteeringVector.mean_diff(model, POS, NEG, SITE, position="first")


# --- PCA -------------------------------------------------------------------------------------------
def test_principal_direction_by_hand():
    # differences spread along e0 (centred spread), offset along +e1; 2 of 3 project negatively on e0
    diffs = torch.tensor([[-2.0, 1.0, 0.0], [-1.0, 1.0, 0.0], [3.0, 1.0, 0.0]], dtype=torch.float64)
    u = principal_direction(diffs)
    assert_close(u, torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_pca_unit_norm_and_majority_sign(model):
    v = SteeringVector.pca(model, POS, NEG, SITE, coeff=3.0)
    diffs = read_activations(model, POS, SITE) - read_activations(model, NEG, SITE)
    centred = diffs - diffs.mean(0)
    top = torch.linalg.svd(centred.double(), full_matrices=False).Vh[0].float()
    assert_close(v.tensor.norm(), torch.tensor(1.0), atol=1e-6, rtol=0)
    assert_close(v.tensor.abs(), top.abs(), atol=1e-5, rtol=0)
    assert int(((diffs @ v.tensor) > 0).sum()) >= 2


def test_pca_bad_inputs(model):
    with pytest.raises(SteerscopeError, match="paired"):
        SteeringVector.pca(model, POS, NEG[:2], SITE)
    with pytest.raises(SteerscopeError, match="at least 2"):
        SteeringVector.pca(model, POS[:1], NEG[:1], SITE)


# --- dictionary features ---------------------------------------------------------------------------
def test_from_feature_sae_and_transcoder():
    from saes.topk import TopKConfig, TopKSAE
    from saes.transcoder import Transcoder, TranscoderConfig

    sae = TopKSAE(TopKConfig(d_in=64, d_sae=16, k=4, site="blocks.1.hook_resid_post"))
    v = SteeringVector.from_feature(sae, 3, coeff=2.0)
    row = sae.W_dec[3].detach()
    assert v.site == "blocks.1.hook_resid_post" and v.coeff == 2.0
    assert_close(v.tensor, row / row.norm(), atol=1e-6, rtol=0)
    tc = Transcoder(TranscoderConfig(d_in=64, d_sae=16, k=4, site="blocks.0.hook_mlp_in",
                                     target_site="blocks.0.hook_mlp_out", apply_b_dec_to_input=False))
    assert SteeringVector.from_feature(tc, 5).site == "blocks.0.hook_mlp_out"
    with pytest.raises(SteerscopeError, match="out of range"):
        SteeringVector.from_feature(sae, 16)


@pytest.mark.parametrize("arch", ["topk", "transcoder", "snmf"])
def test_from_feature_is_a_unit_residual_direction_after_fold_input_scale(model, arch):
    """coeff means residual-norm units for every dictionary: after fold_input_scale(s) the decoder rows have
    norm 1/s (or anything, for SNMF), yet the vector added to the residual stream has norm exactly coeff."""
    from saes.snmf import SNMF, SNMFConfig
    from saes.topk import TopKConfig, TopKSAE
    from saes.transcoder import Transcoder, TranscoderConfig

    torch.manual_seed(0)
    d = {"topk": lambda: TopKSAE(TopKConfig(d_in=64, d_sae=16, k=4, site="blocks.1.hook_resid_post")),
         "transcoder": lambda: Transcoder(TranscoderConfig(d_in=64, d_sae=16, k=4, site="blocks.0.hook_mlp_in",
                                                           target_site="blocks.0.hook_mlp_out",
                                                           apply_b_dec_to_input=False)),
         "snmf": lambda: SNMF(SNMFConfig(d_in=128, d_sae=4, site="blocks.0.mlp.hook_post"))}[arch]()
    before = SteeringVector.from_feature(d, 2, coeff=3.0, model=model)
    s = 7.5
    with torch.no_grad():
        d.fold_input_scale(s) if arch != "snmf" else d.W_dec.mul_(1 / s)
    if arch != "snmf":
        assert_close(d.W_dec[2].norm(), before.provenance["direction_norm"] / s * torch.ones(()), atol=1e-5, rtol=1e-5)
    v = SteeringVector.from_feature(d, 2, coeff=3.0, model=model)
    assert_close(v.scaled().norm(), torch.tensor(3.0), atol=1e-5, rtol=0)  # |coeff * direction| = coeff
    assert_close(v.tensor, before.tensor, atol=1e-5, rtol=1e-5)  # the scale changes nothing
    assert v.provenance["direction_norm"] == pytest.approx(before.provenance["direction_norm"] / s, rel=1e-4)
    assert v.tensor.shape == (64,) and v.site.startswith("blocks.")


def test_from_feature_snmf_is_w_out_z(model):
    from saes.snmf import SNMF, SNMFConfig

    snmf = SNMF(SNMFConfig(d_in=128, d_sae=4, site="blocks.0.mlp.hook_post"))
    with pytest.raises(SteerscopeError, match="model="):
        SteeringVector.from_feature(snmf, 1)
    v = SteeringVector.from_feature(snmf, 1, coeff=3.0, model=model)
    assert v.site == "blocks.0.hook_mlp_out"
    z = snmf.W_dec[1].detach()
    z = z / float((z @ model.blocks[0].mlp.W_out.detach()).norm())  # unit in the residual stream
    tokens = model.to_tokens("She walked into the room")
    with torch.no_grad(), hooks(model, [("blocks.0.mlp.hook_post", lambda t, h: t + 3.0 * z)]):
        neuron_space = model(tokens)
    with torch.no_grad(), hooks(model, [(v.site, lambda t, h: t + v.scaled())]):
        residual = model(tokens)
    assert_close(residual, neuron_space, atol=1e-4, rtol=1e-4)


# --- GGUF ------------------------------------------------------------------------------------------
def test_gguf_read_back_with_gguf_reader(tmp_path):
    gguf = pytest.importorskip("gguf")
    a = SteeringVector.from_direction(torch.randn(64), "blocks.2.hook_resid_pre", 2.0)   # -> direction.1
    b = SteeringVector.from_direction(torch.randn(64), "blocks.3.hook_resid_post", -1.5)  # -> direction.3
    path = export_gguf([a, b], tmp_path / "v.gguf", n_layers=4, model_hint="llama")
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.3"]
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert_close(tensors["direction.1"], a.scaled(), atol=0, rtol=0)
    assert_close(tensors["direction.3"], b.scaled(), atol=0, rtol=0)
    back = import_gguf(path)
    assert [v.site for v in back] == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]


def test_gguf_layer_mapping_and_errors(tmp_path):
    assert gguf_layer("blocks.2.hook_resid_pre", 4) == 1 and gguf_layer("blocks.1.hook_resid_post", 4) == 1
    for site in ("blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"):
        with pytest.raises(SteerscopeError):
            gguf_layer(site, 4)
    positional = SteeringVector(SITE, torch.ones(3, 8), 1.0)
    with pytest.raises(SteerscopeError, match="positional"):
        export_gguf([positional], tmp_path / "p.gguf", n_layers=4)
