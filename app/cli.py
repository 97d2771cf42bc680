"""The ``steerscope`` command line (typer). Errors a user can fix print one line and exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from probe.errors import SteerscopeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=(
    "steerscope: cache activations, train dictionaries, steer models. Everything works offline "
    "on the bundled Austen models."))
zoo_app = typer.Typer(no_args_is_help=True, help="The bundled models: list, inspect, (re)train.")
corpus_app = typer.Typer(no_args_is_help=True, help="Text corpora: the bundled Austen novels, hf:<dataset>, local files.")
cache_app = typer.Typer(no_args_is_help=True, help="Activation stores: build (resumable), inspect, verify.")
app.add_typer(zoo_app, name="zoo")
app.add_typer(corpus_app, name="corpus")
app.add_typer(cache_app, name="cache")


def _register_commands() -> None:
    from app import commands_app, commands_circuits, commands_patch, commands_saes, commands_steer

    commands_saes.register(app)
    commands_steer.register(app)
    commands_patch.register(app)
    commands_app.register(app)
    commands_circuits.register(app)


_register_commands()


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------ zoo
@zoo_app.command("list")
def zoo_list() -> None:
    """List the bundled models and whether their weights are present."""
    from probe.zoo import ZOO_NAMES, available, card

    have = set(available())
    for name in ZOO_NAMES:
        if name in have:
            c = card(name)
            typer.echo(f"{name:14s} {c['n_params'] / 1e6:5.1f} M params  val loss {c['val_loss']:.3f} "
                       f"(bigram {c['bigram_val_loss']:.3f})  {c['tokens_seen'] / 1e6:.1f} M tokens")
        else:
            typer.echo(f"{name:14s} (no weights: steerscope zoo train {name})")


@zoo_app.command("info")
def zoo_info(name: str = typer.Argument(..., help="zoo model name, e.g. austen-dense")) -> None:
    """Print a model's card: data, training, val loss, bigram baseline, expert loads, samples."""
    from probe.errors import suggest
    from probe.zoo import ZOO_NAMES, available, card

    if name not in ZOO_NAMES:
        raise SteerscopeError(f"unknown zoo model {name!r}.{suggest(name, ZOO_NAMES)}")
    if name not in available():
        raise SteerscopeError(f"zoo model {name!r} has no weights yet; train it with: steerscope zoo train {name}")
    c = card(name)
    c.pop("history", None)
    _echo_json(c)


@zoo_app.command("train")
def zoo_train(
    name: str = typer.Argument(..., help="austen-dense or austen-moe"),
    tokens: int = typer.Option(2_500_000, help="training tokens (batch 16 x 256 per step)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch default)"),
) -> None:
    """Train a bundled model from scratch on the Austen train split and write probe/zoo/NAME/."""
    import torch

    from probe.errors import suggest
    from probe.zoo.specs import MODEL_SPECS
    from probe.zoo.train import train_model

    if name not in MODEL_SPECS:
        raise SteerscopeError(f"unknown zoo model {name!r}.{suggest(name, MODEL_SPECS)}")
    if threads:
        torch.set_num_threads(threads)
    c = train_model(name, tokens, device=device)
    _echo_json({k: c[k] for k in ("val_loss", "bigram_val_loss", "tokens_seen", "wall_time_s", "expert_loads")})


# ------------------------------------------------------------------ corpus
@corpus_app.command("info")
def corpus_info(spec: str = typer.Argument("austen", help="'austen', 'hf:<dataset>[:split]', or a path/glob")) -> None:
    """Documents and characters per split."""
    from probe.corpus import load_corpus

    splits = ("train", "val", "test") if spec == "austen" else ("all",)
    for split in splits:
        docs = load_corpus(spec, split)
        typer.echo(f"{split:6s} {len(docs):6d} documents {sum(map(len, docs)):10,d} characters")


# ------------------------------------------------------------------ cache
@cache_app.command("build")
def cache_build(
    path: Path = typer.Argument(..., help="output directory of the store"),
    model: str = typer.Option("austen-dense", help="zoo name, TL name or local HF dir"),
    sites: list[str] = typer.Option(["blocks.2.hook_resid_post"], "--site", help="hook name or glob; repeatable"),
    corpus: str = typer.Option("austen", help="corpus spec (train split)"),
    n_tokens: int = typer.Option(200_000, help="activation rows to store per site"),
    dtype: str = typer.Option("float32", help="storage dtype: float32, float16 or bfloat16"),
    overwrite: bool = typer.Option(False, help="replace an existing store with a different manifest"),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
) -> None:
    """Run the model over a corpus and write activations to disk (resumes an interrupted build)."""
    from probe.models import load_model
    from probe.store import ActivationStore

    m = load_model(model, device=device)
    store = ActivationStore.build(m, corpus, sites, n_tokens, path, dtype=dtype, overwrite=overwrite, corpus_spec=corpus)
    _echo_json(store.summary())


@cache_app.command("info")
def cache_info(path: Path = typer.Argument(..., help="store directory")) -> None:
    """Print a store's manifest summary."""
    from probe.store import ActivationStore

    _echo_json(ActivationStore.open(path).summary())


@cache_app.command("verify")
def cache_verify(path: Path = typer.Argument(..., help="store directory")) -> None:
    """Check every shard's sha256 against the manifest."""
    from probe.store import ActivationStore

    store = ActivationStore.open(path)
    store.verify()
    typer.echo(f"ok: {len(store.manifest['shards'])} shards verified")


# ------------------------------------------------------------------ demo
@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="where the demo writes (and later reuses) its artifacts"),
    n_tokens: int = typer.Option(100_000, help="activation rows to cache for the SAE"),
    d_sae: int = typer.Option(4096, help="SAE latents"),
    k: int = typer.Option(32, help="active latents per token"),
    serve: bool = typer.Option(True, help="serve the dashboard at the end (--no-serve stops after the feature store)"),
    port: int = typer.Option(8501, help="dashboard port"),
    model: str = typer.Option("austen-dense", help="model (austen-moe: the MoE model, for the Experts page; "
                              "smollm2-135m-instruct: the real pretrained model)"),
    site: str = typer.Option(None, help="hook the SAE reads (default: blocks.2.hook_resid_post on the Austen models, "
                             "the middle layer's hook_resid_post otherwise)"),
    transcoders: bool = typer.Option(None, "--transcoders/--no-transcoders",
                                     help="also train a transcoder per layer for the Circuit page (default: on "
                                          "austen-dense, a few minutes; off elsewhere: SmolLM2's 30 layers take ~an hour)"),
    tc_tokens: int = typer.Option(200_000, help="training tokens per layer's transcoder"),
) -> None:
    """The main job on the bundled model: cache activations, train a TopK SAE, evaluate it,
    build the feature store, train per-layer transcoders, serve the dashboard on 127.0.0.1. Stages whose
    artifacts exist are reused."""
    from app.demo import run_demo

    summary = run_demo(out, n_tokens, d_sae=d_sae, k=k, serve=serve, port=port, model_name=model, site=site,
                       transcoders=transcoders, tc_tokens=tc_tokens)
    _echo_json(summary)


def main() -> None:
    try:
        app()
    except SteerscopeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
