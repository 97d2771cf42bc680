"""The main job, end to end on the bundled model, reusing whatever already exists under ``out``:

model -> activations on disk -> TopK SAE -> evaluation -> feature store -> per-layer transcoders -> dashboard.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEMO_SITE = "blocks.2.hook_resid_post"
MODEL = "austen-dense"


def run_demo(out: Path, n_tokens: int = 100_000, d_sae: int = 4096, k: int = 32, serve: bool = True,
             port: int = 8501, host: str = "127.0.0.1", model_name: str = MODEL, site: str | None = None,
             transcoders: bool | None = None, tc_tokens: int = 200_000) -> dict:
    """Run every stage (each skipped when its artifact is already there) and serve the app."""
    from probe.models import load_model
    from probe.sites import resolve_one
    from probe.zoo import card

    console = Console(stderr=True)
    out = Path(out)
    from steering import generate

    model = load_model(model_name, device="cpu")
    if site is None:  # the Austen models' tested site, else the middle of the model
        site = DEMO_SITE if model_name in ("austen-dense", "austen-moe") else \
            f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
    site = resolve_one(model, site)
    console.rule(f"[bold]steerscope demo[/bold]: {model_name}")
    c = card(model_name) if model_name in ("austen-dense", "austen-moe") else None
    if c is not None:
        console.print(f"{c['n_params'] / 1e6:.1f} M params, val loss {c['val_loss']:.3f} nats/token "
                      f"(bigram baseline {c['bigram_val_loss']:.3f}); artifacts in {out}")
    console.print("sample:", repr(generate(model, "It is a truth universally acknowledged", max_new_tokens=25,
                                            do_sample=True, temperature=0.8, seed=0)))
    store = _stage(console, "1/6 cache activations", lambda: _cache(model, out / "acts", site, n_tokens))
    sae = _stage(console, "2/6 train a TopK SAE", lambda: _train(store, out / "sae", site, d_sae, k, model_name))
    metrics = _stage(console, "3/6 evaluate it", lambda: _evaluate(sae, model, out / "sae", site))
    _print_metrics(console, metrics, site)
    meta = _stage(console, "4/6 build the feature store",
                  lambda: _features(sae, model, store, out / "features", model_name))
    if transcoders is None:  # every layer's transcoder: minutes on the Austen models, about an hour on SmolLM2
        transcoders = model_name in ("austen-dense", "austen-moe") and getattr(model.cfg, "num_experts", None) is None
    tc_dir = None
    if transcoders:
        tc_dir = out / "transcoders"
        _stage(console, "5/6 train a transcoder per layer, and a feature store for each (for the Circuit page)",
               lambda: _transcoders(model, tc_dir, tc_tokens, model_name, store))
    summary = {"store": str(out / "acts"), "dictionary": str(out / "sae"), "features": str(out / "features"),
               "transcoders": str(tc_dir) if tc_dir else None, "metrics": metrics, "n_features": meta.get("d_sae")}
    if serve:
        console.rule("6/6 serve the dashboard")
        from app.commands_app import app_cmd

        app_cmd(store=out / "features", port=port, host=host, dictionary=None, model=None, vectors=None, device="cpu",
                models=None, transcoders=tc_dir)
    return summary


def _stage(console: Console, title: str, fn):
    console.rule(title)
    t0 = time.time()
    result = fn()
    console.print(f"[green]done[/green] in {time.time() - t0:.1f} s")
    return result


def _cache(model, path: Path, site: str, n_tokens: int):
    from probe.store import ActivationStore

    n_ctx = min(model.cfg.n_ctx, 256)  # the Austen models' context; as long on SmolLM2 (its 8192 would be slow)
    store = ActivationStore.build(model, "austen", site, n_tokens, path, n_ctx=n_ctx, batch_size=8, corpus_spec="austen")
    store.verify()
    return store


def _train(store, path: Path, site: str, d_sae: int, k: int, model_name: str):
    from saes.base import load_dictionary
    from saes.train import train

    if (path / "weights.safetensors").exists():
        return load_dictionary(path)
    import warnings

    with warnings.catch_warnings():  # the demo trains a deliberately short run (3 passes) and says so in the README
        warnings.filterwarnings("ignore", message="this run takes only")
        return train("topk", store, site=site, d_sae=d_sae, k=k, n_tokens=3 * len(store), lr=1e-3,
                     out=path, model=model_name, log_every=2)


def _evaluate(sae, model, path: Path, site: str) -> dict:
    from probe.corpus import load_corpus
    from saes.metrics import evaluate

    if (path / "eval.json").exists():
        return json.loads((path / "eval.json").read_text())
    return evaluate(sae, model, load_corpus("austen", split="val"), site=site, n_contexts=32, out=path)


def _features(sae, model, store, path: Path, model_name: str) -> dict:
    from saes.features import build_feature_store

    # the store records the dictionary's directory (sae/, relative to the run directory) and its eval.json
    return build_feature_store(sae, model, store, path, n_tokens=min(len(store), 50_000), model_ref=model_name)


def _transcoders(model, path: Path, n_tokens: int, model_name: str, store):
    """Every layer's transcoder, then a feature store per layer at layer_NN/features (the app finds them there:
    the Feature page of a transcoder store lists the feature's weights-based connections)."""
    import warnings

    from saes.circuits import load_transcoders, train_transcoders
    from saes.features import build_feature_store

    if (path / "transcoders.json").exists():
        tcs = load_transcoders(path)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="this run takes only")
            tcs = train_transcoders(model, "austen", path, n_tokens=n_tokens, d_sae=2048, k=16, batch_size=256,
                                    n_ctx=min(model.cfg.n_ctx, 256), resume=(path / "layer_00").exists(),
                                    corpus_spec="austen")
    for layer in tcs.layers:  # the model runs on the cached store's contexts (its site is another one)
        d = path / f"layer_{layer:02d}"
        build_feature_store(d, model, store, d / "features", n_tokens=min(len(store), 50_000), model_ref=model_name)
    return tcs


def _print_metrics(console: Console, m: dict, site: str) -> None:
    table = Table(title=f"TopK SAE at {site} (held-out Austen)")
    for key in ("l0", "fvu", "explained_variance", "dead_frac", "ce_score", "kl_score"):
        if key in m:
            table.add_row(key, f"{m[key]:.4f}" if isinstance(m[key], float) else str(m[key]))
    console.print(table)
