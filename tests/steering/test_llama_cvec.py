"""The exported control vector steers llama.cpp exactly as steerscope (bench/llama_cvec.py; needs the bench extra)."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the bench extra: pip install -e '.[bench]'")
pytestmark = pytest.mark.slow


def test_llama_cpp_applies_direction_L_at_blocks_L_resid_post(tmp_path):
    from bench.llama_cvec import run

    res = run(layer=12, coeff=4.0, n_prompts=10, top=50, work=tmp_path)
    assert res["n_prompts"] >= 10
    assert res["corr_same_layer"] >= 0.999, res
    assert max(res["corr_layer_-1"], res["corr_layer_+1"]) < 0.95, res  # one layer off is clearly worse
