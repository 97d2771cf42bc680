"""``steerscope transcoders`` (a transcoder per layer, one streamed pass) and ``steerscope attribute`` (an
attribution graph through them, in circuit-tracer's JSON); :func:`register` adds them to the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command("transcoders")(transcoders_cmd)
    app.command("attribute")(attribute_cmd)


def transcoders_cmd(
    out: Path = typer.Option(..., "--out", help="directory: one dictionary per layer (layer_NN/) and transcoders.json"),
    model: str = typer.Option("austen-dense", help="zoo name, smollm2-135m-instruct, a .gguf file, TL name or HF dir"),
    corpus: str = typer.Option("austen", help="corpus spec (train split)"),
    n_tokens: int = typer.Option(500_000, help="training tokens per layer (one pass, shared by every layer)"),
    d_sae: int = typer.Option(4096, help="latents per transcoder"),
    k: int = typer.Option(32, help="active latents per token (TopK)"),
    skip: bool = typer.Option(False, "--skip", help="skip transcoders (an extra linear x W_skip path)"),
    layers: str = typer.Option(None, help="comma-separated layers (default: all)"),
    batch_size: int = typer.Option(512, help="rows per training step"),
    n_ctx: int = typer.Option(None, help="context length (default: the model's, at most 1024)"),
    buffer_tokens: int = typer.Option(32768, help="rows per chunk held in memory per site (the stream's shuffle window)"),
    lr: float = typer.Option(None, help="peak learning rate (default 2e-4 / sqrt(d_sae / 16384))"),
    seed: int = typer.Option(0, help="seed of the context order, shuffles and initialisation (layer L uses seed + L)"),
    resume: bool = typer.Option(False, help="continue a killed run from its checkpoints"),
    overwrite: bool = typer.Option(False, help="replace finished transcoders in OUT"),
    checkpoint_minutes: float = typer.Option(10.0, help="wall time between checkpoints of every layer"),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
) -> None:
    """Train a transcoder (MLP input ln2.hook_normalized -> hook_mlp_out) for every layer in one pass over the
    corpus: activations stream through memory and never reach the disk."""
    from probe.models import load_model
    from saes.circuits import train_transcoders

    m = load_model(model, device=device)
    chosen = None if layers is None else [int(x) for x in layers.split(",") if x.strip()]
    tcs = train_transcoders(m, corpus, out, n_tokens=n_tokens, d_sae=d_sae, k=k, skip=skip, layers=chosen,
                            batch_size=batch_size, n_ctx=n_ctx, buffer_tokens=buffer_tokens, lr=lr, seed=seed,
                            resume=resume, overwrite=overwrite, checkpoint_minutes=checkpoint_minutes,
                            device=str(m.cfg.device), corpus_spec=corpus)
    typer.echo(json.dumps({"out": str(out), "layers": tcs.info["layers"]}, indent=2))


def attribute_cmd(
    prompt: str = typer.Argument(..., help="the prompt whose next-token prediction is traced"),
    transcoders: Path = typer.Option(..., "--transcoders", help="directory written by `steerscope transcoders`"),
    out: Path = typer.Option(Path("graph.json"), "--out", help="graph JSON (circuit-tracer's frontend schema)"),
    model: str = typer.Option(None, help="the model (default: the one the transcoders were trained on)"),
    max_n_logits: int = typer.Option(10, help="at most this many target logits"),
    desired_logit_prob: float = typer.Option(0.95, help="...until their cumulative probability reaches this"),
    max_feature_nodes: int = typer.Option(None, help="compute at most this many feature rows, in order of influence "
                                                      "(default: all)"),
    node_threshold: float = typer.Option(0.8, help="pruning: keep nodes holding this share of the influence"),
    edge_threshold: float = typer.Option(0.98, help="pruning: keep edges holding this share of the edge scores"),
    batch_size: int = typer.Option(64, help="target rows per backward pass"),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
) -> None:
    """Build the attribution graph of PROMPT through per-layer transcoders (frozen attention and LayerNorm, error
    nodes, influence pruning) and print its replacement and completeness scores."""
    from probe.models import load_model
    from saes.circuits import load_transcoders
    from saes.circuits.attribution import attribute

    tcs = load_transcoders(transcoders)
    m = load_model(model or tcs.model_name or "austen-dense", device=device)
    g = attribute(m, tcs.to(m.cfg.device), prompt, max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob,
                  max_feature_nodes=max_feature_nodes, batch_size=batch_size)
    data = g.to_json(node_threshold, edge_threshold)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    typer.echo(json.dumps({"out": str(out), "scores": g.scores, "n_features_active": g.n_features,
                           "n_feature_rows": data["metadata"]["info"]["n_feature_rows"],
                           "pruned_nodes": len(data["nodes"]), "pruned_links": len(data["links"]),
                           "top_logits": dict(zip(g.info["logit_strs"], [round(float(p), 4) for p in g.logit_probs],
                                                  strict=True)),
                           "wall_time_s": g.info["wall_time_s"]}, indent=2))
