"""Caching throughput: ``ActivationStore.build`` against a plain ``model(tokens)`` forward, in one run.

    python bench/cache.py --tiny                      # random tiny model, no weights needed
    python bench/cache.py --model austen-dense --n-tokens 500000 --site blocks.3.hook_resid_post

Both sides see the same token ids (random, BOS first) with the same batch size, so tokenization is outside
both timings. The store goes to a temporary directory (hooks, copies to CPU, hashing and writing included).
Prints tokens/s of each, best of ``--repeats``, and the ratio build / forward (goal: >= 0.9). A second
anchor, a forward that stops after the site's block (no hooks, no logits), isolates the cost of caching
itself: the build also stops there, so against the full forward it saves the later blocks and the unembed.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

import probe
from probe.errors import SteerscopeError
from probe.models import build_model, default_device, load_model
from probe.sites import layer_of
from probe.store import ActivationStore
from probe.zoo.specs import MODEL_SPECS

TINY = {**MODEL_SPECS["austen-dense"], "n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="austen-dense", help="zoo name, TransformerLens name or local directory")
    p.add_argument("--tiny", action="store_true", help="a random 2-layer d_model=64 model instead of --model")
    p.add_argument("--n-tokens", type=int, default=100_000, help="activation rows to cache")
    p.add_argument("--site", default=None, help="hook name (default: the last block's hook_resid_post)")
    p.add_argument("--n-ctx", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per forward pass")
    p.add_argument("--dtype", default="float32", help="store dtype")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args()


def make_model(args):
    device = args.device or default_device()
    if args.tiny:
        torch.manual_seed(0)
        return build_model(TINY, Path(probe.__file__).parent / "zoo" / "tokenizer.json", device=device).eval()
    return load_model(args.model, device=device)


def make_tokens(model, n_tokens: int, n_ctx: int) -> torch.Tensor:
    """Enough random contexts for ``n_tokens`` rows (BOS excluded), each starting with BOS."""
    n_contexts = math.ceil(n_tokens / (n_ctx - 1))
    tokens = torch.randint(0, model.cfg.d_vocab, (n_contexts, n_ctx), generator=torch.Generator().manual_seed(0))
    bos = getattr(model.tokenizer, "bos_token_id", None)
    tokens[:, 0] = 0 if bos is None else bos
    return tokens


def sync(model) -> None:
    if str(model.cfg.device).startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(model, tokens: torch.Tensor, batch_size: int, stop: int | None = None) -> float:
    """Seconds for a hook-free forward over ``tokens`` (to the logits, or up to block ``stop``)."""
    kw = {} if stop is None else {"stop_at_layer": stop}
    sync(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(0, len(tokens), batch_size):
            model(tokens[b : b + batch_size].to(model.cfg.device), **kw)
    sync(model)
    return time.perf_counter() - t0


def time_build(model, tokens: torch.Tensor, args, n_tokens: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        sync(model)
        t0 = time.perf_counter()
        ActivationStore.build(model, tokens, args.site, n_tokens, Path(tmp) / "acts", batch_size=args.batch_size,
                              dtype=args.dtype, progress=False)
        sync(model)
        return time.perf_counter() - t0


def main() -> None:
    args = parse()
    try:
        model = make_model(args)
    except (SteerscopeError, OSError) as e:  # no fallback model: missing weights are an error
        sys.exit(f"error: cannot load model {args.model!r}: {e}")
    args.site = args.site or f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    n_ctx = args.n_ctx or model.cfg.n_ctx
    tokens = make_tokens(model, args.n_tokens, n_ctx)
    time_forward(model, tokens[: args.batch_size], args.batch_size)  # warm-up
    time_build(model, tokens[: args.batch_size], args, args.batch_size * (n_ctx - 1))
    layer = layer_of(args.site)
    stop = None if layer is None else layer + 1
    fwd = stopped = build = math.inf
    for _ in range(args.repeats):
        fwd = min(fwd, time_forward(model, tokens, args.batch_size))
        stopped = min(stopped, time_forward(model, tokens, args.batch_size, stop))
        build = min(build, time_build(model, tokens, args, args.n_tokens))
    n = tokens.numel()
    name = "tiny (random)" if args.tiny else args.model
    print(f"model {name} on {model.cfg.device}, site {args.site}, {len(tokens)} contexts x {n_ctx} = {n} tokens, "
          f"batch {args.batch_size}, threads {torch.get_num_threads()}")
    print(f"plain forward (logits)        {n / fwd:12,.0f} tok/s  ({fwd:.3f} s)")
    print(f"forward to the site's block   {n / stopped:12,.0f} tok/s  ({stopped:.3f} s)")
    print(f"ActivationStore.build         {n / build:12,.0f} tok/s  ({build:.3f} s)")
    print(f"ratio build / plain forward:       {fwd / build:.3f}  (goal >= 0.9)")
    print(f"ratio build / forward to block:    {stopped / build:.3f}  (cost of hooks, copies, hashing, writing)")


if __name__ == "__main__":
    main()
