"""CPU benchmark: the top-k encoder forward alone (no grad), ours vs GEMM + torch.topk.

    python bench/encoder_cpu.py                  # d_in 256/768 x d_sae 16384/32768, k 32, batch 4096
    python bench/encoder_cpu.py --d 256 --m 32768 --threads 2

Rows (same data, same process, median of ``--reps`` calls after one warm-up):

- ``gemm``: one monolithic ``torch.addmm`` (the floor every implementation pays);
- ``gemm+topk``: ``addmm`` then ``torch.topk`` over the ``N x M`` pre-activations (what SAELens and
  sparsify do);
- ``blocked gemm``: our 4096 x 4096-block GEMMs alone, no selection (our floor);
- ``ours compiled``: :func:`saes.kernels.cpu.topk_encode_torch` with the numba selection (the default);
- ``ours torch``: the same with the torch-op selection (used off CPU or without numba).

``selection`` = a row's time minus ``blocked gemm``: what choosing the top-k costs on top of the GEMM.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the steerscope command does; before torch loads

import torch  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def run(n: int, d: int, m: int, k: int, reps: int) -> None:
    from saes.kernels.cpu import BLOCK_ELEMS, DEFAULT_TILE, topk_encode_torch

    torch.manual_seed(0)
    x = torch.randn(n, d)
    W = (torch.randn(m, d) / d**0.5).T  # latent-major storage, as the dictionaries keep it
    b = torch.randn(m) * 0.1
    rows = min(n, BLOCK_ELEMS // DEFAULT_TILE)
    buf = torch.empty(rows, DEFAULT_TILE)

    def blocked() -> None:
        for c0 in range(0, m, DEFAULT_TILE):
            c1 = min(m, c0 + DEFAULT_TILE)
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                torch.addmm(b[c0:c1], x[r0:r1], W[:, c0:c1], out=buf[: r1 - r0, : c1 - c0])

    impls = {
        "gemm": lambda: torch.addmm(b, x, W),
        "gemm+topk": lambda: torch.addmm(b, x, W).topk(k, dim=1),
        "blocked gemm": blocked,
        "ours compiled": lambda: topk_encode_torch(x, W, b, k, select="compiled"),
        "ours torch": lambda: topk_encode_torch(x, W, b, k, select="torch"),
    }
    with torch.no_grad():
        ms = {name: _median_ms(fn, reps) for name, fn in impls.items()}
    print(f"\nN={n} d_in={d} d_sae={m} k={k} fp32, threads={torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(f"{'impl':<15}{'ms':>9}{'x GEMM':>8}{'selection ms':>14}{'gemm+topk / impl':>18}")
    for name, t in ms.items():
        sel = f"{t - ms['blocked gemm']:.1f}" if name.startswith("ours") else ""
        print(f"{name:<15}{t:>9.1f}{t / ms['gemm']:>8.2f}{sel:>14}{ms['gemm+topk'] / t:>17.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="batch rows")
    ap.add_argument("--d", type=int, default=None, help="d_in (default: 256 and 768)")
    ap.add_argument("--m", type=int, default=None, help="d_sae (default: 16384 and 32768)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="timed calls per row (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for d in [args.d] if args.d else [256, 768]:
        for m in [args.m] if args.m else [16384, 32768]:
            run(args.n, d, m, args.k, args.reps)


if __name__ == "__main__":
    main()
