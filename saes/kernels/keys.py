"""Packed (value, index) sort keys: one int64 per candidate, ordered like "value desc, index asc".

A top-k with deterministic tie-breaking needs a total order on (value, index) pairs. Packing both
into one int64 gives that order to a plain integer `max`/`topk`, on CPU, in torch and in Triton:

    key = monotone_int32(value) * 2**32 + (2**31 - 1 - index)

- ``monotone_int32`` maps the fp32 bit pattern to an int32 with the same order as the floats
  (negative floats get their magnitude bits flipped); ``-0.0`` is first turned into ``+0.0``.
- A larger key means a larger value, or an equal value with a *lower* index.
- Indices must lie in ``[0, 2**31 - 1]``; NaN orders above ``+inf`` (like ``torch.topk``).
- The mapping is exact: ``unpack_keys(pack_keys(v, i)) == (v, i)`` bit for bit (for fp32 ``v``).

Every real key is larger than ``KEY_MIN + 2**20``, so the range ``[KEY_MIN, KEY_MIN + 2**20)``
is free for sentinels ("no candidate").
"""

from __future__ import annotations

import torch
from torch import Tensor

KEY_MIN = -(2**63)
"""Smallest int64: below every packed key. Used as the 'removed / no candidate' sentinel."""

_FLIP = 0x7FFFFFFF
_LOW = 0x7FFFFFFF
_LOW_MASK = 0xFFFFFFFF


def pack_keys(values: Tensor, indices: Tensor) -> Tensor:
    """Pack fp32-representable ``values`` and int ``indices`` (same shape) into int64 sort keys."""
    v = values.to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0: both zeros get one key
    bits = v.view(torch.int32)
    mono = torch.where(bits >= 0, bits, bits ^ _FLIP).to(torch.int64)
    return (mono << 32) + (_LOW - indices.to(torch.int64))


def unpack_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`pack_keys`: ``(values fp32, indices int64)``."""
    mono = (keys >> 32).to(torch.int32)
    bits = torch.where(mono >= 0, mono, mono ^ _FLIP)
    indices = _LOW - (keys & _LOW_MASK)
    return bits.view(torch.float32), indices


def topk_keys(keys: Tensor, k: int) -> Tensor:
    """The ``k`` largest keys of each row, sorted descending (exact: keys are unique per row)."""
    return torch.topk(keys, k, dim=-1, largest=True, sorted=True).values
