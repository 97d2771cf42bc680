"""Codebook features (Tamkin et al.) on austen-dense: the test-loss cost, what the codes fire for, and steering
by activating a code.

1. Fine-tune (``saes.codebook.fine_tune``): a codebook of ``--n-codes`` codes, ``--k`` active, on every
   layer's MLP output; the model and the codes trained together on the LM loss; with ``--control`` the same
   fine-tune without codebooks, so the bottleneck's cost is told apart from what fine-tuning alone does.
   Test loss on the whole test split.
2. What the codes fire for, on ``--contexts`` test-split contexts of 128 tokens starting at paragraphs
   (``bench.inlp.contexts``: every token labelled speech, narration, quote mark or whitespace): per code, its
   firings, its most common current token and that token's share, and the share of speech among its labelled
   firings. *Token codes*: >= 10 firings, >= 90 % on one token. *Speech codes* / *narration codes*: >= 10
   labelled firings, >= 95 % speech / narration while the base rate of speech is printed beside.
3. Steering: for ``--concept`` (a word list of ``steering.compare.AUSTEN_CONCEPTS``), the code whose firings
   most often precede a concept word (precision of "next token is a concept word", >= 10 firings, chosen on
   the *val* split), activated at every position (its vector added after the bottleneck, ``mode="all"``) at
   ``--coeffs`` times its own norm; the control is a random live code of the same layer at the same
   coefficients. Measured like the other steering rows (``steering.effects.coefficient_sweep``): topic-word
   frequency ratio with its ~95 % band, off-target perplexity ratio, next-token KL; 16 prompts (test-split
   paragraph openings) x ``--samples`` continuations x 40 tokens per coefficient.

    python -m bench.codebook --out runs/codebook --control          # fine-tune, then measure
    python -m bench.codebook --out runs/codebook --reuse            # measure an existing fine-tune

Prints one JSON object (``--json`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from bench.report import emit
from probe.errors import SteerscopeError


def split_contexts(model, n: int, split: str = "test", n_ctx: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    from bench.inlp import contexts
    from probe import load_corpus

    toks, labels = [], []
    for t, lab in contexts(model, load_corpus("austen", split), n_ctx, seed=0):
        toks.append(t)
        labels.append(lab)
        if len(toks) == n:
            break
    if not toks:
        raise SteerscopeError(f"no {n_ctx}-token contexts in the {split} split")
    return torch.stack(toks), torch.stack(labels)


def code_table(model, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, dict]:
    """Per site: each live code's firings, top current token and its share, and speech share of labelled firings."""
    from bench.inlp import NARRATION, SPEECH
    from saes.codebook import code_ids

    V = model.cfg.d_vocab
    out = {}
    for site, ids in code_ids(model, tokens).items():
        n = model.codebooks[site].n_codes
        ids = ids[:, 1:]  # the context-start token is not text
        tok = tokens[:, 1:, None].expand_as(ids).reshape(-1)
        lab = labels[:, 1:, None].expand_as(ids).reshape(-1)
        flat = ids.reshape(-1)
        tc = torch.zeros(n * V).index_add_(0, flat * V + tok, torch.ones(flat.numel())).view(n, V)
        fires = tc.sum(1)
        sp = torch.zeros(n).index_add_(0, flat, (lab == SPEECH).float())
        na = torch.zeros(n).index_add_(0, flat, (lab == NARRATION).float())
        top_share, top_tok = tc.max(1)
        rows = []
        for c in (fires > 0).nonzero().flatten().tolist():
            labelled = float(sp[c] + na[c])
            rows.append({"code": c, "fires": int(fires[c]), "top_token": model.tokenizer.decode([int(top_tok[c])]),
                         "top_token_share": round(float(top_share[c] / fires[c]), 3),
                         "labelled": int(labelled), "speech_share": round(float(sp[c]) / labelled, 3) if labelled else None})
        base = float((labels[:, 1:] == SPEECH).sum()) / max(1, int(((labels[:, 1:] == SPEECH) | (labels[:, 1:] == NARRATION)).sum()))
        tokc = [r for r in rows if r["fires"] >= 10 and r["top_token_share"] >= 0.9]
        spc = [r for r in rows if r["labelled"] >= 10 and r["speech_share"] >= 0.95]
        nac = [r for r in rows if r["labelled"] >= 10 and r["speech_share"] <= 0.05]
        out[site] = {"live_codes": len(rows), "n_codes": n, "speech_base_rate": round(base, 3),
                     "token_codes": len(tokc), "speech_codes": len(spc), "narration_codes": len(nac),
                     "examples": {"token": sorted(tokc, key=lambda r: -r["fires"])[:5],
                                  "speech": sorted(spc, key=lambda r: -r["labelled"])[:5],
                                  "narration": sorted(nac, key=lambda r: -r["labelled"])[:3]}}
    return out


def concept_code(model, words: list[str], n_contexts: int) -> dict:
    """The (site, code) whose firings most often precede a concept word, on val-split contexts."""
    from saes.codebook import code_ids
    from steering.effects import token_id

    tokens, _ = split_contexts(model, n_contexts, split="val")
    word_ids = torch.tensor([token_id(model, " " + w) for w in words])
    nxt = torch.isin(tokens[:, 1:], word_ids)  # next token is a concept word, for positions 0..T-2
    best = None
    for site, ids in code_ids(model, tokens).items():
        n = model.codebooks[site].n_codes
        ids = ids[:, :-1].reshape(-1, ids.shape[-1])
        hit = nxt.reshape(-1, 1).expand_as(ids).reshape(-1).float()
        fires = torch.zeros(n).index_add_(0, ids.reshape(-1), torch.ones(ids.numel()))
        hits = torch.zeros(n).index_add_(0, ids.reshape(-1), hit)
        prec = torch.where(fires >= 10, hits / fires.clamp_min(1), torch.zeros(n))
        c = int(prec.argmax())
        if best is None or float(prec[c]) > best["precision"]:
            best = {"site": site, "code": c, "precision": round(float(prec[c]), 4), "fires": int(fires[c]),
                    "base_rate": round(float(nxt.float().mean()), 4), "live": (fires > 0).nonzero().flatten().tolist()}
    return best


def steer_rows(model, out: Path, pick: dict, words: list[str], coeffs: list[float], samples: int, seed: int,
               n_prompts: int = 16, new_tokens: int = 40) -> dict:
    from app.commands_steer import _openings
    from probe import load_corpus
    from saes.base import load_dictionary
    from steering.effects import coefficient_sweep
    from steering.vectors import SteeringVector

    d = load_dictionary(out / "dictionaries" / pick["site"])
    prompts, off = _openings(n_prompts), [doc[:400] for doc in load_corpus("austen", split="val")[:8]]
    live = [c for c in pick["live"] if c != pick["code"]]
    rand = random.Random(seed).choice(live)
    res = {}
    for name, code in (("concept_code", pick["code"]), ("random_code", rand)):
        norm = float(d.W_dec[code].norm())
        v = SteeringVector.from_feature(d, code, coeff=norm)
        rows = coefficient_sweep(model, v, [c * norm for c in coeffs], prompts, words, off, samples=samples,
                                 max_new_tokens=new_tokens, seed=seed, mode="all")
        res[name] = {"code": code, "norm": round(norm, 3),
                     "rows": [{"times_code": c, **{k: (round(x, 4) if isinstance(x, float) else x)
                                                   for k, x in r._asdict().items()}} for c, r in zip(coeffs, rows, strict=True)]}
    res["prompts"], res["samples_per_prompt"], res["new_tokens"] = len(prompts), samples, new_tokens
    return res


def run(out: Path, reuse: bool, n_codes: int, k: int, n_tokens: int, control: bool, contexts: int, concept: str,
        coeffs: list[float], samples: int, seed: int, base: str = "austen-dense", eval_contexts: int | None = None,
        n_prompts: int = 16, new_tokens: int = 40, progress: bool = True) -> dict:
    from probe.models import load_model
    from saes.codebook import fine_tune
    from steering.compare import AUSTEN_CONCEPTS

    if concept not in AUSTEN_CONCEPTS:
        raise SteerscopeError(f"unknown concept {concept!r}; choose one of {', '.join(AUSTEN_CONCEPTS)}")
    t0 = time.perf_counter()
    card_file = out / "card.json"
    if reuse:
        card = json.loads(card_file.read_text()) if card_file.exists() else {}
        if "test" not in card:
            raise SteerscopeError(f"{out} holds no finished codebook fine-tune to reuse; run without --reuse")
    else:
        card = fine_tune(base, out, None, n_codes, k, n_tokens, control_run=control, seed=seed,
                         eval_contexts=eval_contexts, progress=progress)
    t1 = time.perf_counter()
    model = load_model(str(out))
    tokens, labels = split_contexts(model, contexts)
    table = code_table(model, tokens, labels)
    words = AUSTEN_CONCEPTS[concept]
    pick = concept_code(model, words, contexts)
    steering = steer_rows(model, out, pick, words, coeffs, samples, seed, n_prompts, new_tokens)
    return {"model": card.get("name"), "sites": card.get("sites"), "n_codes": card.get("n_codes"), "k": card.get("k"),
            "fine_tune": {"hyperparameters": card.get("hyperparameters"), "test": card.get("test"),
                          "code_usage_test": card.get("code_usage"), "wall_time_s": card.get("wall_time_s"),
                          "reused": reuse},
            "codes_on_test_contexts": {"contexts": len(tokens), "tokens_per_context": tokens.shape[1], **table},
            "steering": {"concept": concept, "words": words, "chosen": {k2: v for k2, v in pick.items() if k2 != "live"},
                         **steering},
            "measure_seconds": round(time.perf_counter() - t1, 1), "wall_seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/codebook"), help="the codebook model directory")
    p.add_argument("--base", default="austen-dense", help="the zoo model to fine-tune (a name or a directory)")
    p.add_argument("--reuse", action="store_true", help="measure the fine-tune already in --out")
    p.add_argument("--n-codes", type=int, default=1024)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--n-tokens", type=int, default=400_000)
    p.add_argument("--control", action="store_true", help="also fine-tune without codebooks")
    p.add_argument("--contexts", type=int, default=64, help="128-token contexts for the code analysis")
    p.add_argument("--concept", default="family")
    p.add_argument("--coeffs", default="0,1,2,4,8", help="coefficients in units of the code's own norm")
    p.add_argument("--samples", type=int, default=8, help="sampled continuations per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args(argv)
    coeffs = [float(c) for c in a.coeffs.split(",")]
    emit(run(a.out, a.reuse, a.n_codes, a.k, a.n_tokens, a.control, a.contexts, a.concept, coeffs, a.samples, a.seed, a.base),
         a.json)


if __name__ == "__main__":
    main()
