"""Patching on two tasks whose answers are known: indirect objects and country capitals.

Each task gives (base, source, expected) triples of equal-length prompts, where ``expected`` is the token the
base run should predict if the causal variable took its source value:

* ``ioi`` (``bench/data/ioi.json``): base "When Mary and John went to the store, John gave a drink to" (answer
  " Mary"); source: the same prompt with the repeated subject swapped to the other name ("..., Mary gave a
  drink to", answer " John"); expected = the source's answer. DAS trains on the train templates and is tested
  on the held-out templates (new wording, fresh name draws).
* ``capitals`` (``bench/data/capitals.json``): base "The capital city of France is" (" Paris"), source the same
  with another country; expected = the first token of the source country's capital. Countries are kept only
  where the country is one token and the model's top next token is its capital's first token on both
  templates; they are split into train and held-out countries, and the held-out pairs also use the held-out
  template. Pairs whose two capitals start with the same token are skipped.

For each task:

1. The task check: the share of base prompts whose top token is the right answer, and the mean logit
   difference right - other (the source's answer).
2. A layer x position grid of full activation patches of ``hook_resid_pre`` on the first train template (for
   IOI with one place and object, so every pair has the same tokens at every position), effect = fraction of
   the source - base logit-difference gap, positions labelled by their tokens.
3. At the last position of ``hook_resid_pre`` for each layer in ``--layers``: held-out interchange-intervention
   accuracy (IIA) of a rank-1 DAS direction (Geiger et al.), of the difference-in-means direction of the train
   pairs (mean h_s - h_b), of the full patch (all d dimensions) and of a random direction (the control).
4. Illusion diagnostics (Makelov et al.) at ``blocks.L.mlp.hook_post`` (``--mlp-layer``; the reader is W_out, so
   the null space has d_mlp - d_model dimensions): a rank-1 DAS direction v trained there, split into its
   row-space and null-space parts; the patch effect of v, v_row and v_null and the null-space share of v's
   effect on the held-out pairs.

    python -m bench.patching_tasks --model smollm2-135m-instruct --task both --out patching.json
    python -m bench.patching_tasks --model austen-dense --task ioi --layers 0,2 --steps 20   # a quick look

Prints one JSON object (``--out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.heads import single_token_names
from bench.report import emit
from probe.errors import SteerscopeError

DATA = Path(__file__).parent / "data"


def _first_token(model, text: str) -> int:
    from probe.tokens import encode

    ids = encode(model, text, allow_whitespace=True)
    return int(ids[1 if model.cfg.default_prepend_bos else 0])


@torch.no_grad()
def _last_logits(model, prompts: list[str]) -> torch.Tensor:
    """Next-token logits [B, V] at each prompt's last token (padded batch, end-aligned)."""
    from steering.padding import end_aligned, pad_prompts

    b = pad_prompts(model, prompts)
    return end_aligned(model(b.tokens), b.lengths)[:, -1].cpu()


def _same_length(model, *texts: str) -> bool:
    from probe.tokens import encode

    return len({len(encode(model, t)) for t in texts}) == 1


def ioi_pairs(model, n: int, split: str = "train", seed: int = 0, fixed: bool = False) -> dict:
    """``n`` IOI triples: base (answer = IO), source with the repeated subject swapped to IO (answer = S),
    expected = S. ``fixed``: only the split's first template, one place and one object (aligned tokens)."""
    data = json.loads((DATA / "ioi.json").read_text())
    names = single_token_names(model, data["names"])
    if len(names) < 2:
        raise SteerscopeError(f"only {len(names)} of the names in ioi.json are single tokens for this model; need 2")
    rng = random.Random(seed)
    templates = data["templates"][split][:1] if fixed else data["templates"][split]
    base, source, io, s = [], [], [], []
    tries = 0
    while len(base) < n:
        tries += 1
        if tries > 100 * n:
            raise SteerscopeError(f"could not build {n} equal-length IOI pairs from the {split} templates")
        a, b = rng.sample(names, 2)
        t = rng.choice(templates)
        fill = ({"PLACE": data["places"][0], "OBJECT": data["objects"][0]} if fixed else
                {"PLACE": rng.choice(data["places"]), "OBJECT": rng.choice(data["objects"])})
        head, _, tail = t.rpartition("{B}")  # the repeated subject is the last {B}
        p, q = t.format(A=a, B=b, **fill), (head + "{A}" + tail).format(A=a, B=b, **fill)
        if not _same_length(model, p, q):
            continue
        base.append(p)
        source.append(q)
        io.append(_first_token(model, f" {a}"))
        s.append(_first_token(model, f" {b}"))
    io_t, s_t = torch.tensor(io), torch.tensor(s)
    return {"base": base, "source": source, "answer": io_t, "expected": s_t, "names": len(names)}


def known_capitals(model, templates: list[str], require_known: bool = True) -> list[tuple[str, str, int]]:
    """(country, capital, capital's first token) where the country is one token and the model's top next token
    is the capital's first token on every template (``require_known=False``: every country, for testing the
    pipeline on an untrained model; pairs are still of equal length)."""
    data = json.loads((DATA / "capitals.json").read_text())
    countries = list(data["capitals"])
    single = set(single_token_names(model, countries) if require_known else countries)
    rows = [(c, data["capitals"][c], _first_token(model, " " + data["capitals"][c])) for c in countries if c in single]
    keep = torch.ones(len(rows), dtype=torch.bool)
    for t in templates if require_known else ():
        top = _last_logits(model, [t.format(X=c) for c, _, _ in rows]).argmax(-1)
        keep &= top == torch.tensor([tok for _, _, tok in rows])
    return [r for r, k in zip(rows, keep.tolist(), strict=True) if k]


def capital_pairs(model, rows: list[tuple[str, str, int]], template: str, n: int, seed: int = 0) -> dict:
    """``n`` (base, source) country pairs from ``rows`` on ``template``, capitals with different first tokens."""
    rng = random.Random(seed)
    cands = [(i, j) for i in range(len(rows)) for j in range(len(rows)) if i != j and rows[i][2] != rows[j][2]]
    cands = [(i, j) for i, j in cands if _same_length(model, template.format(X=rows[i][0]), template.format(X=rows[j][0]))]
    if not cands:
        raise SteerscopeError("no country pairs with different capitals; need at least two known capitals")
    pick = rng.sample(cands, min(n, len(cands)))
    return {"base": [template.format(X=rows[i][0]) for i, _ in pick],
            "source": [template.format(X=rows[j][0]) for _, j in pick],
            "answer": torch.tensor([rows[i][2] for i, _ in pick]),
            "expected": torch.tensor([rows[j][2] for _, j in pick])}


@torch.no_grad()
def task_check(model, pairs: dict) -> dict:
    """Base runs: share whose top token is the answer; mean logit difference answer - expected (the source's)."""
    last = _last_logits(model, pairs["base"])
    rows = torch.arange(len(last))
    ld = last[rows, pairs["answer"]] - last[rows, pairs["expected"]]
    return {"n": len(last), "top1": float((last.argmax(-1) == pairs["answer"]).float().mean()),
            "logit_diff_mean": float(ld.mean()), "logit_diff_sd": float(ld.std()) if len(ld) > 1 else 0.0}


def wilson(k: float, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of a proportion k/n."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(c - h, 4), round(c + h, 4)]


def _iia(x: float, n: int) -> dict:
    return {"iia": round(x, 4), "band": wilson(round(x * n), n)}


def grid(model, pairs: dict, max_pairs: int) -> dict:
    from steering.padding import pair, position_labels
    from steering.patching import logit_diff, patching_grid

    b, s = pair(model, pairs["base"][:max_pairs], pairs["source"][:max_pairs])
    n = len(b)
    metric = logit_diff(pairs["expected"][:n], pairs["answer"][:n])
    t = time.perf_counter()
    g = patching_grid(model, b, s, "blocks.*.hook_resid_pre", metric)
    labels = position_labels(model, b, s, g.positions)
    eff = g.effects
    best = [(int(i), int(j)) for i, j in zip(*torch.where(eff.abs() >= 0.5), strict=True)]
    return {"n_pairs": n, "positions": g.positions, "labels": labels, "sites": g.sites,
            "effects": [[round(float(v), 3) for v in row] for row in eff],
            "metric_base": g.metric_base, "metric_source": g.metric_source,
            "cells_over_half": [[g.sites[i], labels[j]] for i, j in best],
            "seconds": round(time.perf_counter() - t, 1)}


def compare_at(model, site: str, train: dict, test: dict, steps: int, lr: float, seed: int) -> dict:
    """Held-out IIA at the last position of ``site``: DAS rank 1, diff-in-means, full patch, random direction."""
    from steering.das import interchange_accuracy, train_das
    from steering.padding import pair
    from steering.patching import Patch, cache_site

    t = time.perf_counter()
    r = train_das(model, train["base"], train["source"], train["expected"], site, -1, rank=1, steps=steps, lr=lr,
                  seed=seed, test=(test["base"], test["source"], test["expected"]))
    das_s = time.perf_counter() - t
    b, s = pair(model, train["base"], train["source"])
    h_b, h_s = cache_site(model, b, site), cache_site(model, s, site)
    diff = (h_s[:, -1] - h_b[:, -1]).float().mean(0).cpu()  # equal lengths: column -1 is every prompt's last token
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(diff.shape[0], generator=g)
    tb, ts = pair(model, test["base"], test["source"])
    n = len(tb)

    def acc(p: Patch) -> dict:
        return _iia(interchange_accuracy(model, p, tb, ts, test["expected"]), n)

    return {"site": site, "n_train": r.n_train, "n_test": n,
            "das": {**_iia(r.test_iia, n), "train_iia": round(r.iia, 4), "loss": round(r.loss, 4), "seconds": round(das_s, 1)},
            "diff_in_means": acc(Patch.direction(site, diff, (-1,))),
            "full": acc(Patch.full(site, (-1,))),
            "random": acc(Patch.direction(site, rand, (-1,))),
            "das_cos_diff_in_means": round(float(torch.nn.functional.cosine_similarity(r.basis[:, 0], diff, dim=0)), 4),
            "basis": r.basis[:, 0]}


def illusion_at(model, layer: int, train: dict, test: dict, steps: int, lr: float, seed: int) -> dict:
    from steering.das import train_das
    from steering.illusion import illusion_diagnostics
    from steering.patching import logit_diff

    site = f"blocks.{layer}.mlp.hook_post"
    t = time.perf_counter()
    r = train_das(model, train["base"], train["source"], train["expected"], site, -1, rank=1, steps=steps, lr=lr,
                  seed=seed, test=(test["base"], test["source"], test["expected"]))
    rep = illusion_diagnostics(model, test["base"], test["source"], site, r.basis[:, 0],
                               logit_diff(test["expected"], test["answer"]), positions=(-1,))
    return {"site": site, "das_train_iia": round(r.iia, 4), "das_test_iia": _iia(r.test_iia, r.n_test),
            "null_dim": rep.null_dim, "row_norm": round(rep.row_norm, 4), "null_norm": round(rep.null_norm, 4),
            "null_share": round(rep.null_share, 4), "effect_v": round(rep.effect_v, 4),
            "effect_row": round(rep.effect_row, 4), "effect_null": round(rep.effect_null, 4),
            "effect_full_site": round(rep.effect_full, 4), "illusion": rep.illusion, "verdict": rep.verdict,
            "seconds": round(time.perf_counter() - t, 1)}


def task_data(model, task: str, n_train: int, n_test: int, seed: int,
              require_known: bool = True) -> tuple[dict, dict, dict, dict]:
    """(train, test, grid pairs, facts) for one task."""
    if task == "ioi":
        train = ioi_pairs(model, n_train, "train", seed)
        test = ioi_pairs(model, n_test, "held_out", seed + 1)
        grid_pairs = ioi_pairs(model, n_train, "train", seed + 2, fixed=True)
        return train, test, grid_pairs, {"names": train["names"]}
    data = json.loads((DATA / "capitals.json").read_text())
    tr_t, ho_t = data["templates"]["train"][0], data["templates"]["held_out"][0]
    rows = known_capitals(model, [tr_t, ho_t], require_known)
    if len(rows) < 4:
        raise SteerscopeError(f"the model knows only {len(rows)} capitals on both templates; need 4")
    random.Random(seed).shuffle(rows)
    n_ho = max(2, round(0.3 * len(rows)))
    ho, tr = rows[:n_ho], rows[n_ho:]
    train = capital_pairs(model, tr, tr_t, n_train, seed)
    test = capital_pairs(model, ho, ho_t, n_test, seed + 1)
    facts = {"countries_in_file": len(data["capitals"]), "require_known": require_known, "countries_kept": len(rows),
             "train_countries": len(tr), "held_out_countries": len(ho)}
    return train, test, train, facts


def run_task(model, task: str, layers: list[int], mlp_layer: int, n_train: int, n_test: int, steps: int,
             lr: float, seed: int, grid_pairs: int, do_grid: bool = True, require_known: bool = True) -> dict:
    t0 = time.perf_counter()
    train, test, gp, facts = task_data(model, task, n_train, n_test, seed, require_known)
    out = {"task": task, **facts, "example": {"base": train["base"][0], "source": train["source"][0],
                                              "held_out_base": test["base"][0]},
           "n_train_pairs": len(train["base"]), "n_test_pairs": len(test["base"]),
           "check": {"train": task_check(model, train), "test": task_check(model, test)}}
    if do_grid:
        out["grid"] = grid(model, gp, grid_pairs)
    sweep = []
    for L in tqdm(layers, desc=f"{task}: DAS layer sweep", unit="layer"):
        c = compare_at(model, f"blocks.{L}.hook_resid_pre", train, test, steps, lr, seed)
        c.pop("basis")
        sweep.append({"layer": L, **c})
    out["end_position_sweep"] = sweep
    out["illusion"] = illusion_at(model, mlp_layer, train, test, steps, lr, seed)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def run(model_name, tasks=("ioi", "capitals"), layers: list[int] | None = None, mlp_layer: int | None = None,
        n_train: int = 48, n_test: int = 48, steps: int = 80, lr: float = 2e-2, seed: int = 0,
        grid_pairs: int = 24, do_grid: bool = True, require_known: bool = True) -> dict:
    from probe.models import load_model

    t0 = time.perf_counter()
    model = load_model(model_name, device="cpu") if isinstance(model_name, str) else model_name
    name = model_name if isinstance(model_name, str) else model.cfg.model_name
    L = model.cfg.n_layers
    layers = layers if layers is not None else sorted({round(i * (L - 1) / 6) for i in range(7)})
    bad = [x for x in layers if not 0 <= x < L]
    if bad or (mlp_layer is not None and not 0 <= mlp_layer < L):
        raise SteerscopeError(f"layers must be in 0..{L - 1} for {name}, got {bad or [mlp_layer]}")
    mlp_layer = mlp_layer if mlp_layer is not None else L // 2
    out = {"model": name, "n_layers": L, "d_model": model.cfg.d_model, "d_mlp": model.cfg.d_mlp, "seed": seed,
           "das": {"rank": 1, "steps": steps, "lr": lr}, "layers": layers, "mlp_layer": mlp_layer}
    for task in tasks:
        out[task] = run_task(model, task, layers, mlp_layer, n_train, n_test, steps, lr, seed, grid_pairs, do_grid,
                             require_known)
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--task", choices=("ioi", "capitals", "both"), default="both")
    p.add_argument("--layers", default=None, help="comma-separated layers for the DAS sweep (default: 7 across depth)")
    p.add_argument("--mlp-layer", type=int, default=None, help="layer of the illusion diagnostics (default: middle)")
    p.add_argument("--train-pairs", type=int, default=48)
    p.add_argument("--test-pairs", type=int, default=48)
    p.add_argument("--steps", type=int, default=80, help="DAS optimiser steps (full batch, Adam)")
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-pairs", type=int, default=24, help="pairs in the layer x position grid")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    tasks = ("ioi", "capitals") if a.task == "both" else (a.task,)
    layers = [int(x) for x in a.layers.split(",")] if a.layers else None
    emit(run(a.model, tasks, layers, a.mlp_layer, a.train_pairs, a.test_pairs, a.steps, a.lr, a.seed,
             a.grid_pairs, not a.no_grid), a.out)


if __name__ == "__main__":
    main()
