"""Compiled (numba) running top-k selection over blocks of pre-activations: the CPU fast path.

The tiled encoder (:mod:`saes.kernels.cpu`) writes one block of pre-activations at a time; this
module merges each block into a per-row running top-``k`` in a single pass over the block, its
rows split over threads. Per row, the state is ``k`` values (fp32, descending) and their latent ids,
ordered like the packed keys of :mod:`saes.kernels.keys`: value descending, ties to the lowest id,
NaN above ``+inf``, ``-0.0`` equal to ``+0.0`` (and stored as ``+0.0``).

Per row and block:

- While the state is full, a chunk of ``CHUNK`` columns is scanned value by value only if one of its
  values is not ``<=`` the state's ``k``-th value (a branch-free count that the compiler vectorises;
  NaN counts). Most of a block costs one streaming read (3-4 ms for a 4096 x 4096 fp32 block on 2
  cores). One level of 64-column chunks measured 25-30% faster than the two levels (128, then 16)
  we had: 10.4 vs 15.5 ms on a first 2048 x 4096 block, 8.3 vs 11.5 ms on a second.
- On the first block the state is empty. The ``k``-th largest maximum of ``2k`` strided groups
  of the row bounds the row's ``k``-th value from below (``k`` group maxima are ``k`` distinct
  elements), so only values ``>=`` that bound enter: about ``k`` to ``2k`` insertions per row instead
  of ``k (1 + ln(M / k))``. numpy computes the maxima (:func:`first_bounds`: its reductions are
  vectorised, 2-3x faster than the compiled strided loop we had).
- Blocks arrive in increasing latent order and a row is scanned left to right, so a new value enters
  only if it beats the ``k``-th strictly (an equal value has a larger id and loses the tie).

The bias is added while reading (the GEMMs write ``x @ W`` only). :func:`encode_blocks` drives the
whole encoder on CPU: each thread runs single-threaded OpenBLAS GEMMs on its part of the rows and
merges each block right after, on the same thread; :func:`merge_block` merges one block computed
elsewhere (torch's GEMMs), its rows split over threads.

Insertion keeps the state sorted (a shift of at most ``k`` entries). The result is exact: the same
values and ids as ``topk`` over the packed keys of the whole row. Tested against the torch path and
the dense reference in ``tests/saes/test_kernels.py``.
"""

from __future__ import annotations

import threading

import numpy as np

CHUNK = 64
"""Columns per chunk of the branch-free skip test (a compile-time size): a chunk is scanned only if
one of its values can enter the state."""

try:
    from numba import njit
except ImportError:  # numba is a dependency; without it the torch selection path runs
    njit = None


def _insert(vals, ids, r, n, k, v, col):
    """Insert ``(v, col)`` into the sorted first ``n`` entries of row ``r`` (``col`` is the largest id
    so far); the entry at ``k - 1`` falls off when ``n == k``. Returns the new fill."""
    p = n if n < k else k - 1
    while p > 0:
        w = vals[r, p - 1]
        if v > w or (v != v and w == w):
            vals[r, p] = w
            ids[r, p] = ids[r, p - 1]
            p -= 1
        else:
            break
    vals[r, p] = v + np.float32(0.0)
    ids[r, p] = col
    return n + 1 if n < k else k


def _may_enter(row, bias, c0, size, bound, strict):
    """Whether some ``row[c0 : c0 + size] + bias[...]`` is not ``<= bound`` (``strict``) or not
    ``< bound``: NaN counts. A branch-free count that the compiler vectorises."""
    hits = 0
    if strict:
        for j in range(size):
            hits += np.int32(not (np.float32(row[c0 + j] + bias[c0 + j]) <= bound))
    else:
        for j in range(size):
            hits += np.int32(not (np.float32(row[c0 + j] + bias[c0 + j]) < bound))
    return hits > 0


def _scan(row, bias, j0, j1, lo, col0, vals, ids, r, n, k):
    """Insert the values of ``row[j0:j1] + bias[j0:j1]`` that enter the running top-``k``; returns
    the new fill."""
    for j in range(j0, j1):
        v = np.float32(row[j] + bias[j])
        if n < k:
            if v < lo:
                continue
        else:
            tau = vals[r, k - 1]
            if not (v > tau or (v != v and tau == tau)):
                continue
        n = _insert(vals, ids, r, n, k, v, col0 + j)
    return n


def _merge_rows(pre, bias, width, col0, vals, ids, fill, lows):
    rows = pre.shape[0]
    k = vals.shape[1]
    for r in range(rows):
        row = pre[r]
        n = fill[r]
        lo = lows[r]  # while the state is not full, insert only values >= lo
        full = width - width % CHUNK
        for c0 in range(0, full, CHUNK):
            if _may_enter(row, bias, c0, CHUNK, vals[r, k - 1] if n == k else lo, n == k):
                n = _scan(row, bias, c0, c0 + CHUNK, lo, col0, vals, ids, r, n, k)
        n = _scan(row, bias, full, width, lo, col0, vals, ids, r, n, k)
        fill[r] = n


def first_bounds(pre, bias, k: int):
    """For the first block of each row: adds ``bias`` into ``pre`` (numpy ``[rows, width]``) in place
    and returns fp32 lower bounds on each row's ``k``-th value (in key order: NaN first).

    The bound is the ``k``-th largest maximum of ``G = min(width, 2k)`` disjoint strided groups:
    ``k`` group maxima are ``k`` distinct elements, so at least ``k`` values are ``>=`` it. numpy's
    NaN-propagating max and ``partition`` (NaN last, i.e. largest) keep it a bound with NaNs: a
    NaN group stands for at least one NaN element, which ranks above every number. Rounding to fp32
    is monotone, so the bound holds for the fp32 keys of fp64 values too. ``-inf`` (no bound) when
    ``G <= k``."""
    rows, width = pre.shape
    np.add(pre, bias, out=pre)
    groups = min(width, 2 * k)
    if groups <= k or rows == 0:
        return np.full(rows, -np.inf, np.float32)
    # group j = columns {j, j + G, j + 2G, ...} (a strided view, no copy; the last width % G
    # columns are in no group): numpy reduces it as elementwise maxima of contiguous G-vectors
    view = np.lib.stride_tricks.as_strided(
        pre, (rows, width // groups, groups), (pre.strides[0], groups * pre.strides[1], pre.strides[1]), writeable=False
    )
    maxima = view.max(axis=1)
    return np.partition(maxima, groups - k, axis=1)[:, groups - k].astype(np.float32)


if njit is not None:
    _insert = njit(inline="always", cache=True, nogil=True)(_insert)
    _may_enter = njit(inline="always", cache=True, nogil=True)(_may_enter)
    _scan = njit(inline="always", cache=True, nogil=True)(_scan)
    _merge_rows = njit(cache=True, nogil=True)(_merge_rows)


def available() -> bool:
    """Whether the compiled selection can run (numba is importable)."""
    return njit is not None


def merge_block(pre, width: int, col0: int, vals, ids, fill, threads: int, bias=None) -> None:
    """Merge ``pre[:, :width] + bias`` (numpy fp32/fp64, C-contiguous rows; latent ids ``col0 + j``;
    ``bias [width]`` or None) into the running state ``vals`` (fp32 ``[rows, k]``), ``ids`` (int64
    ``[rows, k]``), ``fill`` (int64 ``[rows]``, entries in use: 0 before the first block), in place.

    The rows are split into ``threads`` contiguous ranges (:func:`run_parts`).
    """
    rows, k = vals.shape
    zero = np.zeros(width, pre.dtype)
    bias = zero if bias is None else bias
    if rows > 0 and fill[0] == 0:  # a first block
        lows, bias = first_bounds(pre[:, :width], bias, k), zero
    else:
        lows = np.full(rows, -np.inf, np.float32)
    parts = max(1, min(threads, rows // 64))
    bounds = [rows * i // parts for i in range(parts + 1)]
    run_parts(bounds, lambda a, b: _merge_rows(pre[a:b], bias, width, col0, vals[a:b], ids[a:b], fill[a:b], lows[a:b]))


_OPENBLAS = None


def _openblas():
    """threadpoolctl's handle on numpy's OpenBLAS, or False (numpy on another BLAS, or no threadpoolctl)."""
    global _OPENBLAS
    if _OPENBLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
            ctl = ThreadpoolController().select(internal_api="openblas")
            _OPENBLAS = ctl if "openblas" in str(blas).lower() and ctl.lib_controllers else False
        except Exception:  # an unknown numpy build: the torch GEMM path runs
            _OPENBLAS = False
    return _OPENBLAS


def blas_available() -> bool:
    """Whether :func:`encode_blocks` can run: numba, and numpy on OpenBLAS that threadpoolctl can pin."""
    return njit is not None and bool(_openblas())


def encode_blocks(x, W, bias, k: int, tile: int, rows: int, threads: int):
    """Top-``k`` of ``x @ W + bias`` per row: ``(values fp32 [N, k], ids int64 [N, k])``.

    ``x [N, d]``, ``W [d, M]`` (any strides with a unit one), ``bias [M]``: numpy arrays of one float
    dtype. The rows are split into ``threads`` parts; each part runs on its own thread, block after
    block: a single-threaded OpenBLAS GEMM of ``rows x tile`` pre-activations (without bias) into its
    own buffer, then :func:`_merge_rows` (which adds the bias) on the same thread. No barrier
    between the threads, and no BLAS worker thread spinning on the cores the selection needs
    (OpenBLAS is pinned to one thread for the call)."""
    n, m = x.shape[0], W.shape[1]
    vals = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    fill = np.zeros(n, np.int64)
    parts = max(1, min(threads, n // 64))
    bounds = [n * i // parts for i in range(parts + 1)]

    def part(a: int, b: int) -> None:
        size = min(rows, b - a)
        buf = np.empty(size * min(tile, m), dtype=x.dtype)
        zero = np.zeros(min(tile, m), dtype=x.dtype)
        unbounded = np.full(size, -np.inf, np.float32)
        for r0 in range(a, b, size):
            r1 = min(b, r0 + size)
            for c0 in range(0, m, tile):
                width = min(tile, m - c0)
                pre = buf[: (r1 - r0) * width].reshape(r1 - r0, width)
                np.matmul(x[r0:r1], W[:, c0 : c0 + width], out=pre)
                b_tile, lows = bias[c0 : c0 + width], unbounded[: r1 - r0]
                if c0 == 0:
                    lows, b_tile = first_bounds(pre, b_tile, k), zero[:width]
                _merge_rows(pre, b_tile, width, c0, vals[r0:r1], ids[r0:r1], fill[r0:r1], lows)

    with _openblas().limit(limits=1):
        run_parts(bounds, part)
    return vals, ids


def run_parts(bounds: list[int], fn) -> None:
    """``fn(bounds[i], bounds[i + 1])`` for each consecutive pair, each on its own Python thread (the
    first on the calling one); compiled kernels release the GIL. Plain threads rather than numba's
    parallel layers: those are not fork-safe (a process forked after an OpenMP region hangs in its
    first parallel torch op) and the workqueue layer aborts on concurrent calls. The first error is
    re-raised in the calling thread."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(bounds[i], bounds[i + 1])
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(1, len(bounds) - 1)]
    for w in workers:
        w.start()
    run(0)
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
