"""bench/circuits.py at a tiny size, with and without the uncapped graph (so the script does not rot)."""

from __future__ import annotations

import json
import warnings

from bench.circuits import run
from saes.circuits import train_transcoders

TEXTS = ["Elizabeth walked to Netherfield through the mud and arrived with her petticoat six inches deep."] * 40


def test_run_at_tiny_size(tiny_dense, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        train_transcoders(tiny_dense, TEXTS, tmp_path / "tc", n_tokens=512, d_sae=32, k=4, batch_size=128, n_ctx=16,
                          progress=False)
    full = run(tiny_dense, tmp_path / "tc", n_prompts=2, n_tok=10, n_top=4, cap=16, sub_caps=(8, 64))
    json.dumps(full)
    assert full["n_prompts"] == 2 and full["checks_on"] == "full graph" and full["full_s"]["median"] > 0
    capped = run(tiny_dense, tmp_path / "tc", n_prompts=2, n_tok=10, n_top=4, cap=16, full=False, sub_caps=(8,))
    json.dumps(capped)
    assert capped["full_s"] is None and capped["checks_on"] == "graph capped at 16 rows"
    assert set(capped["sub_caps"]) == {8} and 0 <= capped["sub_caps"][8]["replacement"]["median"] <= 1
