"""Patching prompts of different lengths: a padded batch gives, row by row, what each pair gives alone."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from probe.errors import SteerscopeError
from steering.das import interchange_accuracy, train_das
from steering.illusion import illusion_diagnostics
from steering.padding import Padded, columns, end_aligned, pad_prompts, position_labels
from steering.patching import Patch, logit_diff, metric_range, patching_grid, run_patch

SITE = "blocks.1.hook_resid_pre"
# base and source of one pair differ in length too (rows 1 and 2)
BASE = ["Mr. Darcy came in and", "She said", "The weather at Bath was fine, and"]
SOURCE = ["Mrs. Darcy came in and", "He said that it", "The weather at Bath"]


def last(logits):
    return logits[:, -1]


@pytest.fixture(params=["dense", "moe"])
def model(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def alone(model, p, i, metric=last):
    """The pair i patched as a batch of one, from plain (unpadded) token tensors."""
    return run_patch(model, p, model.to_tokens(BASE[i]), model.to_tokens(SOURCE[i]), metric)


def test_layout_is_right_padded_with_real_lengths(tiny_dense):
    b = pad_prompts(tiny_dense, BASE)
    lengths = [len(tiny_dense.to_tokens(p)[0]) for p in BASE]
    assert b.lengths.tolist() == lengths and b.width == max(lengths) and b.padded
    for r, n in enumerate(lengths):
        assert torch.equal(b.tokens[r, :n], tiny_dense.to_tokens(BASE[r])[0])
        assert bool((b.tokens[r, n:] == b.pad_id).all())
    assert columns(b.lengths, (0, -1)).tolist() == [[0, n - 1] for n in lengths]
    pair = pad_prompts(tiny_dense, BASE[1:2]).widen(8), pad_prompts(tiny_dense, SOURCE[1:2]).widen(8)
    assert position_labels(tiny_dense, *pair, [1, -1]) == ["She/He", " said/ it"]


def test_end_aligned_puts_each_rows_last_token_last():
    logits = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)
    out = end_aligned(logits, torch.tensor([4, 2]))
    assert out[:, -1, 0].tolist() == [3.0, 5.0] and out[:, -2, 0].tolist() == [2.0, 4.0]
    assert end_aligned(logits, torch.tensor([4, 4])) is logits


@pytest.mark.parametrize("make", [
    lambda d: Patch.full(SITE, -1),
    lambda d: Patch.full(SITE, 1),  # from the start: the title token
    lambda d: Patch.direction(SITE, torch.randn(d, generator=torch.Generator().manual_seed(0)), [-2, -1]),
    lambda d: Patch.full("blocks.0.hook_mlp_out", [0, -1]),
])
def test_padded_batch_equals_each_pair_alone(model, make):
    p = make(model.cfg.d_model)
    batched = run_patch(model, p, BASE, SOURCE, last)  # [3, vocab], read at each prompt's own last token
    for i in range(len(BASE)):
        assert_close(batched[i:i + 1], alone(model, p, i), atol=1e-5, rtol=1e-5)
    # the metric of the batch is the mean of the metrics alone
    metric = logit_diff(5, 7)
    each = [float(alone(model, p, i, metric)) for i in range(len(BASE))]
    assert_close(torch.tensor(float(run_patch(model, p, BASE, SOURCE, metric))), torch.tensor(each).mean(),
                 atol=1e-5, rtol=1e-5)
    m_base, m_src = metric_range(model, BASE, SOURCE, metric)
    with torch.no_grad():
        alone_base = torch.tensor([float(metric(model(model.to_tokens(b)))) for b in BASE])
        alone_src = torch.tensor([float(metric(model(model.to_tokens(s)))) for s in SOURCE])
    assert_close(torch.tensor([m_base, m_src]), torch.stack([alone_base.mean(), alone_src.mean()]), atol=1e-5,
                 rtol=1e-5)


def test_das_and_iia_on_padded_batches(tiny_dense):
    expected = torch.tensor([5, 6, 7])
    p = Patch.direction(SITE, torch.randn(64, generator=torch.Generator().manual_seed(1)), -1)
    each = []
    for i in range(3):
        each.append(interchange_accuracy(tiny_dense, p, tiny_dense.to_tokens(BASE[i]), tiny_dense.to_tokens(SOURCE[i]),
                                         expected[i:i + 1]))
    assert interchange_accuracy(tiny_dense, p, BASE, SOURCE, expected) == pytest.approx(sum(each) / 3)
    res = train_das(tiny_dense, BASE, SOURCE, expected, SITE, position=-1, steps=3, test=(BASE[:1], SOURCE[:1],
                                                                                            expected[:1]))
    assert res.n_train == 3 and res.n_test == 1 and res.test_iia is not None


def test_grid_on_padded_batch_counts_positions_from_the_end(tiny_dense):
    grid = patching_grid(tiny_dense, BASE, SOURCE, [SITE], logit_diff(5, 7))
    shortest = min(len(tiny_dense.to_tokens(p)[0]) for p in BASE + SOURCE)
    assert grid.positions == list(range(-shortest, 0))
    direct = float(run_patch(tiny_dense, Patch.full(SITE, -1), BASE, SOURCE, logit_diff(5, 7)))
    gap = grid.metric_source - grid.metric_base
    assert float(grid.effects[0, -1]) == pytest.approx((direct - grid.metric_base) / gap, rel=1e-5)


def test_padded_bad_inputs(tiny_dense):
    with pytest.raises(SteerscopeError, match="as many tokens as its source"):
        run_patch(tiny_dense, Patch.full(SITE), BASE, SOURCE)  # every position, but lengths differ
    with pytest.raises(SteerscopeError, match="3 base prompts but 2 source prompts"):
        run_patch(tiny_dense, Patch.full(SITE, -1), BASE, SOURCE[:2])
    with pytest.raises(SteerscopeError, match="out of range for a prompt of 3 tokens"):
        run_patch(tiny_dense, Patch.full(SITE, 4), BASE, SOURCE)  # " She said" has 3 tokens with BOS
    with pytest.raises(SteerscopeError, match="out of range"):
        train_das(tiny_dense, BASE, SOURCE, torch.tensor([5, 6, 7]), SITE, position=-4, steps=1)
    with pytest.raises(SteerscopeError, match="lengths must be"):
        Padded(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3]))
    with pytest.raises(SteerscopeError, match="between 1 and the width"):
        Padded(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 4]))
    with pytest.raises(SteerscopeError, match="as many tokens as its source"):
        illusion_diagnostics(tiny_dense, BASE, SOURCE, "blocks.0.mlp.hook_post", torch.randn(128), logit_diff(5, 7))
