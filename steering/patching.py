"""Activation patching and subspace patching.

An interchange intervention runs the *source* input, caches the activation h_s at one site, then
runs the *base* input with the base's own activation h_b replaced (at the chosen positions) by

* full patch:              h' = h_s
* 1-D subspace (v):        h' = h_b + ((v.h_s - v.h_b) / |v|^2) v      (v = 0: h' = h_b)
* rank-r subspace (B):     h' = h_b + B B^T (h_s - h_b),   B [d, r] with orthonormal columns

The 1-D patch is the rank-1 patch with B = v/|v|. Both act on the site's last dimension. Patching
the base with its own activation (source = base) is the identity, bit for bit.

Prompts may differ in length, within a batch and between a base and its source (``steering.padding``):
batches are right-padded; a position p >= 0 is the p-th token from the start (BOS = 0) of every prompt and
p < 0 counts back from each prompt's own last token, so -1 patches each source's last token into its base's
last token; metrics read end-aligned logits (column -1 = each prompt's last token). A padded batch gives,
row by row, what each pair gives alone. Illusion diagnostics for subspace patches: ``steering.illusion``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from probe.errors import SteerscopeError
from probe.hooks import capture, hooks
from probe.sites import resolve_one
from steering.padding import Padded, as_padded, columns, default_positions, end_aligned, pair

Positions = int | Sequence[int] | None
Metric = Callable[[torch.Tensor], torch.Tensor]


def _positions(positions: Positions) -> tuple[int, ...] | None:
    if positions is None:
        return None
    items = [positions] if isinstance(positions, int) else list(positions)
    if not items or not all(isinstance(p, int) and not isinstance(p, bool) for p in items):
        raise SteerscopeError(f"positions must be None, an int, or a non-empty list of ints, got {positions!r}")
    return tuple(items)


@dataclass(frozen=True, repr=False)
class Patch:
    """One interchange intervention at ``site``: the whole activation (``basis=None``) or a subspace.

    ``basis`` is [d, r] with orthonormal columns (r = 0 means "patch nothing"); ``positions`` are
    sequence positions (p >= 0 from the start, p < 0 from each prompt's last token), ``None`` for all.
    """

    site: str
    basis: torch.Tensor | None = None
    positions: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "positions", _positions(self.positions))
        if self.basis is not None and (self.basis.ndim != 2 or not self.basis.is_floating_point()):
            raise SteerscopeError(f"a patch basis must be a float [d, r] tensor, got shape {tuple(self.basis.shape)}")

    @classmethod
    def full(cls, site: str, positions: Positions = None) -> Patch:
        return cls(site, None, positions)

    @classmethod
    def direction(cls, site: str, v: torch.Tensor, positions: Positions = None) -> Patch:
        """1-D patch along v (any norm; v = 0 patches nothing)."""
        v = torch.as_tensor(v).detach().float()
        if v.ndim != 1:
            raise SteerscopeError(f"a direction must be a 1-D tensor [d], got shape {tuple(v.shape)}")
        norm = v.norm()
        basis = (v / norm)[:, None] if norm > 0 else v[:, None][:, :0]
        return cls(site, basis, positions)

    @classmethod
    def subspace(cls, site: str, basis: torch.Tensor, positions: Positions = None, atol: float = 1e-4) -> Patch:
        """Rank-r patch; ``basis`` [d, r] must have orthonormal columns (checked to ``atol``)."""
        basis = torch.as_tensor(basis).detach().float()
        if basis.ndim != 2 or basis.shape[1] > basis.shape[0]:
            raise SteerscopeError(f"a subspace basis must be [d, r] with r <= d, got shape {tuple(basis.shape)}")
        gram = basis.T @ basis
        if not torch.allclose(gram, torch.eye(basis.shape[1]), atol=atol):
            raise SteerscopeError("the subspace basis columns are not orthonormal (B^T B != I); orthonormalise it, "
                                  "e.g. with torch.linalg.qr(B).Q")
        return cls(site, basis, positions)

    @property
    def rank(self) -> int | None:
        return None if self.basis is None else self.basis.shape[1]

    def mix(self, h_b: torch.Tensor, h_s: torch.Tensor) -> torch.Tensor:
        """The patched activation h' from base h_b and source h_s (same shape, last dim d)."""
        if self.basis is None:
            return h_s
        b = self.basis.to(h_b.device, h_b.dtype)
        if b.shape[0] != h_b.shape[-1]:
            raise SteerscopeError(f"patch basis has dimension {b.shape[0]} but {self.site} has {h_b.shape[-1]}")
        return h_b + ((h_s - h_b) @ b) @ b.T

    def __repr__(self) -> str:
        what = "full" if self.basis is None else f"rank={self.rank}, d={self.basis.shape[0]}"
        pos = "all" if self.positions is None else list(self.positions)
        return f"Patch({self.site!r}, {what}, positions={pos})"

    def save(self, path: str | Path) -> Path:
        """A directory: ``patch.json`` (+ ``patch.safetensors`` holding the basis)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"kind": "patch", "site": self.site, "positions": self.positions, "rank": self.rank}
        (path / "patch.json").write_text(json.dumps(meta, indent=1) + "\n")
        if self.basis is not None:
            save_file({"basis": self.basis.contiguous().cpu()}, str(path / "patch.safetensors"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        path = Path(path)
        try:
            meta = json.loads((path / "patch.json").read_text())
            if set(meta) != {"kind", "site", "positions", "rank"} or meta["kind"] != "patch":
                raise KeyError("keys")
            basis = load_file(str(path / "patch.safetensors"))["basis"] if meta["rank"] is not None else None
        except (OSError, KeyError, ValueError) as err:
            raise SteerscopeError(f"{path} is not a saved patch ({type(err).__name__}: {err})") from err
        if basis is not None and basis.shape[1] != meta["rank"]:
            raise SteerscopeError(f"{path}: basis has rank {basis.shape[1]}, patch.json says {meta['rank']}")
        return cls(meta["site"], basis, meta["positions"])


def as_tokens(model, x) -> Padded:
    """A right-padded batch from a tensor, a ``Padded`` or a list of strings; see ``steering.padding``."""
    return as_padded(model, x)


def paired_tokens(model, base, source) -> tuple[Padded, Padded]:
    """Base and source batches, one row per pair, of one width (a base and its source may differ in length)."""
    return pair(model, base, source)


@torch.no_grad()
def cache_site(model, tokens, site: str) -> torch.Tensor:
    """The activation at ``site`` (already resolved) for ``tokens`` (a tensor or ``Padded``); [batch, pos, ...]."""
    tokens = tokens.tokens if isinstance(tokens, Padded) else tokens
    with capture(model, site) as acts:
        model(tokens)
    h = acts[site]
    if h.ndim < 3 or tuple(h.shape[:2]) != tuple(tokens.shape):
        raise SteerscopeError(f"{site} gives shape {tuple(h.shape)}, not [batch, pos, ...]; patch a per-position "
                              "site (e.g. hook_resid_*, mlp.hook_post, attn.hook_z)")
    return h


def pair_columns(base: Padded, source: Padded, positions: tuple[int, ...] | None):
    """(base columns, source columns), each [B, P], of ``positions``; ``None`` for every position (which needs
    each base and its source to have the same length)."""
    if positions is None:
        if not torch.equal(base.lengths, source.lengths):
            raise SteerscopeError("patching every position needs each base prompt to have as many tokens as its source "
                                  f"(lengths {base.lengths.tolist()} vs {source.lengths.tolist()}); give positions, "
                                  "e.g. -1 for the last token")
        return None
    return columns(base.lengths, positions), columns(source.lengths, positions)


def patched_logits(model, site: str, positions: tuple[int, ...] | None, base: Padded, source: Padded,
                   h_s: torch.Tensor, mix: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """End-aligned logits of ``base`` with ``site`` at ``positions`` replaced by ``mix(h_b, h_s)``, h_s taken at
    the source's own columns of those positions (differentiable in mix)."""
    cols = pair_columns(base, source, positions)
    if cols is not None:
        rows = torch.arange(len(base), device=h_s.device)[:, None]
        cb, cs = cols[0].to(h_s.device), cols[1].to(h_s.device)
        h_s = h_s[rows, cs]  # [B, P, ...]: the source's activations at its own columns

    def fn(h_b: torch.Tensor, hook) -> torch.Tensor:
        out = h_b.clone()
        if cols is None:
            out[:] = mix(h_b, h_s.to(h_b.dtype))
        else:
            out[rows, cb] = mix(h_b[rows, cb], h_s.to(h_b.dtype))
        return out

    with hooks(model, [(site, fn)]):
        return end_aligned(model(base.tokens), base.lengths)


def run_patch(model, p: Patch, base_tokens, source_tokens, metric: Metric | None = None):
    """Apply ``p`` to (base, source): the patched, end-aligned logits [batch, pos, vocab], or ``metric(logits)``."""
    base, source = paired_tokens(model, base_tokens, source_tokens)
    site = resolve_one(model, p.site)
    h_s = cache_site(model, source, site)
    with torch.no_grad():
        logits = patched_logits(model, site, p.positions, base, source, h_s, p.mix)
    return logits if metric is None else metric(logits)


def patch(model, base_tokens, source_tokens, site: str, positions: Positions = None,
          metric: Metric | None = None):
    """Activation patching: the base run with the whole ``site`` activation taken from the source run."""
    return run_patch(model, Patch.full(site, positions), base_tokens, source_tokens, metric)


def subspace_patch(model, base_tokens, source_tokens, site: str, direction: torch.Tensor,
                   positions: Positions = None, metric: Metric | None = None):
    """Subspace patching: ``direction`` [d] is a 1-D patch along v; [d, r] a rank-r orthonormal basis."""
    direction = torch.as_tensor(direction)
    p = (Patch.direction(site, direction, positions) if direction.ndim == 1
         else Patch.subspace(site, direction, positions))
    return run_patch(model, p, base_tokens, source_tokens, metric)


def logit_diff(good, bad, position: int = -1) -> Metric:
    """Metric: mean over the batch of logit[good] - logit[bad] at ``position`` (ints or [batch] tensors).

    Metrics get end-aligned logits (``steering.padding``): ``position=-1`` is each prompt's last real token.
    """
    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, position]
        rows = torch.arange(last.shape[0], device=last.device)
        g = torch.as_tensor(good, device=last.device).expand(last.shape[0])
        b = torch.as_tensor(bad, device=last.device).expand(last.shape[0])
        return (last[rows, g] - last[rows, b]).mean()
    return metric


def metric_range(model, base, source, metric: Metric) -> tuple[float, float]:
    """``(metric(base run), metric(source run))``; refuses pairs on which the metric does not differ."""
    base, source = paired_tokens(model, base, source)
    with torch.no_grad():
        m_base = float(metric(end_aligned(model(base.tokens), base.lengths)))
        m_src = float(metric(end_aligned(model(source.tokens), source.lengths)))
    if abs(m_src - m_base) < 1e-9:
        raise SteerscopeError("the metric is the same on base and source runs, so no patch effect can be measured; "
                              "choose pairs that differ in the behaviour")
    return m_base, m_src


@dataclass(frozen=True)
class PatchingGrid:
    """Effects of full activation patches, one (site, position) at a time, as fractions of the source-base gap.

    ``effects[i, j]`` = (metric(base with sites[i] at position j from source) - metric(base)) / (metric(source) -
    metric(base)): 1 means that activation alone carries the source's behaviour, 0 that it carries none of it.
    """

    sites: list[str]
    positions: list[int]
    effects: torch.Tensor  # [len(sites), len(positions)]
    metric_base: float
    metric_source: float

    def figure(self, labels: Sequence[str] | None = None):
        """A plotly heatmap (sites down, positions across; ``labels`` name the positions)."""
        import plotly.graph_objects as go

        x = [f"{p}: {t}" for p, t in zip(self.positions, labels, strict=True)] if labels is not None else self.positions
        cells = [[f"{v if abs(v) >= 0.005 else 0.0:.2f}" for v in row] for row in self.effects.tolist()]
        fig = go.Figure(go.Heatmap(z=self.effects.tolist(), x=x, y=self.sites, zmid=0, colorscale="RdBu",
                                   colorbar=dict(title="effect"), text=cells, texttemplate="%{text}"))
        fig.update_layout(title="Activation patching: fraction of the source − base metric gap", yaxis_autorange="reversed",
                          height=max(300, 40 * len(self.sites) + 150))
        return fig


def patching_grid(model, base_tokens, source_tokens, sites, metric: Metric,
                  positions: Sequence[int] | None = None) -> PatchingGrid:
    """Activation patching at every resolved site (a name, glob or list) and every position.

    Default positions: every column when all prompts have one length, else the shortest prompt's length counted
    from the end (``steering.padding.default_positions``).
    """
    from probe.sites import resolve

    base, source = paired_tokens(model, base_tokens, source_tokens)
    names = resolve(model, sites)
    m_base, m_src = metric_range(model, base, source, metric)
    gap = m_src - m_base
    if positions is None:
        pos = default_positions(base, source)
    else:
        pos = list(_positions(positions))
        pair_columns(base, source, tuple(pos))  # checks every position against every prompt
        if not (base.padded or source.padded):
            pos = [p % base.width for p in pos]
    effects = torch.zeros(len(names), len(pos))
    for i, site in enumerate(names):
        h_s = cache_site(model, source, site)
        for j, p in enumerate(pos):
            with torch.no_grad():
                m = float(metric(patched_logits(model, site, (p,), base, source, h_s, Patch.full(site).mix)))
            effects[i, j] = (m - m_base) / gap
    return PatchingGrid(names, pos, effects, m_base, m_src)


@dataclass(frozen=True)
class HeadPatching:
    """Effects of patching one attention head's output (``attn.hook_z`` of that head, every position) at a time.

    ``effects[L, h]`` = (metric(base with head h of layer L from the source) - metric(base)) / (metric(source) -
    metric(base)), as in :class:`PatchingGrid`; ``ranking()`` orders heads by |effect| (a head that pushes against
    the behaviour, like IOI's negative name movers, ranks as high as one that carries it).
    """

    effects: torch.Tensor  # [n_layers, n_heads]
    metric_base: float
    metric_source: float
    seconds: float

    def ranking(self) -> list[tuple[int, int]]:
        order = self.effects.abs().flatten().argsort(descending=True, stable=True)
        n_heads = self.effects.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def head_patching(model, base_tokens, source_tokens, metric: Metric, layers: Sequence[int] | None = None) -> HeadPatching:
    """Activation patching of every attention head (one forward pass of the batch per head): the baseline that
    ``saes.circuits.heads`` is measured against. Each base needs a source of its own length (all positions patch)."""
    import time

    t0 = time.perf_counter()
    base, source = paired_tokens(model, base_tokens, source_tokens)
    pair_columns(base, source, None)
    m_base, m_src = metric_range(model, base, source, metric)
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    effects = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for L in layers:
        site = f"blocks.{L}.attn.hook_z"
        h_s = cache_site(model, source, site)
        for h in range(model.cfg.n_heads):
            def mix(h_b, h_s, h=h):
                out = h_b.clone()
                out[..., h, :] = h_s[..., h, :]
                return out

            with torch.no_grad():
                m = float(metric(patched_logits(model, site, None, base, source, h_s, mix)))
            effects[L, h] = (m - m_base) / (m_src - m_base)
    return HeadPatching(effects, m_base, m_src, time.perf_counter() - t0)
