"""Circuit heads on the indirect-object task: discrete SAE codes (O'Neill & Bui) against activation patching.

1. Prompts from ``bench/data/ioi.json``: a positive prompt names IO and S and repeats S ("When Mary and John went
   to the store, John gave a drink to" -> " Mary"); its negative puts a third name where S repeats ("..., Tom
   gave a drink to"), so the answer is no longer determined. Names are the file's names that are one token (with
   a leading space) in the model's tokenizer; ``--prompts`` pairs from the train templates, seeded.
2. The task check: the mean logit difference logit(IO) - logit(S) on positives and negatives, and the share of
   positives where IO beats S.
3. The reference: activation patching of every head (``steering.patching.head_patching``; base = positive,
   source = its negative, all positions), effect = share of the logit difference the head's patch removes. The
   "true" circuit is the ``--top`` heads with the largest |effect|.
4. The method (``saes.circuits.heads``): one ReLU SAE (``--d-sae`` latents) on every head's position-averaged
   output of ``--n-train`` positive and ``--n-train`` negative prompts, codes = argmax latent, score = codes
   unique to positives; ROC AUC, precision and recall against the reference, over ``--seeds`` seeds (prompt
   draw for training and initialisation), beside the same with the labels shuffled (the chance level) and the
   runtime of each method.

    python -m bench.heads --model austen-dense
    python -m bench.heads --model smollm2-135m-instruct

Prints one JSON object (``--out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from bench.report import emit
from probe.errors import SteerscopeError

DATA = Path(__file__).parent / "data" / "ioi.json"


def single_token_names(model, names: list[str]) -> list[str]:
    """The names that are one token with a leading space (so a positive and its negative align position by position)."""
    from probe.tokens import encode

    skip = 1 if model.cfg.default_prepend_bos else 0
    out = []
    for n in dict.fromkeys(names):
        ids = encode(model, f" {n}", allow_whitespace=True)
        if len(ids) - skip == 1 and model.tokenizer.decode(ids[skip:].tolist()) == f" {n}":
            out.append(n)
    return out


def ioi_prompts(model, n: int, split: str = "train", seed: int = 0) -> dict:
    """``n`` (positive, negative, IO id, S id) prompt pairs; a positive and its negative have equal length."""
    from probe.tokens import encode

    data = json.loads(DATA.read_text())
    names = single_token_names(model, data["names"])
    if len(names) < 3:
        raise SteerscopeError(f"only {len(names)} of the names in {DATA} are single tokens for this model; need 3")
    rng = random.Random(seed)
    pos, neg, io, s = [], [], [], []
    while len(pos) < n:
        a, b, c = rng.sample(names, 3)
        t = rng.choice(data["templates"][split])
        fill = {"PLACE": rng.choice(data["places"]), "OBJECT": rng.choice(data["objects"])}
        head, _, tail = t.rpartition("{B}")  # the negative: the repeated subject (the last {B}) becomes C
        p, q = t.format(A=a, B=b, **fill), (head + "{C}" + tail).format(A=a, B=b, C=c, **fill)
        if len(encode(model, p)) != len(encode(model, q)):
            continue
        pos.append(p)
        neg.append(q)
        io.append(int(encode(model, f" {a}", allow_whitespace=True)[-1]))
        s.append(int(encode(model, f" {b}", allow_whitespace=True)[-1]))
    return {"positive": pos, "negative": neg, "io": torch.tensor(io), "s": torch.tensor(s), "names": names}


@torch.no_grad()
def task_check(model, prompts: dict) -> dict:
    from steering.padding import end_aligned, pad_prompts

    out = {}
    for kind in ("positive", "negative"):
        b = pad_prompts(model, prompts[kind])
        last = end_aligned(model(b.tokens), b.lengths)[:, -1]
        rows = torch.arange(len(last))
        ld = last[rows, prompts["io"]] - last[rows, prompts["s"]]
        out[kind] = {"logit_diff_mean": float(ld.mean()), "logit_diff_sd": float(ld.std()),
                     "io_beats_s": float((ld > 0).float().mean())}
    return out


def run(model_name, n_prompts: int = 40, n_train: int = 5, d_sae: int = 200, top: int | None = None,
        seeds: int = 5, epochs: int = 500, l1: float = 0.02, position: str = "mean",
        reference: dict | None = None) -> dict:
    from probe.models import load_model
    from saes.circuits.heads import agreement, head_outputs, rank_heads
    from steering.patching import head_patching, logit_diff

    t0 = time.perf_counter()
    model = load_model(model_name, device="cpu") if isinstance(model_name, str) else model_name  # or a model
    model_name = name = model_name if isinstance(model_name, str) else model.cfg.model_name
    prompts = ioi_prompts(model, n_prompts)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    top = top or max(3, round(0.1 * L * H))
    check = task_check(model, prompts)
    if reference is not None:  # an earlier run's patching on the same prompts (they are seeded): not redone
        if reference["example"] != {"positive": prompts["positive"][0], "negative": prompts["negative"][0]} or \
                reference["n_prompts"] != n_prompts or reference["model"] != name:
            raise SteerscopeError("the reference run used other prompts or another model; run the patching again")
        pt = reference["patching"]
        top, truth = pt["top"], [tuple(h) for h in pt["truth"]]
    else:
        patching = head_patching(model, prompts["positive"], prompts["negative"], logit_diff(prompts["io"], prompts["s"]))
        truth = patching.ranking()[:top]
        pt = {"seconds": patching.seconds, "forward_passes": L * H + 2, "top": top, "truth": truth,
              "effects_of_truth": [round(float(patching.effects[a, b]), 4) for a, b in truth],
              "metric_positive": patching.metric_base, "metric_negative": patching.metric_source}
    t1 = time.perf_counter()
    acts = head_outputs(model, prompts["positive"] + prompts["negative"], position=position)
    capture_s = time.perf_counter() - t1
    labels = torch.arange(2 * n_prompts) < n_prompts
    runs, shuffled = [], []
    for seed in range(seeds):
        r = rank_heads(acts, labels, n_train=n_train, d_sae=d_sae, l1_coeff=l1, epochs=epochs, seed=seed)
        runs.append({"seed": seed, "seconds": capture_s + r.seconds, **agreement(r.scores, truth),
                     "top_heads": r.ranking()[:top]})
        perm = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1000 + seed))]
        c = rank_heads(acts, perm, n_train=n_train, d_sae=d_sae, l1_coeff=l1, epochs=epochs, seed=seed)
        shuffled.append(agreement(c.scores, truth))

    def band(rows: list[dict], key: str) -> dict:
        v = [r[key] for r in rows]
        return {"median": statistics.median(v), "min": min(v), "max": max(v)}

    return {
        "model": model_name, "n_layers": L, "n_heads": H, "n_prompts": n_prompts, "names": len(prompts["names"]),
        "example": {"positive": prompts["positive"][0], "negative": prompts["negative"][0]},
        "task": check,
        "patching": {**pt, "reused": reference is not None},
        "sae": {"position": position, "n_train_each": n_train, "d_sae": d_sae, "l1": l1, "epochs": epochs, "seeds": seeds,
                "capture_seconds": capture_s, "auc": band(runs, "auc"), "precision_at_k": band(runs, "precision_at_k"),
                "recall_at_k": band(runs, "recall_at_k"), "precision": band(runs, "precision"),
                "recall": band(runs, "recall"), "seconds": band(runs, "seconds"), "runs": runs},
        "shuffled_labels": {"auc": band(shuffled, "auc"), "precision_at_k": band(shuffled, "precision_at_k")},
        "wall_seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="austen-dense")
    p.add_argument("--prompts", type=int, default=40, help="positive/negative pairs")
    p.add_argument("--n-train", type=int, default=5, help="prompts of each kind the SAE trains on")
    p.add_argument("--d-sae", type=int, default=200)
    p.add_argument("--top", type=int, default=None, help="size of the reference circuit (default 10%% of heads)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--l1", type=float, default=0.02)
    p.add_argument("--position", choices=("mean", "last"), default="mean",
                   help="head outputs averaged over the prompt (the authors' code) or at its last token")
    p.add_argument("--reference", type=Path, default=None,
                   help="an earlier run's JSON: reuse its patching (same model, prompts and seed) instead of redoing it")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    ref = json.loads(a.reference.read_text()) if a.reference else None
    res = run(a.model, a.prompts, a.n_train, a.d_sae, a.top, a.seeds, a.epochs, a.l1, a.position, ref)
    emit(res, a.out)


if __name__ == "__main__":
    main()
