"""Speed on a real model (SmolLM2-135M-Instruct), each a ratio against plain transformers in the same run.

    python -m bench.real_model                       # SmolLM2, batch 8 x 256 tokens, 8 prompts x 48 new tokens
    python -m bench.real_model --model x.gguf --batch 2 --ctx 32 --new 4     # any GGUF / HF dir, tiny sizes

1. Caching one site: ``ActivationStore.build`` over the same token ids as a plain transformers forward of
   the whole model (the anchor); at a middle layer (the store stops there) and at the last layer.
2. Generation, greedy with the KV cache, the same left-padded prompts: transformers' ``generate`` (the
   anchor, ``min_new_tokens`` = ``max_new_tokens`` so both emit every token) against ``steering.generate``
   unsteered and steered (a [d] vector at every position, and ActAdd).

Each row also shows the HookedTransformer path (``STEERSCOPE_TWIN=0``) for reference. Best of ``--repeat``
runs per arm, torch threads as given (default 2, the project machine's cores).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch


def best(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@contextlib.contextmanager
def twin_off():
    old = os.environ.get("STEERSCOPE_TWIN")
    os.environ["STEERSCOPE_TWIN"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("STEERSCOPE_TWIN")
        else:
            os.environ["STEERSCOPE_TWIN"] = old


def hf_reference(model):
    """transformers' own model of the same weights (the twin's, loaded apart from ours)."""
    from probe.twin import twin_of

    twin = twin_of(model)
    if twin is None:
        raise SystemExit("this model has no transformers twin (only Llama-family GGUF / HF directories do)")
    return twin.hf


def main() -> None:
    from probe.models import load_model
    from probe.store import ActivationStore
    from steering import SteeringVector, generate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--new", type=int, default=48, help="new tokens per prompt in the generation rows")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    hf = hf_reference(model)
    L = model.cfg.n_layers
    lo = min(200, model.cfg.d_vocab // 4)  # ordinary tokens, clear of the special ones at the start of the vocabulary
    ids = torch.randint(lo, model.cfg.d_vocab - lo, (args.batch, args.ctx), generator=torch.Generator().manual_seed(0))
    from probe.tokens import context_start_id, has_bos

    ids[:, 0] = context_start_id(model.tokenizer, has_bos(model))  # a store's contexts start with it (probe.tokens)
    n = ids.numel()
    print(f"{args.model}: {L} layers, d_model {model.cfg.d_model}; {torch.get_num_threads()} threads; "
          f"best of {args.repeat}")
    with torch.no_grad():
        t_hf = best(lambda: hf(ids), args.repeat)
    print(f"transformers forward, whole model, {args.batch} x {args.ctx}: {n / t_hf:,.0f} tok/s (anchor)")
    for site in (f"blocks.{L // 2}.hook_resid_post", f"blocks.{L - 1}.hook_resid_post"):
        for label, ctx in (("ours", contextlib.nullcontext()), ("HookedTransformer", twin_off())):
            with tempfile.TemporaryDirectory() as tmp, ctx:
                k = [0]

                def build(tmp=tmp, site=site, k=k):
                    k[0] += 1
                    ActivationStore.build(model, ids, site, n - args.batch, Path(tmp) / f"s{k[0]}",
                                          batch_size=args.batch, progress=False)

                t = best(build, args.repeat)
            print(f"  cache {site} ({label}): {n / t:,.0f} tok/s = {t_hf / t:.2f}x transformers' forward")
    gen_rows(model, hf, args, SteeringVector, generate)


def interleaved(fns: dict, repeat: int) -> dict:
    """Best time per arm, the arms taken in turn each round (so drift in the machine's speed hits all alike)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def gen_rows(model, hf, args, SteeringVector, generate) -> None:
    prompts = ["I went up to my friend and said", "The capital of France is", "It is a truth universally",
               "She walked into the room and", "In the morning, the garden", "My favourite recipe is",
               "The best way to learn is", "Once upon a time, there"][: args.batch]
    tok = model.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    tok.padding_side = side
    new, total = args.new, len(prompts) * args.new
    layer = model.cfg.n_layers // 5
    flat = SteeringVector.from_direction(torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)),
                                         f"blocks.{layer}.hook_resid_pre", coeff=4.0)
    actadd = SteeringVector.actadd(model, " weddings", " ", layer=layer, coeff=4.0)
    arms = {"unsteered": dict(steer=None), f"steered [d] at all positions (layer {layer})": dict(steer=[flat], mode="all"),
            f"ActAdd ' weddings' - ' ' (layer {layer})": dict(steer=[actadd])}

    def ours(kw, off):
        def run():
            with twin_off() if off else contextlib.nullcontext():
                generate(model, prompts, max_new_tokens=new, stop_at_eos=False, **kw)
        return run

    fns = {"anchor": lambda: hf.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                         pad_token_id=tok.pad_token_id)}
    for name, kw in arms.items():
        fns[(name, "ours")] = ours(kw, False)
        fns[(name, "HookedTransformer")] = ours(kw, True)
    with torch.no_grad():
        t = interleaved(fns, args.repeat)
    print(f"transformers generate, greedy, KV cache, {len(prompts)} prompts x {new} tokens: {total / t['anchor']:.1f} "
          "tok/s (anchor; all generation arms timed in turn)")
    for key, sec in t.items():
        if key != "anchor":
            print(f"  steering.generate {key[0]} ({key[1]}): {total / sec:.1f} tok/s = {t['anchor'] / sec:.2f}x "
                  "transformers' generate")


if __name__ == "__main__":
    main()
