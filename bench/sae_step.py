"""CPU benchmark: one TopK SAE training step (forward, backward, Adam), ours vs the anchors.

    python bench/sae_step.py            # d_in 256/768 x d_sae 16384/32768, k 32, batch 4096, fp32
    python bench/sae_step.py --quick    # d_in 256, d_sae 16384, batch 1024: about two minutes
    python bench/sae_step.py --quick --threads 1 --cpu-time   # the same, on a machine that is busy

Every (shape, implementation) pair runs in its own subprocess with the same seeded data and
initialisation, the same loss (MSE of the reconstruction, pre-bias ``x - b_dec``) and the same
optimizer (``torch.optim.Adam(fused=True)``), on ``--threads`` torch threads (default: all cores),
with ``OMP_WAIT_POLICY=PASSIVE`` (what the ``steerscope`` command sets; override by exporting it):

- ``ours``: :func:`saes.kernels.topk_sae_forward` (tiled top-k encoder with the compiled running
  top-k selection, sparse decode and backward; the pre-bias passed as ``pre_bias``, as steerscope's
  TopK SAE does); the encoder is stored latent-major (``[d_sae, d_in]``) and passed as ``.T``;
- ``ours-torch-gemm``: the same, with the encoder's blocks computed by torch's GEMM (MKL) instead
  of OpenBLAS: what ours gains from the BLAS alone, the rest of the design unchanged;
- ``naive``: dense reference (matmul, torch.topk, scatter, dense decode, autograd);
- ``saelens``: SAELens 6 ``TopKTrainingSAE.training_forward_pass`` (dense decode), with
  ``rescale_acts_by_decoder_norm=False`` so that all rows compute the same function;
- ``saelens-sparse``: the same with ``use_sparse_activations=True``;
- ``sparsify``: eai-sparsify ``SparseCoder.forward`` (fused encoder backward + Triton decoder);
- ``sparsify-eager``: the same with ``SPARSIFY_DISABLE_TRITON=1`` (``F.embedding_bag`` decoder);
- ``gemm``: one dense encoder GEMM ``x @ W_enc + b_enc`` of the same shape (``torch.addmm``, MKL in
  the CPU wheels): the floor the ratios are taken against;
- ``gemm-openblas``: the same GEMM through numpy's OpenBLAS (``--threads`` threads), which ours uses
  for its blocks on CPU. On the AMD EPYC test machine it is ~1.3x faster than MKL's, so it is the
  stricter floor: the goal line also prints our step over it.

At initialisation no latent is dead, so no AuxK term runs in any implementation.

Memory: the worker resets the kernel's resident-set high-water mark after a warm-up step (which
allocates the Adam state) by writing 5 to ``/proc/self/clear_refs``, runs the timed steps, and reports
``peak`` = VmHWM (whole process, MB) and ``step`` = VmHWM minus VmRSS before the timed steps: the
transient memory of a step (activations, gradients, temporaries). Parameters, Adam state and data
are in ``peak`` but not in ``step``. An ``N x M`` fp32 tensor is ``4 * N * M`` bytes (268 MB at
4096 x 16384), so a step that holds one shows it in ``step``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
"""OpenMP's idle-thread policy in every worker, whatever the implementation (steerscope's CLI uses
PASSIVE: threads spinning after a GEMM would take the cores of our selection threads)."""

IMPLS = ["ours", "ours-torch-gemm", "naive", "saelens", "saelens-sparse", "sparsify", "sparsify-eager", "gemm", "gemm-openblas"]


def _mem() -> dict[str, float]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(rest.split()[0]) / 1024
    return fields


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _setup(impl: str, d: int, m: int, k: int, n: int):
    """Returns (step function, parameters) for one implementation."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(n, d)
    w_enc = torch.randn(m, d) / d**0.5  # latent-major [M, d]
    if impl == "gemm-openblas":
        import numpy as np
        from threadpoolctl import threadpool_limits

        xn, wn, bn = x.numpy(), w_enc.numpy().T, torch.zeros(m).numpy()
        threadpool_limits(torch.get_num_threads(), user_api="blas")
        return (lambda: np.add(np.matmul(xn, wn), bn)), []
    if impl == "ours-torch-gemm":
        from saes.kernels import cpu_select

        cpu_select.blas_available = lambda: False  # the encoder falls back to torch GEMMs
    if impl in ("ours", "ours-torch-gemm", "naive", "gemm"):
        from saes.kernels import topk_sae_forward
        from saes.kernels.reference import dense_topk_sae

        p = [w_enc, torch.zeros(m), w_enc.clone(), torch.zeros(d)]
        p = [t.requires_grad_() for t in p]
        W_enc, b_enc, W_dec, b_dec = p
        if impl == "gemm":
            return (lambda: torch.addmm(b_enc.detach(), x, W_enc.detach().T)), []

        def loss():
            if impl.startswith("ours"):
                x_hat = topk_sae_forward(x, W_enc.T, b_enc, W_dec, b_dec, k, pre_bias=b_dec).x_hat
            else:
                x_hat = dense_topk_sae(x - b_dec, W_enc.T, b_enc, W_dec, b_dec, k, exact_ties=False)[0]
            return (x_hat - x).pow(2).sum(-1).mean()

        return loss, p
    if impl.startswith("saelens"):
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        cfg = TopKTrainingSAEConfig(
            d_in=d, d_sae=m, k=k, rescale_acts_by_decoder_norm=False, use_sparse_activations=impl == "saelens-sparse"
        )
        sae = TopKTrainingSAE(cfg)
        with torch.no_grad():
            sae.W_enc.copy_(w_enc.T)
            sae.W_dec.copy_(w_enc)
        step_in = TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
        )
        return (lambda: sae.training_forward_pass(step_in).loss), list(sae.parameters())
    if impl.startswith("sparsify"):
        from sparsify import SparseCoder, SparseCoderConfig

        sae = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k), device="cpu", dtype=torch.float32)
        with torch.no_grad():
            sae.encoder.weight.copy_(w_enc)
            sae.W_dec.copy_(w_enc)
        return (lambda: sae(x).fvu), list(sae.parameters())
    raise ValueError(impl)


def worker(impl: str, d: int, m: int, k: int, n: int, steps: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    if impl == "sparsify-eager":
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    step_fn, params = _setup(impl, d, m, k, n)
    opt = torch.optim.Adam(params, lr=1e-4, fused=True) if params else None

    def step():
        if opt is None:
            return step_fn()
        step_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocates the Adam state and the allocator's pools
    base = _mem()["VmRSS"]
    _reset_peak()
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = _mem()["VmHWM"]
    median = len(wall) // 2
    return {
        "ms": 1e3 * sorted(wall)[median],
        "cpu_ms": 1e3 * sorted(cpu)[median],
        "peak_mb": peak,
        "step_mb": peak - base,
    }


def run(impl: str, d: int, m: int, k: int, n: int, steps: int, threads: int, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, *map(str, (d, m, k, n, steps, threads))]
    env = {**os.environ, "OMP_WAIT_POLICY": WAIT_POLICY}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {"error": err[-1][:110] if err else f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def table(shape: tuple[int, int, int, int], results: dict[str, dict], threads: int, key: str) -> str:
    d, m, k, n = shape
    ours, gemm = results["ours"].get(key), results["gemm"].get(key)
    load = os.getloadavg()[0]
    rows = [
        f"\nd_in={d} d_sae={m} k={k} batch={n} fp32, {os.cpu_count()} cpus, threads={threads}, "
        f"OMP_WAIT_POLICY={WAIT_POLICY}, load {load:.1f}"
    ]
    head = (
        f"{'impl':<16}{'step ms':>10}{'cpu ms':>9}{'steps/s':>9}{'x GEMM':>8}{'speedup':>9}{'peak MB':>9}{'step MB':>9}"
    )
    rows.append(head)
    for impl, r in results.items():
        if "error" in r:
            rows.append(f"{impl:<16}  failed: {r['error']}")
            continue
        speed = f"{r[key] / ours:.2f}x" if ours and not impl.startswith("gemm") else ""
        rows.append(
            f"{impl:<16}{r['ms']:>10.1f}{r['cpu_ms']:>9.1f}{1e3 / r['ms']:>9.2f}"
            f"{r[key] / gemm if gemm else float('nan'):>8.2f}{speed:>9}{r['peak_mb']:>9.0f}{r['step_mb']:>9.0f}"
        )
    basis = "CPU" if key == "cpu_ms" else "wall-clock"
    rows.append(f"speedup = impl step time / ours; x GEMM = step time / one encoder GEMM ({basis} time)")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape, batch 1024 (d_in 256, d_sae 16384, k 32)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="ratios from process CPU time instead of wall-clock (with --threads 1: robust on a busy machine)",
    )
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (median reported)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per (shape, impl) subprocess")
    ap.add_argument("--d", type=int, default=None, help="only this d_in (256 or 768 by default)")
    ap.add_argument("--m", type=int, default=None, help="only this d_sae (16384 or 32768 by default)")
    ap.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, *dims = args.worker
        print(json.dumps(worker(impl, *map(int, dims))))
        return
    shapes = [(256, 16384, 32, 1024)] if args.quick else [(d, m, 32, 4096) for d in (256, 768) for m in (16384, 32768)]
    shapes = [s for s in shapes if args.d in (None, s[0]) and args.m in (None, s[1])]
    impls = args.impls.split(",")
    for shape in shapes:
        results = {}
        for impl in impls:
            steps = args.steps or (5 if impl.startswith(("ours", "gemm")) or args.quick else 3)
            results[impl] = run(impl, *shape, steps, args.threads, args.timeout)
            print(f"  {impl}: {results[impl]}", file=sys.stderr, flush=True)
        results.setdefault("ours", {})
        results.setdefault("gemm", {})
        key = "cpu_ms" if args.cpu_time else "ms"
        print(table(shape, results, args.threads or os.cpu_count() or 1, key), flush=True)
        t = {impl: r[key] for impl, r in results.items() if key in r}
        if "ours" in t:
            goals = [f"ours vs saelens {t['saelens'] / t['ours']:.2f}x (goal >= 4)"] if "saelens" in t else []
            if "sparsify-eager" in t:
                goals.append(f"vs sparsify-eager {t['sparsify-eager'] / t['ours']:.2f}x (goal >= 1.5)")
            if "gemm" in t:
                goals.append(f"step/GEMM {t['ours'] / t['gemm']:.2f} (goal <= 2)")
            if "gemm-openblas" in t:
                goals.append(f"step/OpenBLAS GEMM {t['ours'] / t['gemm-openblas']:.2f}")
            print("goals: " + "; ".join(goals), flush=True)

if __name__ == "__main__":
    main()
