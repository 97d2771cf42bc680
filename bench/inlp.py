"""INLP on a real model: erase speech vs narration at a middle layer, then measure what is gone and what it costs.

The concept is labelled from the text alone (``char_states``, ``token_labels``): a token is *speech* when it
lies between an opening and a closing double quote (``"``, or curly quotes) of its paragraph, *narration*
otherwise. A paragraph starts in narration (a newline closes any open quote: Austen's multi-paragraph speeches
reopen the quote at each paragraph); tokens holding a quote mark themselves, whitespace-only tokens and the
first token of every context (the attention sink) carry no label. Contexts are ``--n-ctx`` tokens, each the
fixed context-start token (BOS, or SmolLM2's ``<|endoftext|>``) followed by Austen paragraphs from a
paragraph start, so the model always sees where the current quote opened. The residual at a position must
encode "am I inside a quotation?" to predict the closing quote and the register of the next word.

1. Data: contexts from the train split in a seeded order, up to ``--per-context`` rows of each class per
   context, balanced to ``--rows`` rows; the same from the test split (``--test-rows``) for the held-out probes.
2. ``INLP.fit`` on the train rows (``--n-iter`` logistic probes): dev accuracy per iteration, the majority
   baseline, the rank removed.
3. Fresh probes, trained on the train rows and scored on the test rows, before and after the projection and
   after a random projection of the same rank (the honest number): a logistic probe (what INLP guards
   against) and a one-hidden-layer MLP (what it does not); the share of test-row activation variance kept.
4. LM loss on test-split contexts (``--loss-tokens``): mean next-token cross-entropy in nats (the prediction
   made at the context-start token left out), with the projection at the site at every position (mode
   "all") and without, overall and by the target token's class (speech, narration, quote marks); and the same
   for ``--n-random`` seeded random projections of the same rank, so the cost is measured against removing
   arbitrary directions.
5. Generation: the prompts of ``bench/data/inlp_prompts.json`` (some end inside an open quote), greedy,
   ``--new-tokens`` tokens, unsteered, with the INLP projection and with the first random projection (mode
   "all"); the texts and the share of labelled generated tokens that are speech.

    python -m bench.inlp                              # SmolLM2-135M-Instruct, blocks.15.hook_resid_post
    python -m bench.inlp --rows 1000 --test-rows 500 --loss-tokens 1016 --new-tokens 10     # a quick look

SmolLM2-135M-Instruct is the packaged Q4_1 GGUF, dequantized to float32 on load. Prints one JSON object
(``--out`` also writes it to a file); ``times_s`` holds the wall time of each part.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from probe.errors import SteerscopeError

PROMPTS_FILE = Path(__file__).parent / "data" / "inlp_prompts.json"
TOGGLE, OPEN, CLOSE = '"', "\u201c", "\u201d"
QUOTES = TOGGLE + OPEN + CLOSE
NARRATION, SPEECH, QUOTE, UNLABELLED = 0, 1, 2, -1  # token labels; INLP sees NARRATION and SPEECH rows only
GROUPS = {"narration": NARRATION, "speech": SPEECH, "quote": QUOTE}


# --- the concept ---------------------------------------------------------------------------------

def char_states(text: str) -> list[bool]:
    """Per character: True when it is inside a quotation. A quote mark itself counts as outside; a newline
    closes any open quotation; ``"`` toggles, curly quotes open and close."""
    states, inside = [], False
    for ch in text:
        if ch == "\n" or ch == CLOSE or (ch == TOGGLE and inside):
            inside = False
        elif ch == OPEN or ch == TOGGLE:
            inside = True
            states.append(False)
            continue
        states.append(inside)
    return states


def token_labels(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """One label per token (character ``offsets`` into ``text``): QUOTE when it holds a quote mark,
    UNLABELLED when it is only whitespace, else SPEECH or NARRATION by its first non-space character."""
    states = char_states(text)
    labels = []
    for s, e in offsets:
        chars = text[s:e]
        if any(c in QUOTES for c in chars):
            labels.append(QUOTE)
        elif not chars.strip():
            labels.append(UNLABELLED)
        else:
            first = s + next(i for i, c in enumerate(chars) if not c.isspace())
            labels.append(SPEECH if states[first] else NARRATION)
    return labels


def paragraphs(texts: Sequence[str]) -> list[str]:
    return [p.strip() for t in texts for p in t.split("\n\n") if p.strip()]


def contexts(model, texts: Sequence[str], n_ctx: int, seed: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    """(tokens [n_ctx], labels [n_ctx]) of contexts that start at paragraph starts and do not overlap, in a
    seeded order (``seed=None``: corpus order). Position 0 is the context-start token (UNLABELLED)."""
    from probe.tokens import context_start_id, has_bos

    tok, body = model.tokenizer, n_ctx - 1
    paras = paragraphs(texts)
    counts = [len(ids) for ids in tok(paras, add_special_tokens=False)["input_ids"]] if paras else []
    spans, i = [], 0
    while i < len(paras):
        j, total = i, 0
        while j < len(paras) and total < body + 8:  # a margin: joining paragraphs can merge a token or two
            total, j = total + counts[j] + 2, j + 1
        if total >= body + 8:
            spans.append((i, j))
        i = j
    order = range(len(spans)) if seed is None else np.random.default_rng(seed).permutation(len(spans))
    start = context_start_id(tok, has_bos(model))
    for k in order:
        text = "\n\n".join(paras[spans[k][0]:spans[k][1]])
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) < body:
            continue
        labels = token_labels(text, enc["offset_mapping"][:body])
        yield (torch.tensor([start, *enc["input_ids"][:body]]), torch.tensor([UNLABELLED, *labels]))


def batches(items: Iterator[tuple[Tensor, Tensor]], size: int) -> Iterator[tuple[Tensor, Tensor]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield torch.stack([c[0] for c in chunk]), torch.stack([c[1] for c in chunk])
            chunk = []
    if chunk:
        yield torch.stack([c[0] for c in chunk]), torch.stack([c[1] for c in chunk])


# --- forwards (transformers' twin when the model has one: probe.twin) ----------------------------

def site_acts(model, twin, tokens: Tensor, site: str) -> Tensor:
    """[B, T, d] float32 activations at ``site`` (the forward stops there)."""
    from probe.forward import forward_to, stop_layer
    from probe.hooks import capture

    tokens = tokens.to(model.cfg.device)
    with torch.no_grad():
        if twin is not None:
            with twin.capture([site]) as acts:
                twin.forward(tokens, stop_after=site)
        else:
            with capture(model, [site]) as acts:
                forward_to(model, tokens, stop_layer(model, [site]))
    return acts[site].float().cpu()


def logits_of(model, twin, tokens: Tensor) -> Tensor:
    tokens = tokens.to(model.cfg.device)
    if twin is not None:
        return twin.forward(tokens)
    return model(tokens, attention_mask=torch.ones_like(tokens))  # no padding: the start token may be the pad id


def collect_rows(model, twin, site: str, ctxs, n_rows: int, per_context: int, batch_size: int,
                 seed: int) -> tuple[Tensor, np.ndarray, int]:
    """Balanced (X [n, d], y [n], contexts read): up to ``per_context`` rows of each class per context."""
    rng = np.random.default_rng(seed)
    got: dict[int, list[Tensor]] = {NARRATION: [], SPEECH: []}
    have, n_ctx_read = dict.fromkeys(got, 0), 0
    for tokens, labels in batches(ctxs, batch_size):
        acts = site_acts(model, twin, tokens, site)
        n_ctx_read += len(tokens)
        for b in range(len(tokens)):
            for c in got:
                pos = np.flatnonzero(labels[b].numpy() == c)
                pick = torch.from_numpy(np.sort(rng.choice(pos, min(per_context, len(pos)), replace=False)))
                got[c].append(acts[b, pick])
                have[c] += len(pick)
        if min(have.values()) >= n_rows // 2:
            break
    n = min(min(have.values()), n_rows // 2)
    if n == 0:
        raise SteerscopeError(f"the text gave no {'speech' if have[SPEECH] == 0 else 'narration'} rows: "
                              "give more text, with and without double quotes")
    X = torch.cat([torch.cat(got[NARRATION])[:n], torch.cat(got[SPEECH])[:n]])
    return X, np.repeat([NARRATION, SPEECH], n), n_ctx_read


# --- measurements --------------------------------------------------------------------------------

def random_projection(erasure, site: str, seed: int):
    """A projection removing ``erasure.rank`` seeded random orthonormal directions, centred on the same mean."""
    from steering.inlp import Projection

    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(erasure.d, erasure.rank, generator=g, dtype=torch.float64))
    P = torch.eye(erasure.d, dtype=torch.float64) - Q @ Q.T
    return Projection(site, P.float(), erasure.mean, {"method": "random", "rank": erasure.rank, "seed": seed})


def fresh_probes(Xtr: Tensor, ytr: np.ndarray, Xte: Tensor, yte: np.ndarray, seed: int) -> dict[str, float]:
    """Test accuracy of a logistic probe (raw activations, as INLP's) and of an MLP probe (standardised)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Xtr, Xte = Xtr.double().numpy(), Xte.double().numpy()
    logistic = LogisticRegression(max_iter=2000, random_state=seed).fit(Xtr, ytr)
    mlp = make_pipeline(StandardScaler(), MLPClassifier((256,), max_iter=300, early_stopping=True,
                                                        random_state=seed)).fit(Xtr, ytr)
    return {"logistic": round(float(logistic.score(Xte, yte)), 4), "mlp": round(float(mlp.score(Xte, yte)), 4)}


def variance_kept(X: Tensor, proj) -> float:
    """Share of the total variance of X [n, d] left after ``proj``."""
    Y = proj.apply(X.double())
    return round(float(Y.var(0).sum() / X.double().var(0).sum()), 4)


def lm_loss(model, twin, tokens: Tensor, labels: Tensor, batch_size: int, proj=None) -> dict[str, float]:
    """Mean next-token CE (nats) over the contexts, with ``proj`` at every position when given; overall and
    by the class of the target token. The prediction made at the context-start token is left out."""
    from steering.apply import steer

    total = {k: 0.0 for k in ("all", *GROUPS)}
    count = dict.fromkeys(total, 0)
    for i in range(0, len(tokens), batch_size):
        tok, lab = tokens[i:i + batch_size], labels[i:i + batch_size, 2:]
        with torch.no_grad(), steer(model, [proj] if proj is not None else [], mode="all", twin=twin):
            logits = logits_of(model, twin, tok)[:, 1:-1].float().cpu()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tok[:, 2:].flatten(), reduction="none")
        total["all"], count["all"] = total["all"] + float(ce.sum()), count["all"] + ce.numel()
        for name, c in GROUPS.items():
            keep = lab.flatten() == c
            total[name], count[name] = total[name] + float(ce[keep].sum()), count[name] + int(keep.sum())
    return {k: round(total[k] / count[k], 4) if count[k] else float("nan") for k in total} | \
        {f"n_{k}": count[k] for k in total}


def speech_share(prompt: str, text: str, tokenizer) -> tuple[int, int]:
    """(speech tokens, labelled tokens) among the generated tokens, the quote state carried over from the prompt."""
    full = prompt + text
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    new = [lab for (s, _), lab in zip(enc["offset_mapping"], token_labels(full, enc["offset_mapping"]), strict=True)
           if s >= len(prompt) and lab in (NARRATION, SPEECH)]
    return sum(lab == SPEECH for lab in new), len(new)


def generations(model, arms: dict, prompts: dict[str, list[str]], new_tokens: int) -> dict:
    """Greedy continuations of every prompt under each arm; per arm the texts and the speech share by group."""
    from steering.apply import generate

    flat = [(group, p) for group, ps in prompts.items() for p in ps]
    out = {}
    for arm, steer in arms.items():
        texts = generate(model, [p for _, p in flat], steer=steer, mode="all", max_new_tokens=new_tokens)
        share = {}
        for group in prompts:
            counts = [speech_share(p, t, model.tokenizer) for (g, p), t in zip(flat, texts, strict=True) if g == group]
            s, n = sum(c[0] for c in counts), sum(c[1] for c in counts)
            share[group] = round(s / n, 4) if n else None
        out[arm] = {"speech_share": share, "texts": [{"group": g, "prompt": p, "text": t}
                                                     for (g, p), t in zip(flat, texts, strict=True)]}
    return out


# --- the run -------------------------------------------------------------------------------------

def run(model="smollm2-135m-instruct", site: str = "blocks.15.hook_resid_post", *, rows: int = 4000,
        test_rows: int = 2000, per_context: int = 16, n_ctx: int = 128, n_iter: int = 15, loss_tokens: int = 4064,
        n_random: int = 3, new_tokens: int = 30, batch_size: int = 8, seed: int = 0,
        train_texts: Sequence[str] | None = None, test_texts: Sequence[str] | None = None,
        prompts: dict[str, list[str]] | None = None) -> dict:
    """Every measurement of the module docstring; ``model`` is a name for ``load_model`` or a loaded model,
    the texts default to the Austen train and test splits, the prompts to ``bench/data/inlp_prompts.json``."""
    from probe.corpus import load_corpus
    from probe.gguf import PACKAGED
    from probe.models import load_model
    from probe.sites import resolve_one
    from probe.twin import twin_of
    from steering.inlp import INLP

    times, t0 = {}, time.perf_counter()
    name = model if isinstance(model, str) else getattr(model.cfg, "model_name", type(model).__name__)
    model = load_model(model) if isinstance(model, str) else model
    site = resolve_one(model, site)
    twin = twin_of(model, [site])
    train_texts = load_corpus("austen", split="train") if train_texts is None else train_texts
    test_texts = load_corpus("austen", split="test") if test_texts is None else test_texts
    prompts = prompts or {k: v for k, v in json.loads(PROMPTS_FILE.read_text()).items() if k != "about"}
    times["load"], t = _lap(t0), time.perf_counter()

    Xtr, ytr, ctx_tr = collect_rows(model, twin, site, contexts(model, train_texts, n_ctx, seed), rows,
                                    per_context, batch_size, seed)
    Xte, yte, ctx_te = collect_rows(model, twin, site, contexts(model, test_texts, n_ctx, seed + 1), test_rows,
                                    per_context, batch_size, seed + 1)
    times["activations"], t = _lap(t), time.perf_counter()

    erasure = INLP.fit(Xtr, ytr, n_iter=n_iter, seed=seed)
    proj = erasure.at(site)
    randoms = [random_projection(erasure, site, seed + 1000 + k) for k in range(n_random)]
    times["inlp_fit"], t = _lap(t), time.perf_counter()

    probes = {"raw": fresh_probes(Xtr, ytr, Xte, yte, seed),
              "inlp": fresh_probes(proj.apply(Xtr), ytr, proj.apply(Xte), yte, seed)}
    if randoms:
        probes["random"] = fresh_probes(randoms[0].apply(Xtr), ytr, randoms[0].apply(Xte), yte, seed)
    kept = {"inlp": variance_kept(Xte, proj), "random": [variance_kept(Xte, r) for r in randoms]}
    times["fresh_probes"], t = _lap(t), time.perf_counter()

    loss = loss_section(model, twin, test_texts, n_ctx, loss_tokens, batch_size, proj, randoms)
    times["lm_loss"], t = _lap(t), time.perf_counter()

    arms = {"none": [], "inlp": [proj], **({"random": [randoms[0]]} if randoms else {})}
    gen = generations(model, arms, prompts, new_tokens)
    times["generation"] = _lap(t)
    times["total"] = _lap(t0)
    return {"model": name, "weights": _weights_note(name, PACKAGED), "site": site, "concept": "speech vs narration",
            "n_ctx": n_ctx, "seed": seed, "threads": torch.get_num_threads(), "twin": twin is not None,
            "data": {"train_rows": len(ytr), "train_contexts": ctx_tr, "test_rows": len(yte), "test_contexts": ctx_te,
                     "per_context": per_context},
            "inlp": {"dev_accuracy_by_iteration": [round(a, 4) for a in erasure.accuracies],
                     "majority_baseline": round(erasure.baseline, 4), "rank_removed": erasure.rank,
                     "converged": erasure.converged, "n_iter": n_iter, "stop_at": erasure.provenance["stop_at"]},
            "heldout_probe_accuracy": probes, "variance_kept": kept, "lm_loss_nats": loss, "generation": gen,
            "times_s": times}


def loss_section(model, twin, texts, n_ctx: int, loss_tokens: int, batch_size: int, proj, randoms) -> dict:
    """CE without and with each projection on the first ``loss_tokens // (n_ctx - 1)`` test contexts (corpus order)."""
    ctxs = list(_take(contexts(model, texts, n_ctx, None), max(1, loss_tokens // (n_ctx - 1))))
    tokens, labels = torch.stack([c[0] for c in ctxs]), torch.stack([c[1] for c in ctxs])
    base = lm_loss(model, twin, tokens, labels, batch_size)
    inlp = lm_loss(model, twin, tokens, labels, batch_size, proj)
    rand = [lm_loss(model, twin, tokens, labels, batch_size, r) for r in randoms]
    out = {"contexts": len(tokens), "predictions": base["n_all"], "none": base, "inlp": inlp,
           "delta_inlp": {k: round(inlp[k] - base[k], 4) for k in ("all", *GROUPS)}}
    if rand:
        out["random"] = rand
        out["delta_random_mean"] = {k: round(float(np.mean([r[k] for r in rand])) - base[k], 4)
                                    for k in ("all", *GROUPS)}
    return out


def _take(it: Iterator, n: int) -> Iterator:
    for _, item in zip(range(n), it, strict=False):
        yield item


def _lap(t: float) -> float:
    return round(time.perf_counter() - t, 2)


def _weights_note(name: str, packaged: dict) -> str:
    if name.lower() in packaged:
        return f"{packaged[name.lower()][1]} (packaged GGUF) dequantized to float32 on load"
    return "as loaded"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a load_model name, GGUF file or HF directory")
    ap.add_argument("--site", default="blocks.15.hook_resid_post", help="residual site to erase at")
    ap.add_argument("--rows", type=int, default=4000, help="balanced train-split rows for INLP")
    ap.add_argument("--test-rows", type=int, default=2000, help="balanced test-split rows for the fresh probes")
    ap.add_argument("--per-context", type=int, default=16, help="at most this many rows of each class per context")
    ap.add_argument("--n-ctx", type=int, default=128, help="context length, the context-start token included")
    ap.add_argument("--n-iter", type=int, default=15, help="INLP iterations (probes) at most")
    ap.add_argument("--loss-tokens", type=int, default=4064, help="test-split tokens for the LM loss")
    ap.add_argument("--n-random", type=int, default=3, help="random projections of the same rank (the control)")
    ap.add_argument("--new-tokens", type=int, default=30, help="greedy tokens generated per prompt")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args(argv)
    res = run(a.model, a.site, rows=a.rows, test_rows=a.test_rows, per_context=a.per_context, n_ctx=a.n_ctx,
              n_iter=a.n_iter, loss_tokens=a.loss_tokens, n_random=a.n_random, new_tokens=a.new_tokens,
              batch_size=a.batch_size, seed=a.seed)
    text = json.dumps(res, indent=2, ensure_ascii=False)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    print(text)
    return res


if __name__ == "__main__":
    main()
