"""Prompts of different lengths in one patching batch: right padding, per-row positions, end-aligned logits.

Layout. Row r holds its real tokens in columns ``0 .. L_r - 1`` (BOS in column 0) and pad tokens after them
(``probe.tokens.pad_id``). No attention mask is needed: attention is causal, so a real token never sees
the pads that follow it, and its absolute or rotary position is the one it has when the prompt runs alone.
So every real position of a padded batch computes exactly what the prompt alone computes.

Positions (``Patch.positions``, DAS ``position``): ``p >= 0`` is the p-th token from the start of every row
(BOS = 0); ``p < 0`` counts back from each row's last real token (-1 = the last real token). A base and its
source may differ in length: the patch takes the source's p-th token into the base's p-th token, so with
negative positions the ends line up ("the last token", "the token before the last"). ``positions=None``
(every position) needs each base to have as many tokens as its source.

Metrics read **end-aligned** logits: row r shifted right by ``T - L_r`` so that column -1 is its last real
token and column -k its k-th from last (the first ``T - L_r`` columns hold that row's pad logits, never read
by a metric that uses negative columns). Without padding this is the logits unchanged. So ``logit_diff``'s
default ``position=-1`` reads each prompt's own last token; read padded batches only at negative columns.

Tensor inputs are taken as they are, every column a real token; pass ``Padded(tokens, lengths)`` for a
batch that is already padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from probe.errors import SteerscopeError


@dataclass(frozen=True)
class Padded:
    """Right-padded token ids [B, T] and each row's number of real tokens (BOS included)."""

    tokens: Tensor
    lengths: Tensor
    pad_id: int = 0

    def __post_init__(self):
        t, n = self.tokens, torch.as_tensor(self.lengths)
        if not isinstance(t, Tensor) or t.ndim != 2 or t.is_floating_point() or t.numel() == 0:
            raise SteerscopeError(f"tokens must be a non-empty integer tensor [batch, pos], got {getattr(t, 'shape', t)!r}")
        if n.ndim != 1 or n.shape[0] != t.shape[0] or n.is_floating_point():
            raise SteerscopeError(f"lengths must be {t.shape[0]} integers (one per row), got shape {tuple(n.shape)}")
        n = n.long().to(t.device)
        if bool((n < 1).any()) or bool((n > t.shape[1]).any()):
            raise SteerscopeError(f"every length must be between 1 and the width {t.shape[1]}, got {n.tolist()}")
        object.__setattr__(self, "lengths", n)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def padded(self) -> bool:
        """True when some row is shorter than the width."""
        return bool((self.lengths < self.width).any())

    def __getitem__(self, rows) -> Padded:
        """The rows ``rows`` (an index, slice, list or tensor), cut to their longest row."""
        idx = torch.as_tensor(rows, dtype=torch.long) if not isinstance(rows, slice) else rows
        tokens, lengths = self.tokens[idx], self.lengths[idx]
        if tokens.ndim == 1:
            tokens, lengths = tokens[None], lengths[None]
        if tokens.shape[0] == 0:
            raise SteerscopeError("no rows selected")
        return Padded(tokens[:, : int(lengths.max())], lengths, self.pad_id)

    def widen(self, width: int) -> Padded:
        """The same rows with pad columns appended up to ``width``."""
        if width <= self.width:
            return self
        extra = self.tokens.new_full((len(self), width - self.width), self.pad_id)
        return Padded(torch.cat([self.tokens, extra], 1), self.lengths, self.pad_id)


def pad_prompts(model, prompts: str | Sequence[str]) -> Padded:
    """Tokenize prompts (the model's convention, :mod:`probe.tokens`) and right-pad them into one batch."""
    from probe.tokens import encode_all, pad, pad_id

    tokens, lengths = pad(model, encode_all(model, prompts), "right")
    return Padded(tokens, lengths, pad_id(model))


def as_padded(model, x) -> Padded:
    """A ``Padded`` batch from a string, a list of strings, a ``Padded`` or an integer tensor [batch, pos]."""
    if isinstance(x, Padded):
        return x
    if isinstance(x, str | list | tuple):
        if not len(x):
            raise SteerscopeError("empty prompt list: give at least one prompt")
        return pad_prompts(model, list(x) if not isinstance(x, str) else [x])
    if not isinstance(x, Tensor) or x.ndim != 2 or x.is_floating_point() or x.numel() == 0:
        raise SteerscopeError(f"tokens must be a non-empty integer tensor [batch, pos], got {getattr(x, 'shape', x)!r}")
    return Padded(x, torch.full((x.shape[0],), x.shape[1], dtype=torch.long))


def pair(model, base, source) -> tuple[Padded, Padded]:
    """Base and source batches with one row per pair, widened to one width (lengths may differ)."""
    base, source = as_padded(model, base), as_padded(model, source)
    if len(base) != len(source):
        raise SteerscopeError(f"{len(base)} base prompts but {len(source)} source prompts: pair each base with one "
                              "source")
    width = max(base.width, source.width)
    return base.widen(width), source.widen(width)


def columns(lengths: Tensor, positions: Sequence[int]) -> Tensor:
    """Per-row columns [B, P] of ``positions`` (p >= 0 from the start, p < 0 from each row's end); checked."""
    pos = torch.as_tensor(list(positions), dtype=torch.long, device=lengths.device)
    cols = torch.where(pos[None, :] >= 0, pos[None, :], lengths[:, None] + pos[None, :])
    bad = (cols < 0) | (cols >= lengths[:, None])
    if bool(bad.any()):
        short = int(lengths[bad.any(1)].min())
        raise SteerscopeError(f"positions {list(positions)} out of range for a prompt of {short} tokens "
                              "(BOS included; negative positions count from the last token)")
    return cols


def end_aligned(logits: Tensor, lengths: Tensor) -> Tensor:
    """Logits [B, T, ...] with row r shifted right by ``T - L_r``: column -1 is each row's last real token."""
    B, T = logits.shape[:2]
    lengths = lengths.to(logits.device)
    if bool((lengths == T).all()):
        return logits
    idx = (torch.arange(T, device=logits.device)[None, :] + lengths[:, None]) % T  # [B, T]
    return logits.gather(1, idx.view(B, T, *([1] * (logits.ndim - 2))).expand_as(logits))


def default_positions(base: Padded, source: Padded) -> list[int]:
    """Grid positions: every column when all prompts have one length, else the shortest prompt's length
    counted from the end (-L .. -1), so that each cell is the same token offset from every prompt's end."""
    lengths = torch.cat([base.lengths, source.lengths])
    if bool((lengths == base.width).all()):
        return list(range(base.width))
    return list(range(-int(lengths.min()), 0))


def position_labels(model, base: Padded, source: Padded, positions: Sequence[int]) -> list[str]:
    """The first pair's tokens at ``positions``: "tok" where base and source agree, else "base/source"."""
    b_cols, s_cols = columns(base.lengths[:1], positions)[0], columns(source.lengths[:1], positions)[0]
    b = [model.to_single_str_token(int(base.tokens[0, c])) for c in b_cols.tolist()]
    s = [model.to_single_str_token(int(source.tokens[0, c])) for c in s_cols.tolist()]
    return [x if x == y else f"{x}/{y}" for x, y in zip(b, s, strict=True)]
