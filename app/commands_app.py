"""``steerscope features`` and ``steerscope app``; :func:`register` adds them to the CLI.

Errors a user can fix are raised as ``SteerscopeError``; ``app.cli.main`` prints them in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer

from probe.errors import SteerscopeError

DASHBOARD = Path(__file__).resolve().parent / "dashboard.py"
# Page scripts live in app/views/ (not app/pages/, which Streamlit would auto-discover and serve
# directly, bypassing st.navigation, to a first visit that is a deep link).


def register(app: typer.Typer) -> None:
    """Add the feature-store and dashboard commands to ``app``."""
    app.command("features")(features_cmd)
    app.command("app")(app_cmd)


def features_cmd(
    dictionary: Path = typer.Argument(..., help="dictionary directory (cfg.json + weights.safetensors)"),
    out: Path = typer.Option(None, help="feature store directory (default: DICTIONARY/features)"),
    model: str = typer.Option(None, help="model name or directory (default: the one in the dictionary's cfg.json)"),
    corpus: str = typer.Option("austen", help="corpus spec ('austen', 'hf:<dataset>', files) for the examples"),
    store: Path = typer.Option(None, help="an activation store to read instead of running the model on --corpus"),
    n_tokens: int = typer.Option(200_000, help="tokens to scan"),
    n_ctx: int = typer.Option(128, help="tokens per context (BOS first) when packing --corpus"),
    n_examples: int = typer.Option(20, help="top examples per feature"),
    n_intervals: int = typer.Option(10, help="equal-width activation intervals per feature"),
    per_interval: int = typer.Option(5, help="examples sampled per interval"),
    batch_contexts: int = typer.Option(16, help="contexts per forward pass"),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace another feature store in OUT"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Build the feature store of a dictionary (statistics, examples, logit effects, neighbours); prints its summary."""
    from app.commands_saes import dictionary_and_model
    from saes.features import build_feature_store

    d, m = dictionary_and_model(dictionary, model, device)
    name, device = model or d.cfg.model, str(m.cfg.device)
    data = corpus
    if store is not None:
        from probe.store import ActivationStore

        data = ActivationStore.open(store)
    out = out or dictionary / "features"
    meta = build_feature_store(dictionary, m, data, out, n_tokens=n_tokens, n_ctx=n_ctx,
                               n_examples=n_examples, n_intervals=n_intervals, per_interval=per_interval,
                               batch_contexts=batch_contexts, model_ref=name, device=device, overwrite=overwrite,
                               progress=progress)
    typer.echo(json.dumps({"out": str(out), "features": meta["d_sae"], "site": meta["site"], "n_tokens": meta["n_tokens"],
                           **meta["build"]}, indent=2))
    typer.echo(f"open it with: steerscope app --store {out}", err=True)


def app_cmd(
    store: Path = typer.Option(..., "--store", help="feature store directory (steerscope features)"),
    port: int = typer.Option(8501, help="port to serve on"),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes the app to your network"),
    dictionary: Path = typer.Option(None, help="dictionary directory (default: the one the store records)"),
    model: str = typer.Option(None, help="model for the live pages (default: the one the store records)"),
    vectors: Path = typer.Option(None, help="a directory of saved steering vectors for the Steer page"),
    device: str = typer.Option(None, help="cpu or cuda for the live pages"),
    models: str = typer.Option(None, help="comma-separated extra models the Experts page may offer (beside the "
                               "store's and the bundled ones); pages never take a typed model name or path"),
    transcoders: Path = typer.Option(None, help="per-layer transcoders (steerscope transcoders) for the Circuit page; "
                                     "their layers' feature stores (DIR/layer_NN/features) join the sidebar's store "
                                     "picker"),
) -> None:
    """Serve the dashboard (Streamlit, headless) on http://HOST:PORT."""
    from app.store import FeatureStore

    FeatureStore.open(store)  # fail here, in one line, rather than in the browser
    if transcoders is not None:
        from saes.circuits import load_transcoders

        load_transcoders(transcoders)
    args = [sys.executable, "-m", "app.serve", "run", str(DASHBOARD), "--server.headless", "true",
            "--server.address", host, "--server.port", str(port), "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal", "--theme.primaryColor", "#ea580c",
            "--"]
    for flag, value in (("--store", store), ("--dictionary", dictionary), ("--model", model), ("--vectors", vectors),
                        ("--device", device), ("--models", models), ("--transcoders", transcoders)):
        if value is not None:
            args += [flag, str(Path(value).resolve()) if isinstance(value, Path) else value]
    typer.echo(f"steerscope app: http://{host}:{port}  (Ctrl+C stops it)", err=True)
    try:
        code = subprocess.call(args, env={**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"})
    except KeyboardInterrupt:
        code = 0
    if code:
        raise SteerscopeError(f"streamlit exited with status {code} (is port {port} already in use? try --port)")
