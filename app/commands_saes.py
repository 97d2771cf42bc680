"""``steerscope train``, ``steerscope snmf``, ``steerscope codebook`` and ``steerscope eval``; :func:`register` adds them to the CLI.

Errors a user can fix are raised as ``SteerscopeError``; ``app.cli.main`` prints them in one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from probe.errors import SteerscopeError

# train() arguments a config file may set (besides "store"); flags override the file.
TRAIN_KEYS = ("architecture", "site", "target_site", "d_sae", "k", "n_tokens", "batch_size", "lr", "warmup_steps",
              "decay", "decay_frac", "min_lr_frac", "betas", "grad_clip", "seed", "b_dec_init", "normalize_inputs",
              "scale_batches", "dead_tokens", "max_nonfinite_frac", "out", "checkpoint_every", "checkpoint_minutes",
              "resume", "overwrite", "verify_data", "device", "progress", "wandb", "log_every")


def register(app: typer.Typer) -> None:
    """Add the dictionary commands to ``app``."""
    app.command("train")(train_cmd)
    app.command("snmf")(snmf_cmd)
    app.command("codebook")(codebook_cmd)
    app.command("eval")(eval_cmd)


def _echo_json(obj: Any) -> None:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()}
    typer.echo(json.dumps(clean, indent=2, default=str))


def read_config(path: Path) -> dict[str, Any]:
    """A JSON or YAML file holding one mapping."""
    from probe.corpus import read_text_file

    text = read_text_file(path, "config file")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001  (a parse error of either format is the user's to fix)
        raise SteerscopeError(f"cannot parse {path}: {str(e).splitlines()[0][:200]}") from e
    if not isinstance(data, dict):
        raise SteerscopeError(f"{path} must hold a mapping of train() arguments, got {type(data).__name__}")
    return data


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SteerscopeError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def train_cmd(
    config: Path = typer.Option(None, "--config", help="JSON/YAML mapping of train() arguments and 'store' (other keys "
                                "or an 'arch_kwargs' mapping go to the architecture); flags override it"),
    store: Path = typer.Option(None, help="activation store directory (steerscope cache build)"),
    architecture: str = typer.Option(None, "--architecture", "-a", help="topk, relu, batchtopk, jumprelu, transcoder, ..."),
    site: str = typer.Option(None, help="input site, e.g. blocks.2.hook_resid_post"),
    target_site: str = typer.Option(None, help="target site (transcoders), e.g. blocks.2.hook_mlp_out"),
    d_sae: int = typer.Option(None, help="number of latents"),
    k: int = typer.Option(None, help="active latents per token (TopK family)"),
    n_tokens: int = typer.Option(None, help="training tokens (default: one pass over the store)"),
    batch_size: int = typer.Option(None, help="global batch size (default 4096)"),
    lr: float = typer.Option(None, help="peak learning rate (default 2e-4 / sqrt(d_sae / 16384))"),
    warmup_steps: int = typer.Option(None, help="linear warmup steps (default: 5% of the steps, at most 1000)"),
    decay: str = typer.Option(None, help="linear, cosine or none (default linear)"),
    seed: int = typer.Option(None, help="init and data-order seed (default 0)"),
    b_dec_init: str = typer.Option(None, help="mean, geometric_median or zeros (default mean)"),
    normalize_inputs: bool = typer.Option(None, "--normalize-inputs/--no-normalize-inputs", help="scale inputs (default on)"),
    dead_tokens: int = typer.Option(None, help="tokens without firing before a latent counts as dead"),
    out: Path = typer.Option(None, help="output directory of the dictionary"),
    checkpoint_every: int = typer.Option(None, help="steps between checkpoints (in OUT/checkpoints; default: by time)"),
    checkpoint_minutes: float = typer.Option(None, help="wall-clock minutes between checkpoints (default 10)"),
    resume: bool = typer.Option(None, "--resume/--no-resume", help="continue the run in OUT from its newest checkpoint"),
    overwrite: bool = typer.Option(None, "--overwrite/--no-overwrite", help="replace a dictionary already in OUT "
                                   "(its eval.json and feature stores in OUT are removed)"),
    verify_data: bool = typer.Option(None, "--verify-data/--no-verify-data", help="check every shard's sha256 "
                                     "before the first step (default on)"),
    device: str = typer.Option(None, help="cpu or cuda (default cpu)"),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="show a progress bar (default on)"),
    wandb: bool = typer.Option(None, "--wandb/--no-wandb", help="log to Weights & Biases (default off)"),
    set_: list[str] = typer.Option(None, "--set", help="architecture option KEY=VALUE (JSON value), repeatable"),
) -> None:
    """Train a dictionary on an activation store; prints the training summary as JSON."""
    from probe.store import ActivationStore
    from saes.train import train

    flags = dict(architecture=architecture, site=site, target_site=target_site, d_sae=d_sae, k=k, n_tokens=n_tokens,
                 batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, decay=decay, seed=seed, b_dec_init=b_dec_init,
                 normalize_inputs=normalize_inputs, dead_tokens=dead_tokens, out=out, checkpoint_every=checkpoint_every,
                 checkpoint_minutes=checkpoint_minutes, resume=resume, overwrite=overwrite, verify_data=verify_data,
                 device=device, progress=progress, wandb=wandb)
    kwargs = read_config(config) if config is not None else {}
    store_path = store if store is not None else kwargs.pop("store", None)
    kwargs.pop("store", None)
    arch_kwargs = dict(kwargs.pop("arch_kwargs", None) or {})  # as in a saved cfg.json's training.config
    arch_kwargs.update({k_: kwargs.pop(k_) for k_ in list(kwargs) if k_ not in TRAIN_KEYS})
    kwargs.update({k_: v for k_, v in flags.items() if v is not None})
    arch_kwargs.update(_parse_sets(set_ or []))
    missing = [name for name in ("architecture", "d_sae", "out") if kwargs.get(name) is None]
    if store_path is None:
        missing.insert(0, "store")
    if missing:
        raise SteerscopeError(f"train needs {', '.join(missing)} (as flags or in --config)")
    arch = kwargs.pop("architecture")
    if kwargs.get("device") is not None:
        from probe.models import resolve_device

        kwargs["device"] = resolve_device(kwargs["device"])  # "cuda" on a CPU-only torch: one line, not an assert
    sae = train(arch, ActivationStore.open(store_path), **kwargs, **arch_kwargs)
    summary = {k_: v for k_, v in sae.cfg.training.items() if k_ != "config"}
    _echo_json({"out": str(kwargs["out"]), **summary})


def snmf_cmd(
    store: Path = typer.Argument(..., help="activation store directory"),
    site: str = typer.Option("blocks.2.mlp.hook_post", help="MLP activation site of the store"),
    rank: int = typer.Option(256, help="number of features"),
    sparsity: float = typer.Option(0.01, help="fraction of each feature's entries kept"),
    init: str = typer.Option("random", help="random, kmeans or svd"),
    max_iter: int = typer.Option(1000, help="maximum iterations"),
    n_tokens: int = typer.Option(None, help="rows to fit on (default: the whole store)"),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    out: Path = typer.Option(Path("runs/snmf"), help="output directory"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Fit SNMF (semi-nonnegative matrix factorisation) to MLP activations; prints its summary as JSON."""
    from probe.store import ActivationStore
    from saes.snmf import fit_snmf

    st = ActivationStore.open(store)
    model_info = st.manifest.get("model")
    model = model_info.get("model_name") if isinstance(model_info, dict) else None
    snmf = fit_snmf(st, rank, sparsity=sparsity, init=init, max_iter=max_iter, seed=seed, device=device, site=site,
                    n_tokens=n_tokens, progress=progress, model=model)
    snmf.save(out)
    _echo_json({"out": str(out), **snmf.cfg.training})


def codebook_cmd(
    model: str = typer.Option("austen-dense", help="zoo model to fine-tune (a name or a zoo directory)"),
    layers: str = typer.Option("all", help="layers whose MLP output gets a codebook: 'all' or e.g. '1,2'"),
    n_codes: int = typer.Option(1024, help="codes per codebook"),
    k: int = typer.Option(8, help="codes active per position"),
    n_tokens: int = typer.Option(400_000, help="fine-tuning tokens"),
    batch_size: int = typer.Option(8, help="contexts per step"),
    lr: float = typer.Option(3e-4, help="learning rate of the model's weights"),
    code_lr: float = typer.Option(1e-3, help="learning rate of the codes"),
    refresh_every: int = typer.Option(25, help="steps between re-initialising unused codes"),
    eval_contexts: int = typer.Option(None, help="test contexts for the loss (default: the whole test split)"),
    control: bool = typer.Option(False, "--control/--no-control",
                                 help="also fine-tune without codebooks, to separate the bottleneck's cost"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/codebook"), help="output model directory"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Codebook features (Tamkin et al.): fine-tune a zoo model with a k-of-N codebook on MLP outputs.

    OUT is a model directory (``--model OUT`` anywhere loads the quantised model) with card.json (test loss of
    the original and of the codebook model, code usage) and dictionaries/<site>, one per codebook, for
    ``steerscope features`` and ``steerscope app`` (codes as features). Prints the card as JSON.
    """
    from saes.codebook import fine_tune

    chosen = None if layers.strip() == "all" else _int_list(layers, "--layers")
    card = fine_tune(model, out, chosen, n_codes, k, n_tokens, batch_size, lr, code_lr, refresh_every, eval_contexts,
                     seed, control, overwrite, progress)
    _echo_json({k: v for k, v in card.items() if k != "history"})


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SteerscopeError(f"{flag} takes comma-separated integers, got {text!r}") from None


def eval_cmd(
    dictionary: Path = typer.Argument(..., help="dictionary directory (cfg.json + weights.safetensors)"),
    model: str = typer.Option(None, help="model name (default: the one in the dictionary's cfg.json)"),
    corpus: str = typer.Option("austen", help="held-out text: 'austen', 'hf:<dataset>', or a file/glob"),
    split: str = typer.Option(None, help="corpus split (default: val for austen, the whole corpus otherwise)"),
    n_ctx: int = typer.Option(128, help="tokens per context (BOS first)"),
    n_contexts: int = typer.Option(64, help="contexts to evaluate"),
    ablation: str = typer.Option("zero", help="baseline of the CE/KL scores: zero or mean ablation of the site"),
    site: str = typer.Option(None, help="override the dictionary's site"),
    target_site: str = typer.Option(None, help="override a transcoder's target site"),
    batch_size: int = typer.Option(8, help="contexts per forward pass"),
    dense_threshold: float = typer.Option(0.1, help="a latent firing on more than this fraction of tokens is dense"),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
) -> None:
    """Evaluate a dictionary (L0, FVU, dead/dense, CE-loss and KL scores); prints JSON and writes eval.json."""
    from probe.corpus import load_corpus
    from saes.metrics import evaluate

    d, m = dictionary_and_model(dictionary, model, device)
    texts = load_corpus(corpus, split or ("val" if corpus == "austen" else "all"))
    res = evaluate(d, m, texts, site, target_site, ablation=ablation, n_ctx=n_ctx,
                   n_contexts=n_contexts, batch_size=batch_size, dense_threshold=dense_threshold, out=dictionary)
    _echo_json(res)


def dictionary_and_model(dictionary: Path, model: str | None, device: str | None):
    """Load a dictionary directory and its model (``model`` or the one its cfg.json names) on one device."""
    from probe.models import load_model, resolve_device
    from saes.base import load_dictionary

    device = resolve_device(device)
    d = load_dictionary(dictionary, device=device)
    name = model or d.cfg.model
    if not name:
        raise SteerscopeError(f"{dictionary}/cfg.json names no model; pass --model")
    return d, load_model(name, device=device)
