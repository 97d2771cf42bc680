"""Codebook features (Tamkin et al.): fine-tune a zoo model with a codebook bottleneck on each chosen layer's MLP
output, and read each codebook as a dictionary.

``fine_tune`` loads the model, initialises every codebook from that layer's own MLP outputs, attaches the
bottlenecks (``probe.codebook``: sum of the k most cosine-similar codes, straight-through) and trains the model
and the codes together on the LM loss. Codes that go unused for ``refresh_every`` steps are re-initialised
from current activations (the paper's authors replace dead codes too). The output directory is a model
directory (the zoo layout plus the codebooks: ``load_model(DIR)`` gives the quantised model) with
``card.json`` recording the test loss of the original and of the codebook model, and ``dictionaries/<site>``,
one ``CodebookDictionary`` per codebook, which the feature store, the dashboard and ``SteeringVector.
from_feature`` take like any dictionary: code = feature, its examples = the contexts where it is active.

``CodebookDictionary`` reads ``blocks.L.mlp.hook_post`` (the MLP's hidden layer, which a cache of the
codebook model holds) and maps it through the layer's own ``W_out, b_out`` to the pre-quantisation MLP output,
so ``encode`` picks exactly the codes the model's bottleneck picks; a code's activation is its cosine
similarity (floored at 1e-6 so an active code is never 0) and ``decode`` sums the active codes: the model's
quantised ``hook_mlp_out``. Activating a code during generation is adding its vector at ``hook_mlp_out``
(after the bottleneck: the steering hook runs after the model's own).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm import tqdm

from probe.errors import SteerscopeError
from saes.base import Dictionary, DictionaryConfig, register


@dataclass
class CodebookConfig(DictionaryConfig):
    k: int = 8  # codes active per position
    apply_b_dec_to_input: bool = False
    normalize_decoder: bool = False


@register("codebook")
class CodebookDictionary(Dictionary):
    """A fine-tuned model's codebook as a dictionary: hook_post [d_mlp] -> k active codes -> hook_mlp_out."""

    Config = CodebookConfig
    capabilities: ClassVar[frozenset[str]] = frozenset()  # trained by fine-tuning the model (``fine_tune``)

    def __init__(self, cfg: CodebookConfig):
        super().__init__(cfg)
        if not 1 <= cfg.k <= cfg.d_sae:
            raise SteerscopeError(f"k must be between 1 and d_sae={cfg.d_sae}, got {cfg.k}")
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_out), requires_grad=False)  # the codes
        self.W_out = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out), requires_grad=False)  # the layer's MLP W_out
        self.b_out = nn.Parameter(torch.zeros(cfg.d_out), requires_grad=False)

    def max_active(self) -> int:
        return self.cfg.k

    def mlp_out(self, h: Tensor) -> Tensor:
        """The MLP output before the bottleneck, from its hidden layer."""
        self.check_input(h)
        return h @ self.W_out + self.b_out

    def encode(self, x: Tensor) -> Tensor:
        y = self.mlp_out(x)
        sims = nn.functional.normalize(y, dim=-1) @ nn.functional.normalize(self.W_dec, dim=-1).T
        top = sims.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(sims).scatter_(-1, top.indices, top.values.clamp_min(1e-6))

    def decode(self, codes: Tensor) -> Tensor:
        return (codes > 0).to(self.W_dec.dtype) @ self.W_dec

    def training_loss(self, x: Tensor, target: Tensor | None = None, **state: Any):
        raise SteerscopeError("a codebook is trained by fine-tuning its model with the bottleneck on: "
                              "steerscope codebook (saes.codebook.fine_tune), not steerscope train")


def _zoo_spec(name: str) -> tuple[dict, Path]:
    from probe.zoo import ZOO_NAMES, zoo_path

    path = zoo_path(name) if name in ZOO_NAMES else Path(name)
    cfg = path / "config.json"
    if not (cfg.exists() and (path / "card.json").exists() and (path / "tokenizer.json").exists()):
        raise SteerscopeError(f"codebook fine-tuning needs a zoo model (a name from `steerscope zoo list` or a zoo "
                              f"directory); {name!r} is not one")
    return json.loads(cfg.read_text()), path


def codebook_sites(model, layers: list[int] | None) -> list[str]:
    L = model.cfg.n_layers
    layers = list(range(L)) if layers is None else layers
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < L]
    if bad or not layers or len(set(layers)) != len(layers):
        raise SteerscopeError(f"layers must be distinct integers in 0..{L - 1}, got {layers}")
    if model.cfg.num_experts or model.cfg.gated_mlp:
        raise SteerscopeError("codebooks go on a dense (non-gated) MLP's output; this model's MLP is "
                              f"{'a mixture of experts' if model.cfg.num_experts else 'gated'}")
    return [f"blocks.{x}.hook_mlp_out" for x in sorted(layers)]


@torch.no_grad()
def _init_codes(model, sites: list[str], tokens: Tensor, n_codes: int, k: int, seed: int) -> dict:
    """Codes drawn from the layer's own MLP outputs (random positions, non-BOS), divided by k so that a sum of k
    codes starts at the activations' scale."""
    from probe.codebook import Codebook

    _, cache = model.run_with_cache(tokens, names_filter=sites)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in sites:
        x = cache[s][:, 1:].reshape(-1, model.cfg.d_model).float().cpu()
        idx = torch.randint(len(x), (n_codes,), generator=g) if len(x) < n_codes else torch.randperm(len(x), generator=g)[:n_codes]
        cb = Codebook(n_codes, model.cfg.d_model, k)
        cb.codes.copy_(x[idx] / k + 1e-3 * torch.randn(n_codes, model.cfg.d_model, generator=g) * x.std())
        out[s] = cb
    return out


@torch.no_grad()
def _refresh(codebooks: dict, used: dict[str, Tensor], gen: torch.Generator) -> dict[str, int]:
    """Re-initialise the codes unused since the last refresh from the latest inputs; returns how many per site."""
    out = {}
    for s, cb in codebooks.items():
        dead = (~used[s]).nonzero().flatten()
        out[s] = len(dead)
        if len(dead) and cb.last_input is not None:
            x = cb.last_input
            pick = torch.randint(len(x), (len(dead),), generator=gen).to(x.device)
            cb.codes[dead.to(cb.codes.device)] = (x[pick] / cb.k).to(cb.codes.dtype)
        used[s].zero_()
    return out


@torch.no_grad()
def code_ids(model, tokens: Tensor, batch_size: int = 8) -> dict[str, Tensor]:
    """The codes each codebook of ``model`` selects on ``tokens`` [n, T]: {site: ids [n, T, k]}."""
    cbs = model.codebooks
    for cb in cbs.values():
        cb.record = []
    try:
        for i in range(0, len(tokens), batch_size):
            model(tokens[i:i + batch_size].to(model.cfg.device), return_type=None)
        return {s: torch.cat(cb.record) for s, cb in cbs.items()}
    finally:
        for cb in cbs.values():
            cb.record = None


def code_usage(model, tokens: Tensor, batch_size: int = 8) -> dict[str, dict]:
    """Per codebook on ``tokens``: codes ever active, and the median share of a code's firings on its most common
    current token (1 = a token detector; lower = a code for contexts)."""
    res = {}
    for s, ids in code_ids(model, tokens, batch_size).items():
        cb = model.codebooks[s]
        tok = tokens[:, :, None].expand_as(ids)
        counts = torch.zeros(cb.n_codes * model.cfg.d_vocab)
        counts.index_add_(0, (ids * model.cfg.d_vocab + tok).reshape(-1), torch.ones(ids.numel()))
        counts = counts.view(cb.n_codes, model.cfg.d_vocab)
        fires = counts.sum(1)
        live = fires > 0
        purity = counts.max(1).values[live] / fires[live]
        res[s] = {"n_codes": cb.n_codes, "k": cb.k, "active_codes": int(live.sum()),
                  "active_share": round(float(live.float().mean()), 4),
                  "median_top_token_share": round(float(purity.median()), 4) if live.any() else None}
    return res


def _train_loop(model, codebooks: dict, train: Tensor, steps: int, batch_size: int, lr: float, code_lr: float,
                refresh_every: int, seed: int, progress: bool, desc: str) -> tuple[list, list]:
    """AdamW on the LM loss (model at ``lr``, codes at ``code_lr``; warmup then cosine), dead codes refreshed."""
    from probe.zoo.train import lr_at

    gen = torch.Generator().manual_seed(seed + 1)
    params = list(model.parameters())
    groups = [{"params": params, "lr": lr, "weight_decay": 0.0}]
    if codebooks:
        groups.append({"params": [cb.codes for cb in codebooks.values()], "lr": code_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in groups]
    used = {s: torch.zeros(cb.n_codes, dtype=torch.bool) for s, cb in codebooks.items()}
    for cb in codebooks.values():
        cb.record = []
        cb.train()
    order, pos, history, refreshed = torch.randperm(len(train), generator=gen), 0, [], []
    model.train()
    try:
        for step in (bar := tqdm(range(steps), desc=desc, unit="step", disable=not progress)):
            if pos + batch_size > len(order):
                order, pos = torch.randperm(len(train), generator=gen), 0
            batch = train[order[pos:pos + batch_size]]
            pos += batch_size
            for g, base in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = lr_at(step, steps, max(1, steps // 20), base, 0.1)
            loss = model(batch, return_type="loss")
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise SteerscopeError(f"the fine-tune diverged at step {step} (loss {lv}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            for s, cb in codebooks.items():
                for ids in cb.record:
                    used[s][ids.reshape(-1)] = True
                cb.record.clear()
            if codebooks and (step + 1) % refresh_every == 0 and step + 1 < steps:
                refreshed.append({"step": step + 1, "dead": _refresh(codebooks, used, gen)})
            if (step + 1) % 50 == 0 or step == steps - 1:
                history.append({"step": step + 1, "tokens": (step + 1) * batch.numel(), "train_loss": round(lv, 4)})
            bar.set_postfix(loss=f"{lv:.3f}")
    finally:
        for cb in codebooks.values():
            cb.record, cb.last_input = None, None
            cb.eval()
        model.eval()
    return history, refreshed


def export_dictionaries(model, out: Path, model_ref: str) -> dict[str, Path]:
    """One ``CodebookDictionary`` per codebook of ``model`` under ``out/dictionaries/<site>``."""
    paths = {}
    for s, cb in model.codebooks.items():
        layer = int(s.split(".")[1])
        mlp = model.blocks[layer].mlp
        cfg = CodebookConfig(d_in=model.cfg.d_mlp, d_sae=cb.n_codes, d_out=model.cfg.d_model,
                             site=f"blocks.{layer}.mlp.hook_post", target_site=s, model=model_ref, k=cb.k)
        d = CodebookDictionary(cfg)
        with torch.no_grad():
            d.W_dec.copy_(cb.codes.detach().float().cpu())
            d.W_out.copy_(mlp.W_out.detach().float().cpu())
            d.b_out.copy_(mlp.b_out.detach().float().cpu())
        paths[s] = d.save(out / "dictionaries" / s)
    return paths


def fine_tune(model_name: str = "austen-dense", out: str | Path = "runs/codebook", layers: list[int] | None = None,
              n_codes: int = 1024, k: int = 8, n_tokens: int = 400_000, batch_size: int = 8, lr: float = 3e-4,
              code_lr: float = 1e-3, refresh_every: int = 25, eval_contexts: int | None = None, seed: int = 0,
              control_run: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Fine-tune zoo model ``model_name`` with codebooks on the MLP outputs of ``layers`` (default: all); write the
    model directory ``out`` and return its card (test losses before and after, code usage, training history)."""
    from probe.codebook import attach, save_codebooks
    from probe.models import load_model, save_zoo_weights
    from probe.store_files import atomic_write
    from probe.zoo.train import N_CTX, evaluate_loss, load_tokens

    spec, src = _zoo_spec(model_name)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SteerscopeError(f"{out} is not empty; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < batch_size * N_CTX:
        raise SteerscopeError(f"n_tokens must be at least one batch ({batch_size} x {N_CTX} tokens), got {n_tokens!r}")
    torch.manual_seed(seed)
    model = load_model(str(src), device="cpu")
    sites = codebook_sites(model, layers)
    train, test = load_tokens("train", src / "tokenizer.json"), load_tokens("test", src / "tokenizer.json")
    test = test if eval_contexts is None else test[:eval_contexts]
    t0 = time.time()
    loss_before = evaluate_loss(model, test)
    gen = torch.Generator().manual_seed(seed)
    codebooks = _init_codes(model, sites, train[torch.randperm(len(train), generator=gen)[:16]], n_codes, k, seed)
    attach(model, codebooks)
    loss_init = evaluate_loss(model, test)
    steps = n_tokens // (batch_size * N_CTX)
    history, refreshed = _train_loop(model, codebooks, train, steps, batch_size, lr, code_lr, refresh_every, seed,
                                     progress, "codebook fine-tune")
    control = None
    if control_run:  # the same fine-tune without codebooks: what fine-tuning alone does to the test loss
        plain = load_model(str(src), device="cpu")
        _train_loop(plain, {}, train, steps, batch_size, lr, code_lr, refresh_every, seed, progress,
                    "control fine-tune (no codebooks)")
        control = round(evaluate_loss(plain, test), 4)
        del plain
    wall = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    name = f"{spec.get('model_name', src.name)}-codebook"
    spec = {**spec, "model_name": name}
    save_zoo_weights(model, out / "model.safetensors", dtype=torch.float32)
    (out / "config.json").write_text(json.dumps(spec, indent=2))
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    save_codebooks(codebooks, out)
    atomic_write(out / "card.json", json.dumps({"name": name, "base_model": model_name, "unfinished": True}).encode())
    reloaded = load_model(str(out), device="cpu")  # every number below is of what users load
    loss_after = evaluate_loss(reloaded, test)
    dicts = export_dictionaries(reloaded, out, str(out.resolve()))
    card = {
        "name": name, "base_model": model_name, "method": "codebook features (Tamkin et al.): sum of the k most "
        "cosine-similar codes replaces each chosen MLP output; model and codes fine-tuned on the LM loss, "
        "straight-through", "sites": sites, "n_codes": n_codes, "k": k,
        "hyperparameters": {"n_tokens": steps * batch_size * N_CTX, "steps": steps, "batch_size": batch_size, "lr": lr,
                            "code_lr": code_lr, "refresh_every": refresh_every, "seed": seed},
        "test": {"contexts": len(test), "tokens": int(test.numel()), "loss_original": round(loss_before, 4),
                 "loss_codebooks_at_init": round(loss_init, 4), "loss_codebook_model": round(loss_after, 4),
                 "loss_finetuned_without_codebooks": control,
                 "loss_cost_nats": round(loss_after - loss_before, 4),
                 "loss_cost_vs_control_nats": None if control is None else round(loss_after - control, 4),
                 "loss_cost_pct": round(100 * (loss_after - loss_before) / loss_before, 2),
                 "perplexity_ratio": round(math.exp(loss_after - loss_before), 4)},
        "code_usage": code_usage(reloaded, test),
        "dead_codes_refreshed": refreshed[-3:],
        "dictionaries": {s: str(p.relative_to(out)) for s, p in dicts.items()},
        "history": history, "wall_time_s": round(wall, 1),
        "hardware": f"cpu / torch {torch.__version__} / {torch.get_num_threads()} threads",
    }
    atomic_write(out / "card.json", json.dumps(card, indent=2).encode())
    return card
