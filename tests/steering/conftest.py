"""Fixtures shared by the steering tests."""

from __future__ import annotations

import pytest
import torch

from probe.models import build_model
from probe.zoo.specs import MODEL_SPECS

NOISY_TINY = {**MODEL_SPECS["austen-dense"], "n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}


@pytest.fixture(scope="session")
def noisy_tiny_dense():
    """austen-dense shrunk to 2 layers of width 64 with its weight matrices redrawn at sd 0.25, so that
    next-token distributions are far from uniform and steering effects are large enough to measure."""
    torch.manual_seed(0)
    m = build_model(NOISY_TINY, "probe/zoo/tokenizer.json")
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.25)
    return m.eval()
