"""Forward passes that stop as early as the sites asked for allow (caching, streaming transcoder training)."""

from __future__ import annotations

import torch

from probe.sites import all_sites, layer_of


def stop_layer(model, names: list[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every requested site (``None``: the whole model)."""
    order = all_sites(model)
    first_block = next((i for i, n in enumerate(order) if layer_of(n) is not None), len(order))
    stops = []
    for name in names:
        layer = layer_of(name)
        if layer is None and order.index(name) > first_block:
            return None  # e.g. ln_final: needs every block
        stops.append(0 if layer is None else layer + 1)
    return max(stops)


def forward_to(model, batch: torch.Tensor, stop: int | None) -> None:
    kw = {"attention_mask": torch.ones_like(batch)} if getattr(model.tokenizer, "padding_side", "") == "left" else {}
    if stop is None:
        model(batch, return_type=None, **kw)
    else:
        model(batch, stop_at_layer=stop, **kw)
