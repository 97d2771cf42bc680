"""bench/heads.py: the IOI prompts it builds and the whole comparison at a tiny size (so the script does not rot)."""

from __future__ import annotations

import json

from bench.heads import ioi_prompts, run, single_token_names
from probe.tokens import encode


def test_ioi_prompts_pair_a_repeated_subject_with_a_third_name(tiny_dense):
    names = single_token_names(tiny_dense, ["Mary", "John", "Tom", "Supercalifragilistic"])
    assert "Supercalifragilistic" not in names and len(names) >= 3
    p = ioi_prompts(tiny_dense, 6, seed=1)
    for pos, neg, io, s in zip(p["positive"], p["negative"], p["io"], p["s"], strict=True):
        assert len(encode(tiny_dense, pos)) == len(encode(tiny_dense, neg))
        io_name, s_name = tiny_dense.tokenizer.decode([int(io)]).strip(), tiny_dense.tokenizer.decode([int(s)]).strip()
        assert pos.count(s_name) == 2 and pos.count(io_name) == 1  # S repeats, IO does not
        assert neg.count(s_name) == 1 and neg.count(io_name) == 1  # the repeat became a third name
        assert pos.rsplit(s_name, 1)[0] == neg[: len(pos.rsplit(s_name, 1)[0])]  # identical up to the repeat


def test_run_at_tiny_size(tiny_dense):
    res = run(tiny_dense, n_prompts=6, n_train=2, d_sae=16, top=3, seeds=2, epochs=20)
    json.dumps(res)
    assert res["n_layers"] == 2 and res["n_heads"] == 4 and len(res["patching"]["truth"]) == 3
    assert res["patching"]["forward_passes"] == 2 * 4 + 2
    assert len(res["sae"]["runs"]) == 2 and all(0 <= r["auc"] <= 1 for r in res["sae"]["runs"])
    assert 0 <= res["shuffled_labels"]["auc"]["median"] <= 1
    assert set(res["task"]) == {"positive", "negative"}


def test_a_reference_run_is_reused_only_for_the_same_prompts(tiny_dense):
    import pytest

    from probe.errors import SteerscopeError

    first = run(tiny_dense, n_prompts=6, n_train=2, d_sae=16, top=3, seeds=1, epochs=20)
    again = run(tiny_dense, n_prompts=6, n_train=2, d_sae=16, top=3, seeds=1, epochs=20, position="last",
                reference=json.loads(json.dumps(first)))
    assert again["patching"]["reused"] and [tuple(h) for h in again["patching"]["truth"]] == \
        [tuple(h) for h in first["patching"]["truth"]]
    assert again["sae"]["position"] == "last"
    with pytest.raises(SteerscopeError, match="other prompts"):
        run(tiny_dense, n_prompts=5, n_train=2, d_sae=16, top=3, seeds=1, epochs=20, reference=first)
