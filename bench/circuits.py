"""Attribution graphs through per-layer transcoders: speed, intervention check, virtual-weight agreement.

Prompts are ``--n-tok``-token windows spread through the Austen corpus' test split (held out from the
model's and the transcoders' training). For each prompt:

- the wall time of ``attribute`` (all feature rows, and with ``--cap`` rows computed in order of influence),
  with the replacement and completeness scores of both;
- the ablation check (``saes.circuits.validate.ablation_check``): Spearman between the graph's predicted
  and the real model's measured change of the target logit when each of the top ``--n-top`` features is
  removed, with everything live and with attention and LayerNorm frozen (MLPs live);
- Spearman between the top 100 feature->feature prompt edges and ``a_s`` x their virtual weights.

    steerscope transcoders --out runs/tc --n-tokens 500000 --d-sae 4096 --k 32
    python -m bench.circuits --transcoders runs/tc --prompts 20
    python -m bench.circuits --model smollm2-135m-instruct --transcoders runs/tc-smol --no-full --sub-caps 256,512,768
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path


def openings(model, n: int, n_tok: int) -> list[str]:
    """``n`` windows of ``n_tok`` tokens (BOS included), evenly spaced through the joined test split."""
    from probe.corpus import load_corpus

    ids = model.tokenizer(" ".join(load_corpus("austen", split="test")))["input_ids"]
    body = n_tok - (1 if model.cfg.default_prepend_bos else 0)
    stride = max(body, (len(ids) - body) // max(n, 1))
    return [model.tokenizer.decode(ids[i * stride: i * stride + body]).strip() for i in range(n)]


def run(model_name, transcoders: Path, n_prompts: int, n_tok: int, n_top: int, cap: int, full: bool = True,
        sub_caps: tuple[int, ...] = ()) -> dict:
    import torch

    from probe.models import load_model
    from saes.circuits import load_transcoders
    from saes.circuits.attribution import attribute
    from saes.circuits.validate import ablation_check, spearman, virtual_weight_agreement

    model = load_model(model_name) if isinstance(model_name, str) else model_name  # a name, or a model
    model_name = model_name if isinstance(model_name, str) else model.cfg.model_name
    tcs = load_transcoders(transcoders)
    prompts = openings(model, n_prompts, n_tok)
    attribute(model, tcs, prompts[0], max_feature_nodes=min(cap, 64))  # warm-up
    rows, preds, meas, frozen = [], [], [], []
    for p in prompts:
        t0 = time.time()
        gc = attribute(model, tcs, p, max_feature_nodes=cap)
        cap_s = time.time() - t0
        t0 = time.time()
        g = attribute(model, tcs, p) if full else gc  # without the full graph, every check runs on the capped one
        full_s = time.time() - t0 if full else None
        subs = {c: gc.first_rows(c).scores for c in sub_caps if c < cap}
        check = ablation_check(model, tcs, g, n_top)
        preds += check["predicted"]
        meas += check["measured"]
        frozen += check["measured_frozen"]
        rows.append({"prompt": p, "n_pos": g.n_pos, "n_features": g.n_features,
                     "full_s": None if full_s is None else round(full_s, 3),
                     "cap_s": round(cap_s, 3), **{f"full_{k}": v for k, v in g.scores.items()},
                     **{f"cap_{k}": v for k, v in gc.scores.items()}, "ablation_spearman": check["spearman"],
                     "ablation_spearman_frozen": check["spearman_frozen"],
                     "virtual_spearman": virtual_weight_agreement(tcs, g, 100), "top_logit": g.info["logit_strs"][0],
                     **{f"cap{c}_{k}": v for c, sc in subs.items() for k, v in sc.items()}})

    def summary(key):
        vals = [r[key] for r in rows]
        if None in vals:
            return None
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    return {"model": model_name, "transcoders": str(transcoders), "n_prompts": len(rows), "n_tok": n_tok,
            "n_top": n_top, "cap": cap, "threads": torch.get_num_threads(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            **{k: summary(k) for k in ("full_s", "cap_s", "n_features", "full_replacement", "full_completeness",
                                       "cap_replacement", "cap_completeness", "ablation_spearman", "ablation_spearman_frozen",
                                       "virtual_spearman")},
            "checks_on": "full graph" if full else f"graph capped at {cap} rows",
            "sub_caps": {c: {k: summary(f"cap{c}_{k}") for k in ("replacement", "completeness")} for c in sub_caps
                         if c < cap},
            "ablation_spearman_pooled": spearman(torch.tensor(preds), torch.tensor(meas)),
            "ablation_spearman_frozen_pooled": spearman(torch.tensor(preds), torch.tensor(frozen)), "per_prompt": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="austen-dense")
    ap.add_argument("--transcoders", type=Path, required=True, help="directory from `steerscope transcoders`")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--n-tok", type=int, default=16, help="tokens per prompt (BOS included)")
    ap.add_argument("--n-top", type=int, default=10, help="features ablated per prompt (most influential first)")
    ap.add_argument("--cap", type=int, default=1000, help="max_feature_nodes of the capped graph")
    ap.add_argument("--no-full", dest="full", action="store_false",
                    help="skip the uncapped graph (SmolLM2: ~15k feature rows); checks then run on the capped one")
    ap.add_argument("--sub-caps", default="", help="comma-separated smaller caps whose scores are read off the "
                    "capped graph (Graph.first_rows; exact for multiples of the batch size, 64)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args()
    res = run(a.model, a.transcoders, a.prompts, a.n_tok, a.n_top, a.cap, a.full,
              tuple(int(c) for c in a.sub_caps.split(",") if c.strip()))
    text = json.dumps(res, indent=2)
    if a.out:
        a.out.write_text(text)
    print(json.dumps({k: v for k, v in res.items() if k != "per_prompt"}, indent=2))


if __name__ == "__main__":
    main()
