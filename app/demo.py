"""The main job, end to end on the bundled model: model -> activations on disk -> printed summary.

Later stages (dictionary, feature store, dashboard) hook in here as they land.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

DEMO_SITES = "blocks.*.hook_resid_post"


def run_demo(out: Path, n_tokens: int = 100_000, model_name: str = "austen-dense") -> dict:
    from probe.models import load_model
    from probe.store import ActivationStore
    from probe.zoo import card

    console = Console()
    model = load_model(model_name, device="cpu")
    c = card(model_name)
    console.print(f"[bold]{model_name}[/bold]: {c['n_params'] / 1e6:.1f} M params, val loss {c['val_loss']:.3f} "
                  f"nats/token (bigram baseline {c['bigram_val_loss']:.3f})")
    torch.manual_seed(0)
    sample = model.generate("It is a truth universally acknowledged", max_new_tokens=30, temperature=0.8, verbose=False)
    console.print(f"sample: {sample!r}")
    t0 = time.time()
    store = ActivationStore.build(model, "austen", DEMO_SITES, n_tokens, out / "acts", corpus_spec="austen")
    dt = time.time() - t0
    store.verify()
    table = Table(title=f"activations in {out / 'acts'} ({n_tokens:,} tokens/site, {dt:.1f} s)")
    for col in ("site", "d", "rows", "mean |x|", "std |x|", "max |x|"):
        table.add_column(col)
    stats = {}
    for site in store.sites:
        norms = torch.cat([b.float().norm(dim=-1) for b in store.batches(site, 8192, shuffle=False)])
        stats[site] = dict(mean=float(norms.mean()), std=float(norms.std()), max=float(norms.max()))
        table.add_row(site, str(store.d(site)), f"{len(norms):,}", *(f"{stats[site][k]:.2f}" for k in ("mean", "std", "max")))
    console.print(table)
    return {"store": str(out / "acts"), "seconds": dt, "norms": stats}
