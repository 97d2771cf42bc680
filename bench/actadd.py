"""ActAdd (Turner et al.) with the paper's semantics on a real model, beside the mean-difference vector.

For each pair of ``bench/data/actadd.json`` ("Love" - "Hate", " weddings" - " ", "Anger" - "Calm"):

1. Layer sweep: the ActAdd vector (``SteeringVector.actadd``: the per-position difference of the two prompts'
   residual streams before block L, added on the *prompt pass* to the first T positions, mode "prompt") at one
   coefficient (``--coeff``) at each of ``--layers``; ``--samples`` sampled continuations per prompt
   (temperature 1, top-p 0.95, the same seed in every arm) on 16 prompts: the pair's own prompt from the paper
   and 15 neutral openings.
2. Coefficient sweep at the best layer (the highest lower band of the topic-word frequency ratio in step 1;
   where the unsteered continuations hold no topic word, so no band exists, the most topic words),
   ``--coeffs``, ``--sweep-samples`` continuations per prompt.
3. The mean-difference vector of the same concept at the same site (over the pair's 10 + 10 contrast
   sentences, every token after position 0 averaged: on SmolLM2 position 0 is the sink), unit length, added at every position
   (mode "all") at ``--md-coeffs`` times the mean residual norm there.

Each arm: topic-word frequency ratio (steered / unsteered rate per word, ~95 % band from Poisson counts),
off-target perplexity ratio on 8 neutral paragraphs (ActAdd's injected positions masked; for ActAdd also
"downstream", with the token predicted from the last injected position masked too), next-token KL on
the prompts, and a greedy continuation of the paper's prompt. Norms: the vector's norm (per injected row
for ActAdd) over the mean residual norm at the site on the off-target text (position 0 left out).

On a model whose tokenizer adds no BOS (SmolLM2), position 0 is the attention sink *and* the first content
token: row 0 of an ActAdd vector is the difference of two sinks ("Love" vs "H" of "Hate"), and it lands on
the user prompt's sink. The paper's models prepend a BOS, which makes row 0 exactly zero and puts the first
content difference on the prompt's first real token. No choice keeps both halves of that here (zeroing row 0
would drop the only row of " weddings" - " "), so the vector is used as the method defines it on the model's
own tokens, and the norms are reported apart: row 0 against the residual norm at position 0, the other
rows against the residual norm at the other positions.

    python -m bench.actadd --model smollm2-135m-instruct --json runs/actadd.json

Prints one JSON object (``--json`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bench.report import emit
from probe.errors import SteerscopeError

DATA = Path(__file__).parent / "data" / "actadd.json"


def load_data(path: Path = DATA) -> dict:
    try:
        d = json.loads(Path(path).read_text())
        for p in d["pairs"]:
            missing = {"name", "add", "sub", "prompt", "words", "positive", "negative"} - set(p)
            if missing:
                raise KeyError(f"pair {p.get('name')!r} lacks {sorted(missing)}")
        if not d["prompts"] or not d["off_target"]:
            raise KeyError("prompts and off_target must not be empty")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SteerscopeError(f"{path} is not an ActAdd data file ({type(e).__name__}: {e})") from None
    return d


@torch.no_grad()
def site_rows(model, texts: list[str], site: str) -> list[torch.Tensor]:
    """Per text, the activations [T, d] at ``site`` (callers leave out position 0: a BOS or, without one, the
    attention sink, whose norm is ~100x the others on SmolLM2)."""
    from probe.tokens import encode

    out = []
    for t in texts:
        toks = encode(model, t)
        if len(toks) < 2:
            raise SteerscopeError(f"{t!r} is a single token; the text needs a token after position 0")
        _, cache = model.run_with_cache(toks[None], names_filter=[site])
        out.append(cache[site][0].float().cpu())
    return out


def residual_norms(model, texts: list[str], site: str) -> tuple[float, float]:
    """Mean L2 norm of the activations at ``site``: (at position 0, over the texts' other tokens)."""
    rows = site_rows(model, texts, site)
    return (float(torch.stack([r[0].norm() for r in rows]).mean()),
            float(torch.cat([r[1:].norm(dim=-1) for r in rows]).mean()))


def mean_difference(model, positive: list[str], negative: list[str], site: str):
    """Mean over sentences of their token-mean activation (position 0 left out), positive minus negative, as a
    unit vector; the raw norm goes in the provenance."""
    from steering import SteeringVector

    pos, neg = (torch.stack([r[1:].mean(0) for r in site_rows(model, s, site)]).mean(0) for s in (positive, negative))
    d = pos - neg
    norm = float(d.norm())
    return SteeringVector(site, d / norm, 1.0, {"method": "mean_diff", "position": "mean, position 0 left out",
                                                "n_pos": len(positive), "n_neg": len(negative), "raw_norm": norm})


def actadd_vector(model, pair: dict, layer: int):
    from steering import SteeringVector

    return SteeringVector.actadd(model, pair["add"], pair["sub"], layer=layer, coeff=1.0)


def _row(r, norm_ratio: tuple[float, float | None] | None = None, model=None, v=None, off=None) -> dict:
    """A sweep row as JSON; for an ActAdd vector ``v`` also the off-target perplexity ratio with token T (the one
    predicted from the last injected position) left out too: the effect downstream of the injection."""
    out = {k: ((round(x, 4) if math.isfinite(x) else str(x)) if isinstance(x, float) else x)  # JSON has no inf/nan
           for k, x in r._asdict().items()}
    if norm_ratio is not None:  # per unit coefficient: (row 0 / position-0 norm, other rows / residual norm)
        out["row0_over_position0"] = round(norm_ratio[0] * abs(r.coeff), 4)
        out["norm_over_residual"] = None if norm_ratio[1] is None else round(norm_ratio[1] * abs(r.coeff), 4)
    if v is not None and v.positional:
        from steering.effects import perplexity_ratio

        out["ppl_ratio_downstream"] = round(perplexity_ratio(model, off, [v.with_coeff(r.coeff)], mask_next=True).ratio, 4)
    return out


def greedy(model, prompt: str, v, mode: str, new_tokens: int) -> str:
    from steering import generate

    return generate(model, prompt, steer=[v] if v is not None else (), mode=mode, max_new_tokens=new_tokens)


def run_pair(model, pair: dict, data: dict, layers: list[int], coeff: float, coeffs: list[float],
             md_coeffs: list[float], samples: int, sweep_samples: int, new_tokens: int, seed: int, progress) -> dict:
    from steering.effects import coefficient_sweep, unsteered_continuations

    prompts, words, off = [pair["prompt"], *data["prompts"]], pair["words"], data["off_target"]
    res: dict = {"add": pair["add"], "sub": pair["sub"], "prompt": pair["prompt"], "n_prompts": len(prompts),
                 "greedy_unsteered": greedy(model, pair["prompt"], None, "prompt", new_tokens)}
    base = unsteered_continuations(model, prompts, samples, new_tokens, seed)
    sweep = []
    for L in layers:
        v = actadd_vector(model, pair, L)
        norm0, rnorm = residual_norms(model, off, v.site)
        rows_norm = v.tensor.norm(dim=-1)
        ratio = (float(rows_norm[0]) / norm0, float(rows_norm[1:].mean()) / rnorm if len(rows_norm) > 1 else None)
        (r,) = coefficient_sweep(model, v, [coeff], prompts, words, off, samples=samples, max_new_tokens=new_tokens,
                                 seed=seed, mode="prompt", baseline=base)
        sweep.append({"layer": L, "residual_norm": round(rnorm, 3), "position0_norm": round(norm0, 3),
                      "rows": len(rows_norm), "unit_ratio": ratio, "row_norms": [round(float(x), 3) for x in rows_norm],
                      **_row(r, ratio, model, v, off),
                      "greedy": greedy(model, pair["prompt"], v.with_coeff(coeff), "prompt", new_tokens)})
        progress(f"{pair['name']} layer {L}: ratio {r.freq_ratio:.2f} ({r.freq_ratio_lo:.2f}-{r.freq_ratio_hi:.2f})"
                 f" ppl {r.ppl_ratio:.3f} (downstream {sweep[-1]['ppl_ratio_downstream']:.3f}) kl {r.kl:.3f}")
    # the highest lower band; where no band exists (no topic word in the baseline), the most topic words
    best = max(sweep, key=lambda s: (_num(s["freq_ratio_lo"]), s["topic_words"], _num(s["freq_ratio"])))
    L = best["layer"]
    res["layer_sweep"] = {"coeff": coeff, "samples_per_prompt": samples, "continuations": samples * len(prompts),
                          "rows": sweep}
    res["best_layer"] = L
    v = actadd_vector(model, pair, L)
    ratio = best["unit_ratio"]
    base2 = unsteered_continuations(model, prompts, sweep_samples, new_tokens, seed)
    rows = coefficient_sweep(model, v, coeffs, prompts, words, off, samples=sweep_samples, max_new_tokens=new_tokens,
                             seed=seed, mode="prompt", baseline=base2)
    res["coefficient_sweep"] = {"layer": L, "samples_per_prompt": sweep_samples,
                                "continuations": sweep_samples * len(prompts),
                                "rows": [{**_row(r, ratio, model, v, off), "greedy": greedy(model, pair["prompt"], v.with_coeff(r.coeff),
                                                                             "prompt", new_tokens)} for r in rows]}
    progress(f"{pair['name']} coefficient sweep at layer {L} done")
    unit = mean_difference(model, pair["positive"], pair["negative"], v.site)
    md_norm, rnorm = unit.provenance["raw_norm"], best["residual_norm"]
    md_rows = coefficient_sweep(model, unit, [c * rnorm for c in md_coeffs], prompts, words, off,
                                samples=sweep_samples, max_new_tokens=new_tokens, seed=seed, mode="all", baseline=base2)
    res["mean_difference"] = {"site": unit.site, "raw_norm_over_residual": round(md_norm / rnorm, 4),
                              "samples_per_prompt": sweep_samples, "mode": "all",
                              "rows": [{"times_residual_norm": c, **_row(r),
                                        "greedy": greedy(model, pair["prompt"], unit.with_coeff(r.coeff), "all",
                                                         new_tokens)} for c, r in zip(md_coeffs, md_rows, strict=True)]}
    progress(f"{pair['name']} mean difference done")
    return res


def _num(x) -> float:
    return x if isinstance(x, float | int) else -math.inf


def run(model_name: str, layers: list[int] | None, coeff: float, coeffs: list[float], md_coeffs: list[float],
        samples: int, sweep_samples: int, new_tokens: int, seed: int, pairs: list[str] | None = None,
        data_file: Path = DATA, n_prompts: int | None = None, progress: bool = True) -> dict:
    from probe.models import load_model

    data = load_data(data_file)
    if n_prompts is not None:
        data = {**data, "prompts": data["prompts"][:max(0, n_prompts - 1)]}
    chosen = [p for p in data["pairs"] if pairs is None or p["name"] in pairs]
    if pairs is not None and len(chosen) != len(set(pairs)):
        known = [p["name"] for p in data["pairs"]]
        raise SteerscopeError(f"unknown pair in {pairs}; the data file has {known}")
    t0 = time.perf_counter()
    model = load_model(model_name)
    n = model.cfg.n_layers
    layers = layers if layers is not None else sorted({round(i * (n - 1) / 4) for i in range(5)})
    bad = [L for L in layers if not 0 <= L < n]
    if bad:
        raise SteerscopeError(f"layers {bad} out of range: the model has {n} layers (0 to {n - 1})")
    say = (lambda m: print(f"[{time.perf_counter() - t0:7.1f} s] {m}", flush=True)) if progress else (lambda m: None)
    out = {"model": model_name, "layers": layers, "new_tokens": new_tokens, "seed": seed,
           "threads": torch.get_num_threads(), "pairs": {}}
    for p in chosen:
        t = time.perf_counter()
        out["pairs"][p["name"]] = run_pair(model, p, data, layers, coeff, coeffs, md_coeffs, samples, sweep_samples,
                                           new_tokens, seed, say)
        out["pairs"][p["name"]]["wall_time_s"] = round(time.perf_counter() - t, 1)
    out["wall_time_s"] = round(time.perf_counter() - t0, 1)
    return out


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise SteerscopeError(f"{flag} wants comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layers", default=None, help="comma-separated blocks (default: 5 evenly spaced, 0 to the last)")
    p.add_argument("--coeff", type=float, default=5.0, help="the layer sweep's coefficient")
    p.add_argument("--coeffs", default="0,1,2,4,8,16", help="the coefficient sweep at the best layer")
    p.add_argument("--md-coeffs", default="0.25,0.5,1,2", help="mean-difference lengths, in residual norms")
    p.add_argument("--samples", type=int, default=4, help="continuations per prompt in the layer sweep")
    p.add_argument("--sweep-samples", type=int, default=13, help="continuations per prompt in the sweeps at the best layer")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", default=None, help="comma-separated pair names (default: all)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args(argv)
    layers = [int(x) for x in _floats(a.layers, "--layers")] if a.layers else None
    pairs = [x.strip() for x in a.pairs.split(",")] if a.pairs else None
    emit(run(a.model, layers, a.coeff, _floats(a.coeffs, "--coeffs"), _floats(a.md_coeffs, "--md-coeffs"), a.samples,
             a.sweep_samples, a.new_tokens, a.seed, pairs), a.json)


if __name__ == "__main__":
    try:
        main()
    except SteerscopeError as e:
        raise SystemExit(f"error: {e}") from None
