"""Semi-nonnegative matrix factorization (SNMF) of MLP activations (Shafran, Geiger & Geva 2025).

Orientation. The paper factors A [d_mlp, N] (one column per token) as A ~ Z Y with Z [d_mlp, r]
mixed-sign and sparse (the features) and Y [r, N] >= 0 (the coefficients). Everything else in
steerscope is token-major, so this module works with X = A^T [N, d_mlp] and G = Y^T [N, r]:

    X ~ G W,    W = Z^T = W_dec [r, d_mlp] (SAELens layout: one feature per row),    G >= 0.

One iteration of ``fit_snmf`` (``snmf_step``), loss L = ||X - G W||_F^2:

1. least squares for W with G fixed:  W = (G^T G + lam I)^{-1} G^T X   (lam a tiny ridge);
2. keep the top k = ceil(sparsity * d_mlp) entries of each feature (row of W) by |.|, zero the rest;
3. rescale: each column of G to unit l2 norm, each row of W multiplied by the same norm (L unchanged);
4. Ding, Li & Jordan (2010) multiplicative update for G with W fixed, P = X W^T, Q = W W^T:
       G <- G * sqrt( (P^+ + G Q^-) / (P^- + G Q^+) ),    M^+ = (|M| + M)/2,  M^- = (|M| - M)/2.
   This update never increases L (their Theorem 2), and keeps G >= 0.

After the fit each feature row of W is rescaled to unit norm (codes carry the magnitude), so a
feature is a direction over neurons; ``residual_directions`` maps it to the residual stream.
As a Dictionary: d_in = d_mlp, d_sae = r, ``encode`` solves min_{c >= 0} ||x - c W||^2 with W fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from probe.errors import SteerscopeError, suggest
from saes.base import Dictionary, DictionaryConfig, DictOutput, register

Init = Literal["random", "kmeans", "svd"]
INITS = ("random", "kmeans", "svd")
_CHUNK = 65_536  # rows per chunk when computing the loss


@dataclass
class SNMFConfig(DictionaryConfig):
    sparsity: float = 0.01  # fraction of d_mlp neurons kept per feature, in (0, 1]
    encode_iters: int = 200  # projected-gradient (FISTA) iterations of encode's nonnegative solve
    ridge: float = 1e-6  # ridge of the least-squares solves, relative to the mean Gram diagonal
    apply_b_dec_to_input: bool = False  # SNMF has no bias
    normalize_decoder: bool = False  # features are unit rows after fit_snmf; no gradient trainer

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.sparsity)
        if not isinstance(self.encode_iters, int) or self.encode_iters < 1:
            raise SteerscopeError(f"encode_iters must be a positive integer, got {self.encode_iters!r}")
        if not self.ridge >= 0:
            raise SteerscopeError(f"ridge must be >= 0, got {self.ridge!r}")


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, int | float) or not 0 < sparsity <= 1:
        raise SteerscopeError(f"sparsity must be in (0, 1] (fraction of neurons kept per feature), got {sparsity!r}")


def n_kept(sparsity: float, d_mlp: int) -> int:
    """Entries kept per feature: k = max(1, ceil(sparsity * d_mlp)) (float fuzz trimmed first)."""
    return max(1, math.ceil(round(sparsity * d_mlp, 9)))


# --- the algebra ------------------------------------------------------------------------------
def pos(M: Tensor) -> Tensor:
    """M^+ = (|M| + M) / 2."""
    return (M.abs() + M) / 2


def neg(M: Tensor) -> Tensor:
    """M^- = (|M| - M) / 2, so M = M^+ - M^-."""
    return (M.abs() - M) / 2


def ridge_solve(gram: Tensor, rhs: Tensor, ridge: float) -> Tensor:
    """Solve (gram + lam I) S = rhs with lam = ridge * mean(diag(gram)) (and at least 1e-12)."""
    lam = max(ridge * float(gram.diagonal().mean()), 1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, rhs)


def sparsify_rows(W: Tensor, k: int) -> Tensor:
    """Keep the k largest-|.| entries of each row of W [r, d] (exactly k, ties broken by topk)."""
    idx = W.abs().topk(k, dim=1, sorted=False).indices
    return torch.zeros_like(W).scatter_(1, idx, W.gather(1, idx))


def sq_loss(X: Tensor, G: Tensor, W: Tensor) -> float:
    """L = ||X - G W||_F^2, accumulated over row chunks (no full [N, d] residual held)."""
    total = 0.0
    for s in range(0, X.shape[0], _CHUNK):
        total += float((X[s:s + _CHUNK] - G[s:s + _CHUNK] @ W).pow(2).sum())
    return total


def dlj_update(G: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    """Ding-Li-Jordan step G * sqrt(num / den), num = P^+ + G Q^-, den = P^- + G Q^+.

    Evaluated as sqrt(G * num * (G / den)): since den >= G Q_jj, G / den <= 1 / Q_jj stays finite
    when G underflows (num / den alone overflows there). den == 0 (a dead feature) keeps G.
    """
    num, den = pos(P) + G @ neg(Q), neg(P) + G @ pos(Q)
    live = den > 0
    frac = torch.where(live, G / torch.where(live, den, 1.0), 0.0)
    return torch.where(live, (G * num * frac).sqrt(), G)


class Step(NamedTuple):
    W: Tensor  # [r, d_mlp] sparse features after the step
    G: Tensor  # [N, r] nonnegative coefficients after the step
    loss_before: float  # L after steps 1-3 (before the G update)
    loss_after: float  # L after the G update (<= loss_before)


def snmf_step(X: Tensor, G: Tensor, k: int, ridge: float = 1e-6) -> Step:
    """One SNMF iteration (steps 1-4 of the module docstring) on X [N, d], G [N, r] >= 0."""
    W = sparsify_rows(ridge_solve(G.T @ G, G.T @ X, ridge), k)
    norms = G.norm(dim=0).clamp_min(1e-12)
    G, W = G / norms, W * norms[:, None]
    before = sq_loss(X, G, W)
    G = dlj_update(G, X @ W.T, W @ W.T)
    return Step(W, G, before, sq_loss(X, G, W))


# --- initialisation ---------------------------------------------------------------------------
def kmeans(X: Tensor, r: int, gen: torch.Generator, n_iter: int = 20) -> Tensor:
    """Plain Lloyd k-means on the rows of X; returns labels [N]. Empty clusters get a random row."""
    N = X.shape[0]
    centres = X[torch.randperm(N, generator=gen)[:r].to(X.device)]
    for _ in range(n_iter):
        d2 = X.pow(2).sum(1, keepdim=True) - 2 * X @ centres.T + centres.pow(2).sum(1)
        labels = d2.argmin(1)
        counts = torch.bincount(labels, minlength=r)
        sums = torch.zeros_like(centres).index_add_(0, labels, X)
        centres = sums / counts.clamp_min(1)[:, None].to(X.dtype)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            centres[empty] = X[torch.randint(N, (len(empty),), generator=gen).to(X.device)]
    return labels


def svd_init(X: Tensor, r: int, gen: torch.Generator) -> Tensor:
    """G0 = U_r sqrt(S_r) of X = U S V^T (via eigh of X^T X), signs flipped to positive mass, clipped."""
    evals, V = torch.linalg.eigh(X.T @ X)
    m = min(r, X.shape[1])
    evals, V = evals.flip(0)[:m].clamp_min(1e-12), V.flip(1)[:, :m]
    G = X @ V / evals.pow(0.25)  # U S^{1/2} = X V S^{-1/2}
    G = G * torch.where(G.sum(0) < 0, -1.0, 1.0).to(G)
    if m < r:
        G = torch.cat([G, torch.rand(X.shape[0], r - m, generator=gen).to(G) * G.abs().mean()], 1)
    return G.clamp_min(1e-3 * float(G.abs().max()))


def init_coefficients(X: Tensor, r: int, init: str, seed: int) -> Tensor:
    """G0 [N, r] > 0 for ``init`` in random | kmeans (one-hot + 0.2, Ding et al.) | svd."""
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        return torch.rand(X.shape[0], r, generator=gen).clamp_min(1e-3).to(X)
    if init == "kmeans":
        labels = kmeans(X, r, gen)
        return torch.nn.functional.one_hot(labels, r).to(X) + 0.2
    return svd_init(X, r, gen)


# --- data -------------------------------------------------------------------------------------
def collect(data: Any, site: str | None, n_tokens: int | None, batch_size: int) -> Tensor:
    """Rows [N, d_mlp] from a tensor (leading dims flattened) or from ``data.batches(site, ...)``."""
    if hasattr(data, "batches"):
        if site is None:
            raise SteerscopeError("fitting SNMF from an activation store needs site= (e.g. 'blocks.2.mlp.hook_post')")
        rows, n = [], 0
        for b in data.batches(site, batch_size=batch_size, shuffle=False):
            rows.append(torch.as_tensor(b).reshape(-1, b.shape[-1]))
            n += rows[-1].shape[0]
            if n_tokens is not None and n >= n_tokens:
                break
        if not rows:
            raise SteerscopeError(f"the store yielded no activations for site {site!r}")
        X = torch.cat(rows)
    elif isinstance(data, Tensor):
        if data.ndim < 2:
            raise SteerscopeError(f"activations must be [N, d_mlp] (tokens x neurons), got shape {tuple(data.shape)}")
        X = data.reshape(-1, data.shape[-1])
    else:
        raise SteerscopeError(f"fit_snmf takes a tensor [N, d_mlp] or an ActivationStore, got {type(data).__name__}")
    return X if n_tokens is None else X[:n_tokens]


def check_fit_args(X: Tensor, rank: int, sparsity: float, init: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise SteerscopeError(f"rank must be a positive integer, got {rank!r}")
    check_sparsity(sparsity)
    if init not in INITS:
        raise SteerscopeError(f"unknown init {init!r}.{suggest(init, INITS)} Known: {', '.join(INITS)}")
    if X.shape[0] < rank:
        raise SteerscopeError(f"SNMF needs at least rank={rank} tokens, got {X.shape[0]}")
    if not bool(torch.isfinite(X).all()):
        n_bad = int((~torch.isfinite(X)).sum())
        raise SteerscopeError(f"activations contain {n_bad} NaN/inf values; SNMF refuses to fit on them")


# --- the dictionary ---------------------------------------------------------------------------
@dataclass
class FitResult:
    """What ``fit_snmf`` leaves on ``snmf.fit_result``: the training coefficients and per-iteration losses."""

    coefficients: Tensor  # [N, r] G >= 0 of the best iterate, rescaled to the unit-row features
    losses_before: list[float] = field(default_factory=list)  # L before each G update
    losses_after: list[float] = field(default_factory=list)  # L after each G update
    best_iter: int = -1
    stopped_early: bool = False


@register("snmf")
class SNMF(Dictionary):
    """Sparse mixed-sign features W_dec [r, d_mlp] with nonnegative codes; recon = codes @ W_dec."""

    Config = SNMFConfig
    trainable_by_gradient = False  # fit by fit_snmf (alternating updates), not by an optimizer

    def __init__(self, cfg: SNMFConfig):
        super().__init__(cfg)
        W = torch.randn(cfg.d_sae, cfg.d_in)
        self.W_dec = nn.Parameter(W / W.norm(dim=1, keepdim=True), requires_grad=False)
        self.fit_result: FitResult | None = None

    @property
    def Z(self) -> Tensor:
        """The paper's Z [d_mlp, r] (features as columns), a view of W_dec."""
        return self.W_dec.T

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Codes c [..., r] = argmin_{c >= 0} ||x - c W||^2, by FISTA projected gradient.

        Start from the least-squares solution clipped at 0, then ``encode_iters`` steps of
        c <- max(0, y - (y Q - P) / L) with Nesterov momentum y, P = x W^T, Q = W W^T and
        L = lambda_max(Q). Fixed iteration count, so deterministic.
        """
        self.check_input(x)
        shape, x = x.shape, x.reshape(-1, x.shape[-1]).to(self.W_dec.dtype)
        W = self.W_dec
        P, Q = x @ W.T, W @ W.T
        lip = float(torch.linalg.eigvalsh(Q)[-1].clamp_min(1e-12))
        c = ridge_solve(Q, P.T, self.cfg.ridge).T.clamp_min(0)
        y, t = c, 1.0
        for _ in range(self.cfg.encode_iters):
            c_next = (y - (y @ Q - P) / lip).clamp_min(0)
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = c_next + ((t - 1) / t_next) * (c_next - c)
            c, t = c_next, t_next
        return c.reshape(*shape[:-1], self.cfg.d_sae)

    def decode(self, codes: Tensor) -> Tensor:
        """recon = codes @ W_dec = (Z codes^T)^T."""
        return codes @ self.W_dec

    def forward(self, x: Tensor, target: Tensor | None = None) -> DictOutput:
        if target is not None:
            raise SteerscopeError("SNMF reconstructs its input; it takes no target")
        codes = self.encode(x)
        return DictOutput(self.decode(codes), codes, {})

    def training_loss(self, x: Tensor, target: Tensor | None = None, **state: Any):
        raise NotImplementedError("SNMF is fit by saes.snmf.fit_snmf (alternating least squares and "
                                  "multiplicative updates), not by gradient descent")


def _run(X: Tensor, G: Tensor, k: int, max_iter: int, tol: float, patience: int, progress: bool):
    """Iterate ``snmf_step``; keep the best iterate; stop after ``patience`` steps whose relative
    improvement over the best loss, (best - L) / best, is <= tol."""
    best, best_W, best_G, bad = math.inf, G.new_zeros(0), G, 0
    res = FitResult(coefficients=G)
    bar = tqdm(range(max_iter), desc="snmf", disable=not progress, leave=False)
    for it in bar:
        W, G, before, after = snmf_step(X, G, k)
        if not math.isfinite(after):
            raise SteerscopeError(f"SNMF diverged at iteration {it} (loss {after}); try another init or seed")
        res.losses_before.append(before)
        res.losses_after.append(after)
        if best == math.inf or (best - after) > tol * best:
            best, best_W, best_G, bad, res.best_iter = after, W, G, 0, it
        else:
            bad += 1
        if it % 10 == 0:
            bar.set_postfix(loss=f"{after:.4g}", best=f"{best:.4g}")
        if bad >= patience:
            res.stopped_early = True
            break
    bar.close()
    res.coefficients = best_G
    return best_W, res


@torch.no_grad()
def fit_snmf(data: Any, rank: int, sparsity: float = 0.01, init: Init = "random", max_iter: int = 1000,
             tol: float = 1e-6, patience: int = 50, seed: int = 0, device: str | torch.device = "cpu",
             site: str | None = None, n_tokens: int | None = None, batch_size: int = 4096,
             dtype: torch.dtype = torch.float32, progress: bool = True, model: str | None = None) -> SNMF:
    """Fit SNMF to activations: X [N, d_mlp] (a tensor, or ``data.batches(site, ...)`` of a store).

    Returns an ``SNMF`` on ``device`` with unit-norm feature rows; ``snmf.fit_result`` holds the training
    coefficients [N, r] (the paper's Y^T, rescaled to match) and the per-iteration losses.
    """
    X = collect(data, site, n_tokens, batch_size)
    check_fit_args(X, rank, sparsity, init)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise SteerscopeError(f"max_iter must be a positive integer, got {max_iter!r}")
    X = X.to(device=device, dtype=dtype)
    k = n_kept(sparsity, X.shape[1])
    G0 = init_coefficients(X, rank, init, seed)
    W, res = _run(X, G0, k, max_iter, tol, patience, progress)
    norms = W.norm(dim=1).clamp_min(1e-12)  # unit feature rows; codes carry the scale
    res.coefficients = res.coefficients * norms
    cfg = SNMFConfig(d_in=X.shape[1], d_sae=rank, sparsity=sparsity, site=site, model=model, training={
        "init": init, "max_iter": max_iter, "tol": tol, "patience": patience, "seed": seed, "n_tokens": X.shape[0],
        "n_iter": len(res.losses_after), "best_iter": res.best_iter, "loss": res.losses_after[res.best_iter],
        "fvu_uncentred": res.losses_after[res.best_iter] / max(float(X.pow(2).sum()), 1e-30), "kept_per_feature": k})
    snmf = SNMF(cfg).to(device=device, dtype=dtype)
    snmf.W_dec.copy_(W / norms[:, None])
    snmf.fit_result = res
    return snmf


# --- mapping features -------------------------------------------------------------------------
class TopContexts(NamedTuple):
    values: Tensor  # [r, k] largest coefficients per feature, descending
    indices: Tensor  # [r, k] row (token) indices into the flattened activations


@torch.no_grad()
def top_contexts(snmf: SNMF, acts: Tensor, k: int = 25, batch_size: int = 4096) -> TopContexts:
    """Per feature, the k tokens (rows of acts [..., d_mlp], flattened) with the largest codes."""
    X = acts.reshape(-1, acts.shape[-1])
    if not 1 <= k <= X.shape[0]:
        raise SteerscopeError(f"k must be between 1 and the number of tokens ({X.shape[0]}), got {k}")
    vals = torch.empty(snmf.cfg.d_sae, 0, device=snmf.W_dec.device)
    idx = torch.empty(snmf.cfg.d_sae, 0, dtype=torch.long, device=vals.device)
    for s in range(0, X.shape[0], batch_size):
        codes = snmf.encode(X[s:s + batch_size].to(snmf.W_dec)).T  # [r, b]
        rows = torch.arange(s, s + codes.shape[1], device=vals.device).expand_as(codes)
        vals, idx = torch.cat([vals, codes], 1), torch.cat([idx, rows], 1)
        vals, pick = vals.topk(min(k, vals.shape[1]), dim=1)
        idx = idx.gather(1, pick)
    return TopContexts(vals, idx)


def residual_directions(snmf: SNMF, W_out: Tensor, normalize: bool = False) -> Tensor:
    """Features in the residual stream: Z^T W_out = W_dec @ W_out [r, d_model] (TL's W_out is
    [d_mlp, d_model]); rows scaled to unit norm if ``normalize``."""
    if W_out.ndim != 2 or W_out.shape[0] != snmf.cfg.d_in:
        raise SteerscopeError(f"W_out must be [d_mlp={snmf.cfg.d_in}, d_model], got {tuple(W_out.shape)}")
    D = snmf.W_dec.detach() @ W_out.detach().to(snmf.W_dec)
    return D / D.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize else D
