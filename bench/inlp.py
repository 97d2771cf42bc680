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
   made at the context-start token left out), overall and by the target token's class (speech, narration,
   quote marks), without and with the projection at the site at every position (``steer``, mode "all"), and
   again with the first position spared (its residual is the attention sink's, two orders of magnitude
   larger than the others': a projection fitted on ordinary tokens moves it far); and the same for
   ``--n-random`` seeded random projections of the same rank, so the cost is measured against removing
   arbitrary directions.
5. Generation: the prompts of ``bench/data/inlp_prompts.json`` (some end inside an open quote), greedy,
   ``--new-tokens`` tokens: unsteered, with the INLP projection and with the first random projection, each at
   every position (``generate``, mode "all") and with the prompt's first token (the sink) spared
   (``greedy_spared``); the texts, the share of labelled generated tokens that are speech, and the rate of
   first/second-person words (speech's register, which a continuation can take without any quote mark).
6. The wall time of each part (``times_s``).

    python -m bench.inlp                              # SmolLM2-135M-Instruct, blocks.15.hook_resid_post
    python -m bench.inlp --rows 1000 --test-rows 500 --loss-tokens 1016 --new-tokens 10     # a quick look

SmolLM2-135M-Instruct is the packaged Q4_1 GGUF, dequantized to float32 on load. Prints one JSON object
(``--out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
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


def projected(model, twin, proj, spare_first: bool):
    """A context in which the forward passes run with ``proj`` at every position (``steer``, mode "all"), or
    at every position but the first (``spare_first``: the attention sink, whose residual norm dwarfs the
    others', keeps its own activation); no-op when ``proj`` is None. Full contexts only (no KV cache)."""
    from probe.hooks import hooks
    from steering.apply import steer

    if proj is None:
        return contextlib.nullcontext()
    if not spare_first:
        return steer(model, [proj], mode="all", twin=twin)

    def fn(t: Tensor, hook) -> Tensor:
        out = proj.apply(t)
        out[:, 0] = t[:, 0]
        return out

    return twin.hooks([(proj.site, fn)]) if twin is not None else hooks(model, [(proj.site, fn)])


def lm_loss(model, twin, tokens: Tensor, labels: Tensor, batch_size: int, proj=None,
            spare_first: bool = False) -> dict[str, float]:
    """Mean next-token CE (nats) over the contexts, under ``projected(...)``; overall and by the class of the
    target token. The prediction made at the context-start token is left out."""
    total = {k: 0.0 for k in ("all", *GROUPS)}
    count = dict.fromkeys(total, 0)
    for i in range(0, len(tokens), batch_size):
        tok, lab = tokens[i:i + batch_size], labels[i:i + batch_size, 2:].flatten()
        with torch.no_grad(), projected(model, twin, proj, spare_first):
            logits = logits_of(model, twin, tok)[:, 1:-1].float().cpu()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tok[:, 2:].flatten(), reduction="none")
        total["all"], count["all"] = total["all"] + float(ce.sum()), count["all"] + ce.numel()
        for name, c in GROUPS.items():
            total[name], count[name] = total[name] + float(ce[lab == c].sum()), count[name] + int((lab == c).sum())
    return {k: round(total[k] / count[k], 4) if count[k] else float("nan") for k in total}


def speech_share(prompt: str, text: str, tokenizer) -> tuple[int, int]:
    """(speech tokens, labelled tokens) among the generated tokens, the quote state carried over from the prompt."""
    full = prompt + text
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    new = [lab for (s, _), lab in zip(enc["offset_mapping"], token_labels(full, enc["offset_mapping"]), strict=True)
           if s >= len(prompt) and lab in (NARRATION, SPEECH)]
    return sum(lab == SPEECH for lab in new), len(new)


def person_rate(text: str, words: set[str]) -> tuple[int, int]:
    """(first/second-person words, words) in ``text``: the register of speech, which needs no quote marks."""
    found = re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())
    return sum(w in words for w in found), len(found)


def greedy_spared(model, twin, prompts: Sequence[str], proj, new_tokens: int, spare_first: bool = True) -> list[str]:
    """Greedy continuations under ``projected(..., spare_first)``, one prompt at a time and without a KV cache
    (each step recomputes the whole sequence, so position 0 is always the prompt's first token, the sink).
    With ``spare_first=False`` it gives ``generate(..., mode="all")``'s tokens (the test checks it)."""
    from probe.tokens import encode

    eos, texts = model.tokenizer.eos_token_id, []
    for prompt in prompts:
        ids, new = encode(model, prompt)[None], []
        with torch.no_grad(), projected(model, twin, proj, spare_first):
            for _ in range(new_tokens):
                nxt = int(logits_of(model, twin, ids)[0, -1].argmax())
                if nxt == eos:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        texts.append(model.tokenizer.decode(new))
    return texts


def generations(model, twin, arms: dict, prompts: dict[str, list[str]], person_words: set[str],
                new_tokens: int) -> dict:
    """Greedy continuations of every prompt under each arm, ``name -> (projection or None, spare_first)``;
    per arm the texts and, by prompt group, the speech share and the first/second-person word rate."""
    from steering.apply import generate

    flat = [(group, p) for group, ps in prompts.items() for p in ps]
    out = {}
    for arm, (proj, spare) in arms.items():
        if spare:
            texts = greedy_spared(model, twin, [p for _, p in flat], proj, new_tokens)
        else:
            texts = generate(model, [p for _, p in flat], steer=[proj] if proj else [], mode="all",
                             max_new_tokens=new_tokens)
        share, person = {}, {}
        for group in prompts:
            pairs = [(p, t) for (g, p), t in zip(flat, texts, strict=True) if g == group]
            s = [speech_share(p, t, model.tokenizer) for p, t in pairs]
            w = [person_rate(t, person_words) for _, t in pairs]
            share[group] = round(sum(c[0] for c in s) / sum(c[1] for c in s), 4) if sum(c[1] for c in s) else None
            person[group] = round(sum(c[0] for c in w) / sum(c[1] for c in w), 4) if sum(c[1] for c in w) else None
        out[arm] = {"speech_share": share, "person_rate": person,
                    "texts": [{"group": g, "prompt": p, "text": t} for (g, p), t in zip(flat, texts, strict=True)]}
    return out


# --- the run -------------------------------------------------------------------------------------

def run(model="smollm2-135m-instruct", site: str = "blocks.15.hook_resid_post", *, rows: int = 4000,
        test_rows: int = 2000, per_context: int = 16, n_ctx: int = 128, n_iter: int = 20, loss_tokens: int = 8128,
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
    data = json.loads(PROMPTS_FILE.read_text())
    prompts = prompts or {"speech": data["speech"], "narration": data["narration"]}
    person_words = set(data["person_words"])
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

    arms = {"none": (None, False), "inlp": (proj, False), "inlp_sink_spared": (proj, True)}
    if randoms:
        arms |= {"random": (randoms[0], False), "random_sink_spared": (randoms[0], True)}
    gen = generations(model, twin, arms, prompts, person_words, new_tokens)
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
    """CE without and with each projection on the first ``loss_tokens // (n_ctx - 1)`` test contexts (corpus
    order): at every position ("all_positions") and with the first position spared ("sink_spared")."""
    ctxs = list(itertools.islice(contexts(model, texts, n_ctx, None), max(1, loss_tokens // (n_ctx - 1))))
    if not ctxs:
        raise SteerscopeError(f"the test text gives no context of {n_ctx} tokens for the LM loss")
    tokens, labels = torch.stack([c[0] for c in ctxs]), torch.stack([c[1] for c in ctxs])
    base = lm_loss(model, twin, tokens, labels, batch_size)
    flat = labels[:, 2:].flatten()
    out = {"contexts": len(tokens), "predictions": int(flat.numel()),
           "targets": {k: int((flat == c).sum()) for k, c in GROUPS.items()}, "none": base}
    for variant, spare in (("all_positions", False), ("sink_spared", True)):
        inlp = lm_loss(model, twin, tokens, labels, batch_size, proj, spare)
        rand = [lm_loss(model, twin, tokens, labels, batch_size, r, spare) for r in randoms]
        part = {"inlp": inlp, "delta_inlp": _delta(inlp, base)}
        if rand:
            mean = {k: float(np.mean([r[k] for r in rand])) for k in base}
            part |= {"random": rand, "delta_random_mean": _delta(mean, base)}
        out[variant] = part
    return out


def _delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(a[k] - b[k], 4) for k in b}


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
    ap.add_argument("--n-iter", type=int, default=20, help="INLP iterations (probes) at most")
    ap.add_argument("--loss-tokens", type=int, default=8128, help="test-split tokens for the LM loss")
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
