"""CPU benchmark: the top-k encoder forward alone (no grad), ours vs GEMM + torch.topk.

    python bench/encoder_cpu.py                  # d_in 256/768 x d_sae 16384/32768, k 32, batch 4096
    python bench/encoder_cpu.py --d 256 --m 32768 --threads 2

Rows (same data, same process, median of ``--reps`` calls after one warm-up):

- ``gemm``: one monolithic ``torch.addmm`` (MKL in the CPU wheels: the floor the anchors pay);
- ``gemm openblas``: the same GEMM (and bias) through numpy's OpenBLAS on all threads;
- ``gemm+topk``: ``addmm`` then ``torch.topk`` over the ``N x M`` pre-activations (what SAELens and
  sparsify do);
- ``blocked torch``: 4096 x 4096 blocks of ``torch.addmm`` alone, no selection;
- ``blocked openblas``: the default path's GEMMs alone: each thread its part of the rows, blocks
  of single-threaded OpenBLAS, no selection;
- ``ours``: :func:`saes.kernels.cpu.topk_encode_torch` as it runs by default (OpenBLAS blocks, the
  compiled selection on the same thread);
- ``ours torch-gemm``: the compiled selection after torch's GEMMs (numpy without OpenBLAS);
- ``ours torch``: the torch-op selection (off CPU or without numba).

``selection`` = a row's time minus its blocked GEMMs: what choosing the top-k costs on top.
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
    import numpy as np
    from threadpoolctl import threadpool_limits

    from saes.kernels import cpu_select
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

    threads = torch.get_num_threads()
    xn, wn, bn = x.numpy(), W.numpy(), b.numpy()
    parts = max(1, min(threads, n // 64))
    part_rows = min(n, BLOCK_ELEMS // DEFAULT_TILE // parts)

    def blocked_openblas() -> None:
        def part(a: int, z: int) -> None:
            out = np.empty((min(part_rows, z - a), DEFAULT_TILE), np.float32)
            for r0 in range(a, z, part_rows):
                r1 = min(z, r0 + part_rows)
                for c0 in range(0, m, DEFAULT_TILE):
                    c1 = min(m, c0 + DEFAULT_TILE)
                    np.matmul(xn[r0:r1], wn[:, c0:c1], out=out[: r1 - r0, : c1 - c0])

        with threadpool_limits(1, user_api="blas"):
            cpu_select.run_parts([n * i // parts for i in range(parts + 1)], part)

    def gemm_openblas() -> None:
        with threadpool_limits(threads, user_api="blas"):
            np.add(np.matmul(xn, wn), bn)

    impls = {
        "gemm": lambda: torch.addmm(b, x, W),
        "gemm openblas": gemm_openblas,
        "gemm+topk": lambda: torch.addmm(b, x, W).topk(k, dim=1),
        "blocked torch": blocked,
        "blocked openblas": blocked_openblas,
        "ours": lambda: topk_encode_torch(x, W, b, k),
        "ours torch-gemm": lambda: topk_encode_torch(x, W, b, k, gemm="torch"),
        "ours torch": lambda: topk_encode_torch(x, W, b, k, select="torch"),
    }
    floor = {"ours": "blocked openblas", "ours torch-gemm": "blocked torch", "ours torch": "blocked torch"}
    with torch.no_grad():
        ms = {name: _median_ms(fn, reps) for name, fn in impls.items()}
    print(f"\nN={n} d_in={d} d_sae={m} k={k} fp32, threads={torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(f"{'impl':<18}{'ms':>9}{'x GEMM':>8}{'selection ms':>14}{'gemm+topk / impl':>18}")
    for name, t in ms.items():
        sel = f"{t - ms[floor[name]]:.1f}" if name in floor else ""
        print(f"{name:<18}{t:>9.1f}{t / ms['gemm']:>8.2f}{sel:>14}{ms['gemm+topk'] / t:>17.2f}x")


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
