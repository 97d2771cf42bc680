"""Activation patching, subspace patching, and illusion diagnostics.

An interchange intervention runs the *source* input, caches the activation h_s at one site, then
runs the *base* input with the base's own activation h_b replaced (at the chosen positions) by

* full patch:              h' = h_s
* 1-D subspace (v):        h' = h_b + ((v.h_s - v.h_b) / |v|^2) v      (v = 0: h' = h_b)
* rank-r subspace (B):     h' = h_b + B B^T (h_s - h_b),   B [d, r] with orthonormal columns

The 1-D patch is the rank-1 patch with B = v/|v|. Both act on the site's last dimension. Patching
the base with its own activation (source = base) is the identity, bit for bit.

Illusion diagnostics (Makelov, Lange, Nanda, "Is This the Subspace You Are Looking for?"): the site is
read downstream only through a linear map x -> x @ R, R [d_site, d_out] (for MLP hidden units
``blocks.L.mlp.hook_post`` that is W_out [d_mlp, d_model]). The part of x the map cannot see is
ker(R^T) = {x : x @ R = 0}; its orthogonal complement is the column space of R (= the row space of
the map's matrix R^T). So v = v_row + v_null with v_row = U_r U_r^T v, U_r the left singular vectors
of R with non-zero singular values, and v_null @ R = 0. Patching along v changes the downstream input
by c (v_row @ R), where c = (v_row.Δ + v_null.Δ) / |v|^2 and Δ = h_s - h_b: if the coefficient is
driven by v_null.Δ (the null-space part varies with the input, but is invisible) while v_row is a
direction that never varies (dormant), the patch "works" by switching on a dormant pathway.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from probe.errors import SteerscopeError
from probe.hooks import capture, hooks
from probe.sites import resolve_one

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
    sequence positions (negative counts from the end), ``None`` for all.
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


def as_tokens(model, x) -> torch.Tensor:
    """Token ids [batch, pos] from a tensor or a list of strings (right-padded by ``model.to_tokens``)."""
    if isinstance(x, str):
        x = [x]
    if isinstance(x, list | tuple):
        if not x:
            raise SteerscopeError("empty prompt list: give at least one prompt")
        return model.to_tokens(list(x), padding_side="right")
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.is_floating_point() or x.numel() == 0:
        raise SteerscopeError(f"tokens must be a non-empty integer tensor [batch, pos], got {getattr(x, 'shape', x)!r}")
    return x


def paired_tokens(model, base, source) -> tuple[torch.Tensor, torch.Tensor]:
    base, source = as_tokens(model, base), as_tokens(model, source)
    if base.shape != source.shape:
        raise SteerscopeError(f"base tokens {tuple(base.shape)} and source tokens {tuple(source.shape)} must have the "
                              "same shape (pair each base with one source, aligned by position)")
    return base, source


@torch.no_grad()
def cache_site(model, tokens: torch.Tensor, site: str) -> torch.Tensor:
    """The activation at ``site`` (already resolved) for ``tokens``; must be [batch, pos, ...]."""
    with capture(model, site) as acts:
        model(tokens)
    h = acts[site]
    if h.ndim < 3 or tuple(h.shape[:2]) != tuple(tokens.shape):
        raise SteerscopeError(f"{site} gives shape {tuple(h.shape)}, not [batch, pos, ...]; patch a per-position "
                              "site (e.g. hook_resid_*, mlp.hook_post, attn.hook_z)")
    return h


def patched_logits(model, site: str, positions: tuple[int, ...] | None, base: torch.Tensor, h_s: torch.Tensor,
                   mix: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``base`` with ``site`` at ``positions`` replaced by ``mix(h_b, h_s)`` (differentiable in mix)."""
    n_pos = base.shape[1]
    if positions is not None and any(not -n_pos <= p < n_pos for p in positions):
        raise SteerscopeError(f"positions {list(positions)} out of range for sequences of length {n_pos}")
    idx = slice(None) if positions is None else [p % n_pos for p in positions]

    def fn(h_b: torch.Tensor, hook) -> torch.Tensor:
        out = h_b.clone()
        out[:, idx] = mix(h_b[:, idx], h_s[:, idx].to(h_b.dtype))
        return out

    with hooks(model, [(site, fn)]):
        return model(base)


def run_patch(model, p: Patch, base_tokens, source_tokens, metric: Metric | None = None):
    """Apply ``p`` to (base, source): the patched logits [batch, pos, vocab], or ``metric(logits)``."""
    base, source = paired_tokens(model, base_tokens, source_tokens)
    site = resolve_one(model, p.site)
    h_s = cache_site(model, source, site)
    with torch.no_grad():
        logits = patched_logits(model, site, p.positions, base, h_s, p.mix)
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
    """Metric: mean over the batch of logit[good] - logit[bad] at ``position`` (ints or [batch] tensors)."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, position]
        rows = torch.arange(last.shape[0], device=last.device)
        g = torch.as_tensor(good, device=last.device).expand(last.shape[0])
        b = torch.as_tensor(bad, device=last.device).expand(last.shape[0])
        return (last[rows, g] - last[rows, b]).mean()
    return metric


def metric_range(model, base: torch.Tensor, source: torch.Tensor, metric: Metric) -> tuple[float, float]:
    """``(metric(base run), metric(source run))``; refuses pairs on which the metric does not differ."""
    with torch.no_grad():
        m_base, m_src = float(metric(model(base))), float(metric(model(source)))
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
    """Activation patching at every resolved site (a name, glob or list) and every position (default: all)."""
    from probe.sites import resolve

    base, source = paired_tokens(model, base_tokens, source_tokens)
    names = resolve(model, sites)
    m_base, m_src = metric_range(model, base, source, metric)
    gap = m_src - m_base
    pos = list(range(base.shape[1])) if positions is None else [p % base.shape[1] for p in _positions(positions)]
    effects = torch.zeros(len(names), len(pos))
    for i, site in enumerate(names):
        h_s = cache_site(model, source, site)
        for j, p in enumerate(pos):
            with torch.no_grad():
                m = float(metric(patched_logits(model, site, (p,), base, h_s, Patch.full(site).mix)))
            effects[i, j] = (m - m_base) / gap
    return PatchingGrid(names, pos, effects, m_base, m_src)


# ----------------------------------------------------------------------------------------------- illusion


def default_reader(model, site: str) -> torch.Tensor:
    """The weights reading ``site`` downstream, as R [d_site, d_out] (x is read as x @ R)."""
    m = re.fullmatch(r"blocks\.(\d+)\.mlp\.hook_post", site)
    mlp = model.blocks[int(m.group(1))].mlp if m else None
    if mlp is None or not isinstance(getattr(mlp, "W_out", None), torch.Tensor):
        raise SteerscopeError(f"no default reader for {site}: pass reader=R [d_site, d_out], the weights through "
                              "which later layers read this site (defaults exist for dense blocks.L.mlp.hook_post)")
    return mlp.W_out.detach()


def split_direction(v: torch.Tensor, reader: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """v = v_row + v_null with v_row in the column space of R [d, d_out] and v_null @ R = 0."""
    v, r = v.detach().double(), reader.detach().double().cpu()
    if r.ndim != 2 or r.shape[0] != v.shape[0]:
        raise SteerscopeError(f"reader must be [d_site={v.shape[0]}, d_out], got shape {tuple(r.shape)}")
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    tol = (rtol if rtol is not None else max(r.shape) * torch.finfo(torch.float64).eps) * (s.max() if s.numel() else 0)
    u_r = u[:, s > tol]
    v_row = u_r @ (u_r.T @ v.cpu())
    return v_row.float(), (v.cpu() - v_row).float()


@dataclass(frozen=True)
class IllusionReport:
    """Effects of patching along v, v_row, v_null and the whole site, as fractions of the source-base gap.

    effect = (metric(patched) - metric(base)) / (metric(source) - metric(base)); 1 = behaves like source.
    ``null_share`` = sum(a_null * a) / sum(a^2) over patched tokens, a = v.Δ/|v|^2 the patch coefficient,
    a_null = v_null.Δ/|v|^2: the share of the coefficient driven by null-space variation (row share =
    1 - null share). ``illusion``: |effect_v| >= min_effect, null_share > 0.5 and |effect_row| < 0.5 |effect_v|.
    """

    site: str
    positions: tuple[int, ...] | None
    row_norm: float  # |v_row| / |v|
    null_norm: float  # |v_null| / |v|
    effect_full: float
    effect_v: float
    effect_row: float
    effect_null: float
    null_share: float
    metric_base: float
    metric_source: float
    illusion: bool

    def __repr__(self) -> str:
        flag = "ILLUSION (dormant pathway)" if self.illusion else "no illusion flagged"
        return (f"IllusionReport({self.site}, positions={self.positions}: {flag}; effect as fraction of source-base "
                f"gap: full={self.effect_full:.3f} v={self.effect_v:.3f} v_row={self.effect_row:.3f} "
                f"v_null={self.effect_null:.3f}; null_share={self.null_share:.3f}; "
                f"|v_row|={self.row_norm:.3f} |v_null|={self.null_norm:.3f})")

    def figure(self):
        """A plotly bar chart of the four effects."""
        import plotly.graph_objects as go

        names = ["whole site", "v", "v_row", "v_null"]
        vals = [self.effect_full, self.effect_v, self.effect_row, self.effect_null]
        fig = go.Figure(go.Bar(x=names, y=vals, text=[f"{x:.2f}" for x in vals], textposition="outside",
                               marker_color=["#888", "#4c72b0", "#55a868", "#c44e52"]))
        flag = " — ILLUSION flagged" if self.illusion else ""
        fig.update_layout(title=f"Subspace patch at {self.site}: null share {self.null_share:.2f}{flag}",
                          yaxis_title="fraction of source − base metric gap")
        return fig


def illusion_diagnostics(model, base_tokens, source_tokens, site: str, v: torch.Tensor, metric: Metric,
                         reader: torch.Tensor | None = None, positions: Positions = None,
                         min_effect: float = 0.1) -> IllusionReport:
    """Patch along v, its row-space part, its null-space part and the whole site; see ``IllusionReport``."""
    base, source = paired_tokens(model, base_tokens, source_tokens)
    site = resolve_one(model, site)
    v = torch.as_tensor(v).detach().float()
    if v.ndim != 1 or v.norm() == 0:
        raise SteerscopeError("v must be a non-zero 1-D direction [d_site]")
    v_row, v_null = split_direction(v, default_reader(model, site) if reader is None else reader)
    pos = _positions(positions)
    m_base, m_src = metric_range(model, base, source, metric)
    gap = m_src - m_base

    def effect(p: Patch) -> float:
        return (float(run_patch(model, p, base, source, metric)) - m_base) / gap

    h_b, h_s = cache_site(model, base, site), cache_site(model, source, site)
    idx = slice(None) if pos is None else [p % base.shape[1] for p in pos]
    delta = (h_s - h_b)[:, idx].reshape(-1, v.shape[0]).float().cpu()
    a, a_null = delta @ v, delta @ v_null
    denom = float((a * a).sum())
    null_share = float((a_null * a).sum()) / denom if denom > 0 else float("nan")
    e_v = effect(Patch.direction(site, v, pos))
    e_row = effect(Patch.direction(site, v_row, pos))
    illusion = abs(e_v) >= min_effect and null_share > 0.5 and abs(e_row) < 0.5 * abs(e_v)
    return IllusionReport(
        site=site, positions=pos, row_norm=float(v_row.norm() / v.norm()), null_norm=float(v_null.norm() / v.norm()),
        effect_full=effect(Patch.full(site, pos)), effect_v=e_v, effect_row=e_row,
        effect_null=effect(Patch.direction(site, v_null, pos)), null_share=null_share,
        metric_base=m_base, metric_source=m_src, illusion=bool(illusion),
    )
