"""Metrics: hand-computed L0/FVU/EV, latent health, and the CE/KL splice invariants on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from probe.errors import SteerscopeError
from probe.hooks import count_hooks
from saes.base import Dictionary, DictionaryConfig, DictOutput, load_dictionary
from saes.metrics import (
    ReconStats,
    ce_kl_scores,
    dead_fraction,
    dense_fraction,
    evaluate,
    explained_variance,
    fvu,
    l0,
)
from saes.relu import ReLUConfig, ReLUSAE

ROOT = Path(__file__).resolve().parents[2]
SITE = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    from probe.models import build_model
    from probe.zoo.specs import MODEL_SPECS

    torch.manual_seed(0)
    cfg = {**MODEL_SPECS["austen-dense"], "n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}
    return build_model(cfg, ROOT / "probe" / "zoo" / "tokenizer.json").eval()


@pytest.fixture(scope="module")
def tokens(model):
    t = torch.randint(3, model.cfg.d_vocab, (6, 24), generator=torch.Generator().manual_seed(1))
    t[:, 0] = model.tokenizer.bos_token_id
    return t


def linear_sae(W_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None, site: str = SITE) -> ReLUSAE:
    d_in, d_sae = W_enc.shape
    sae = ReLUSAE(ReLUConfig(d_in=d_in, d_sae=d_sae, site=site))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.zeros(W_dec.shape[1]) if b_dec is None else b_dec)
    return sae


def identity_sae(d: int) -> ReLUSAE:
    """relu(x) - relu(-x) == x exactly: codes [relu(x), relu(-x)], decoder [I; -I]."""
    eye = torch.eye(d)
    return linear_sae(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0))


# ---------------------------------------------------------------- batch metrics
def test_fvu_is_centred_and_matches_a_hand_computation():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    x_hat = torch.tensor([[1.0, 3.0], [2.0, 4.0], [5.0, 7.0]])
    # mean = (3, 5); total variance = (4 + 0 + 4) + (9 + 1 + 16) = 34; squared error = 1 + 1 + 4 = 6
    assert float(fvu(x, x_hat)) == pytest.approx(6 / 34)
    assert float(explained_variance(x, x_hat)) == pytest.approx(28 / 34)
    assert float(fvu(x + 100, x_hat + 100)) == pytest.approx(6 / 34)  # a shared offset changes nothing
    assert float(fvu(x, x.mean(0).expand_as(x))) == pytest.approx(1.0)  # predicting the mean explains nothing


def test_recon_stats_over_batches_equal_the_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=g) * 3 + 50
    x_hat = x + torch.randn(100, 5, generator=g)
    stats = ReconStats()
    for a, b in zip(x.split(17), x_hat.split(17), strict=True):
        stats.update(a, b)
    assert stats.fvu == pytest.approx(float(fvu(x, x_hat)), rel=1e-9)


def test_l0_dead_and_dense_fractions():
    codes = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.5, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    assert float(l0(codes)) == pytest.approx(4 / 3)
    counts = (codes != 0).sum(0)  # [0, 3, 0, 1]
    assert dead_fraction(counts) == 0.5
    assert dense_fraction(counts, n_tokens=3) == 0.5  # 3/3 and 1/3 of tokens, both > 10%
    assert dense_fraction(counts, n_tokens=3, threshold=0.5) == 0.25


# ---------------------------------------------------------------- CE / KL invariants
def test_identity_dictionary_scores_one(model, tokens):
    for ablation in ("zero", "mean"):
        r = ce_kl_scores(model, identity_sae(64), tokens, ablation=ablation)
        assert r["ce_loss_spliced"] == pytest.approx(r["ce_loss_clean"], abs=1e-6)
        assert r["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
        assert r["ce_loss_ablated"] > r["ce_loss_clean"] + 1e-3 and r["kl_ablated"] > 1e-3
        assert r["ce_score"] == pytest.approx(1.0, abs=1e-5) and r["kl_score"] == pytest.approx(1.0, abs=1e-5)
    assert count_hooks(model) == 0


def test_splicing_the_ablation_itself_scores_zero(model, tokens):
    zero = linear_sae(torch.zeros(64, 8), torch.zeros(8, 64))  # outputs b_dec = 0: the zero ablation
    r = ce_kl_scores(model, zero, tokens, ablation="zero")
    assert r["ce_score"] == pytest.approx(0.0, abs=1e-6) and r["kl_score"] == pytest.approx(0.0, abs=1e-6)
    acts = []
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(SITE, lambda t, hook: acts.append(t[:, 1:]))])
    mean = torch.cat(acts).reshape(-1, 64).mean(0)
    r = ce_kl_scores(model, linear_sae(torch.zeros(64, 8), torch.zeros(8, 64), b_dec=mean), tokens, ablation="mean")
    assert r["ce_score"] == pytest.approx(0.0, abs=1e-4) and r["kl_score"] == pytest.approx(0.0, abs=1e-4)
    assert r["ablation"] == "mean"


class MLPTranscoder(Dictionary):
    """A 'transcoder' that is the model's own MLP: predicts hook_mlp_out exactly from hook_resid_mid."""

    def __init__(self, block, d: int, zero: bool = False):
        super().__init__(DictionaryConfig(d_in=d, d_sae=1, site="blocks.0.hook_resid_mid", target_site="blocks.0.hook_mlp_out"))
        self.block, self.zero = block, zero

    def forward(self, x, target=None):
        y = self.block.mlp(self.block.ln2(x[:, None]))[:, 0]
        return DictOutput(torch.zeros_like(y) if self.zero else y, torch.ones(len(x), 1), {})


def test_transcoder_splices_the_target_site(model, tokens):
    r = ce_kl_scores(model, MLPTranscoder(model.blocks[0], 64), tokens)
    assert r["target_site"] == "blocks.0.hook_mlp_out"
    assert r["ce_score"] == pytest.approx(1.0, abs=1e-3) and r["kl_score"] == pytest.approx(1.0, abs=1e-3)
    r = ce_kl_scores(model, MLPTranscoder(model.blocks[0], 64, zero=True), tokens)
    assert r["ce_score"] == pytest.approx(0.0, abs=1e-6) and r["kl_score"] == pytest.approx(0.0, abs=1e-6)


def test_bos_position_is_not_spliced(model, tokens):
    seen = []

    class Spy(ReLUSAE):
        def forward(self, x, target=None):
            seen.append(x.clone())
            return super().forward(x, target)

    sae = Spy(ReLUConfig(d_in=64, d_sae=128, site=SITE))
    sae.load_state_dict(identity_sae(64).state_dict())
    ce_kl_scores(model, sae, tokens, batch_size=4)
    assert sum(len(s) for s in seen) == tokens.shape[0] * (tokens.shape[1] - 1)


def test_bad_inputs_raise_and_leave_no_hooks(model, tokens):
    with pytest.raises(SteerscopeError, match="expects d_in=32"):
        ce_kl_scores(model, identity_sae(32), tokens)
    assert count_hooks(model) == 0
    with pytest.raises(SteerscopeError, match="ablation must be"):
        ce_kl_scores(model, identity_sae(64), tokens, ablation="resample")
    with pytest.raises(SteerscopeError, match="unknown site"):
        ce_kl_scores(model, identity_sae(64), tokens, site="blocks.0.hook_resid_pots")
    with pytest.raises(SteerscopeError, match="integer ids"):
        ce_kl_scores(model, identity_sae(64), tokens.float())


# ---------------------------------------------------------------- evaluate and the CLI
def test_evaluate_writes_eval_json(model, tokens, tmp_path):
    identity_sae(64).save(tmp_path / "sae")
    res = evaluate(tmp_path / "sae", model, tokens)
    assert json.loads((tmp_path / "sae" / "eval.json").read_text()) == res
    assert res["fvu"] == pytest.approx(0.0, abs=1e-9) and res["explained_variance"] == pytest.approx(1.0)
    assert res["l0"] == pytest.approx(64, abs=0.5)  # every dimension nonzero on one of its two latents
    assert res["dead_frac"] == 0.0 and res["ce_score"] == pytest.approx(1.0, abs=1e-5)
    expected = {"l0", "fvu", "explained_variance", "dead_frac", "dense_frac", "ce_loss_clean", "ce_loss_spliced",
                "ce_loss_ablated", "ce_score", "kl_score", "ablation", "site"}
    assert expected <= set(res)
    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune"] * 8
    res = evaluate(identity_sae(64), model, texts, n_ctx=16, n_contexts=3)
    assert res["n_contexts"] == 3 and res["n_tokens_scored"] == 3 * 15


def test_cli_eval_prints_json_and_writes_eval_json(model, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    import probe.models
    from app.commands_saes import register

    monkeypatch.setattr(probe.models, "load_model", lambda name, device=None, dtype=None: model)
    corpus = tmp_path / "held_out.txt"
    corpus.write_text("She walked into the room and said nothing at all for a long while. " * 40)
    sae = identity_sae(64)
    sae.cfg.model = "tiny"
    sae.save(tmp_path / "sae")
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["eval", str(tmp_path / "sae"), "--corpus", str(corpus), "--n-ctx", "32",
                                   "--n-contexts", "4", "--ablation", "mean", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.output)
    assert printed == json.loads((tmp_path / "sae" / "eval.json").read_text())
    assert printed["ablation"] == "mean" and printed["ce_score"] == pytest.approx(1.0, abs=1e-5)
    assert load_dictionary(tmp_path / "sae").cfg.model == "tiny"
