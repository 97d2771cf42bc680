"""The bundled models load offline and their cards tell the truth."""

import json

import pytest
import torch

from probe.models import load_model
from probe.zoo import ZOO_DIR, ZOO_NAMES, card
from probe.zoo.train import evaluate_loss, expert_loads, load_tokens

REQUIRED = {"data", "tokens_seen", "steps", "hyperparameters", "hardware", "wall_time_s", "val_loss",
            "val_loss_subset", "bigram_val_loss", "samples", "n_params"}


@pytest.fixture(scope="module")
def val_tokens():
    return load_tokens("val")


def test_weights_fit_the_budget():
    total = sum((ZOO_DIR / n / "model.safetensors").stat().st_size for n in ZOO_NAMES)
    assert total <= 40 * 2**20


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_card_complete(name):
    c = card(name)
    assert REQUIRED <= set(c)
    assert len(c["samples"]) == 5 and all(s["greedy"] and s["sampled"] for s in c["samples"])
    assert json.loads((ZOO_DIR / name / "config.json").read_text())["model_name"] == name


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_val_loss_matches_card(name, val_tokens):
    torch.manual_seed(0)
    model = load_model(name, device="cpu")
    loss = evaluate_loss(model, val_tokens[:32])
    assert abs(loss - card(name)["val_loss_subset"]) <= 0.02
    assert loss < card(name)["bigram_val_loss"]  # the model beats the baseline it reports


def test_every_expert_carries_load(val_tokens):
    model = load_model("austen-moe", device="cpu")
    loads = torch.tensor(expert_loads(model, val_tokens[:32]))
    assert loads.shape == (model.cfg.n_layers, model.cfg.num_experts)
    torch.testing.assert_close(loads.sum(1), torch.ones(model.cfg.n_layers), atol=1e-5, rtol=0)
    assert float(loads.min()) >= 0.02
