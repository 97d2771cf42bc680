"""Steered vs unsteered generation throughput, measured in one run (goal: ratio >= 0.95).

    python -m bench.steer --tiny            # random tiny model (no weights needed)
    python -m bench.steer                   # the bundled austen-dense

Both arms use the same prompts, greedy decoding, KV cache and ``steering.generate_tokens`` (an
unsteered run is the same loop with no hooks). Repeats are interleaved (A, B, A, B, ...), the order rotating
each round, so drift in machine load hits every arm; the ratio is the median over rounds of the
steered / unsteered tokens/s of the same round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from probe.models import build_model, load_model
from probe.zoo.specs import MODEL_SPECS, PROMPTS
from steering.apply import generate_tokens
from steering.vectors import SteeringVector

TINY = {**MODEL_SPECS["austen-dense"], "n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}


def make_model(tiny: bool, device: str | None):
    if tiny:
        torch.manual_seed(0)
        return build_model(TINY, "probe/zoo/tokenizer.json", device=device or "cpu").eval()
    return load_model("austen-dense", device=device)


def arms(model) -> dict[str, tuple[list[SteeringVector], str]]:
    """name -> (vectors, mode): unsteered, ActAdd on the prompt, a [d] vector everywhere, both."""
    layer = model.cfg.n_layers // 2
    actadd = SteeringVector.actadd(model, "Love", "Hate", layer=layer, coeff=4.0)
    flat = SteeringVector.from_direction(torch.randn(model.cfg.d_model), f"blocks.{layer}.hook_resid_post", 2.0)
    return {"unsteered": ([], "prompt"), "actadd/prompt": ([actadd], "prompt"),
            "vector/all": ([flat], "all"), "actadd+vector/all": ([actadd, flat], "all")}


def tokens_per_s(model, prompts, vectors, mode, n_new: int) -> float:
    if torch.cuda.is_available() and model.cfg.device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate_tokens(model, prompts, vectors, mode, max_new_tokens=n_new, stop_at_eos=False)
    if torch.cuda.is_available() and model.cfg.device != "cpu":
        torch.cuda.synchronize()
    return out.logits.shape[0] * out.logits.shape[1] / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="random tiny model instead of the bundled austen-dense")
    ap.add_argument("--device", default=None)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--batch", type=int, default=len(PROMPTS))
    args = ap.parse_args(argv)
    model = make_model(args.tiny, args.device)
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[:args.batch]
    configs = arms(model)
    for vecs, mode in configs.values():  # warm-up
        tokens_per_s(model, prompts, vecs, mode, 4)
    rates: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for i in range(args.repeats):  # rotate the order each round so no arm always runs first
        for name in names[i % len(names):] + names[:i % len(names)]:
            rates[name].append(tokens_per_s(model, prompts, *configs[name], args.new_tokens))
    print(f"model={'tiny' if args.tiny else 'austen-dense'} device={model.cfg.device} batch={len(prompts)} "
          f"new_tokens={args.new_tokens} repeats={args.repeats} threads={torch.get_num_threads()}")
    ratios = {}
    for name, r in rates.items():  # ratio: median over rounds of steered / unsteered in the same round
        ratios[name] = statistics.median(a / b for a, b in zip(r, rates["unsteered"], strict=True))
        print(f"{name:>20}: {statistics.median(r):9.1f} tok/s (min {min(r):.1f}, max {max(r):.1f})  "
              f"ratio {ratios[name]:.3f}")
    worst = min(v for k, v in ratios.items() if k != "unsteered")
    print(f"worst steered/unsteered ratio: {worst:.3f} (goal >= 0.95): {'PASS' if worst >= 0.95 else 'BELOW GOAL'}")
    return ratios


if __name__ == "__main__":
    main()
