"""Illusion diagnostics for subspace patches.

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

import re
from dataclasses import dataclass

import torch

from probe.errors import SteerscopeError
from probe.sites import resolve_one
from steering.patching import (
    Metric,
    Patch,
    Positions,
    _positions,
    cache_site,
    metric_range,
    pair_columns,
    paired_tokens,
    run_patch,
)


def default_reader(model, site: str) -> torch.Tensor:
    """The weights reading ``site`` downstream, as R [d_site, d_out] (x is read as x @ R)."""
    m = re.fullmatch(r"blocks\.(\d+)\.mlp\.hook_post", site)
    mlp = model.blocks[int(m.group(1))].mlp if m else None
    if mlp is None or not isinstance(getattr(mlp, "W_out", None), torch.Tensor):
        raise SteerscopeError(f"no default reader for {site}: pass reader=R [d_site, d_out], the weights through "
                              "which later layers read this site (defaults exist for dense blocks.L.mlp.hook_post)")
    return mlp.W_out.detach()


def row_basis(reader: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """U_r [d, rank]: orthonormal basis of the column space of R [d, d_out] (the part of the site R reads)."""
    r = reader.detach().double().cpu()
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    tol = (rtol if rtol is not None else max(r.shape) * torch.finfo(torch.float64).eps) * (s.max() if s.numel() else 0)
    return u[:, s > tol]


def split_direction(v: torch.Tensor, reader: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """v = v_row + v_null with v_row in the column space of R [d, d_out] and v_null @ R = 0."""
    v = v.detach().double().cpu()
    if reader.ndim != 2 or reader.shape[0] != v.shape[0]:
        raise SteerscopeError(f"reader must be [d_site={v.shape[0]}, d_out], got shape {tuple(reader.shape)}")
    u_r = row_basis(reader, rtol)
    v_row = u_r @ (u_r.T @ v)
    return v_row.float(), (v - v_row).float()


@dataclass(frozen=True)
class IllusionReport:
    """Effects of patching along v, v_row, v_null and the whole site, as fractions of the source-base gap.

    effect = (metric(patched) - metric(base)) / (metric(source) - metric(base)); 1 = behaves like source.
    ``null_share`` = sum(a_null * a) / sum(a^2) over patched tokens, a = v.Δ/|v|^2 the patch coefficient,
    a_null = v_null.Δ/|v|^2: the share of the coefficient driven by null-space variation (row share =
    1 - null share). ``illusion``: |effect_v| >= min_effect, null_share > 0.5 and |effect_row| < 0.5 |effect_v|.

    ``null_dim`` is the dimension of the part of the site the reader cannot see. When it is 0 (a residual-stream
    site read in full, reader = identity) there is no dormant pathway to find: ``applicable`` is False, the report
    says "not applicable" and ``illusion`` is False.
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
    null_dim: int = 0  # dimension of ker(R^T) in the site: what downstream weights cannot read

    @property
    def applicable(self) -> bool:
        """False when the reader sees the whole site (no null space), so the illusion check cannot apply."""
        return self.null_dim > 0

    @property
    def verdict(self) -> str:
        if not self.applicable:
            return "illusion check not applicable (the reader sees the whole site: no null space)"
        return "ILLUSION (dormant pathway)" if self.illusion else "no illusion flagged"

    def __repr__(self) -> str:
        flag = self.verdict
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
        flag = " — ILLUSION flagged" if self.illusion else "" if self.applicable else " — illusion check not applicable"
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
    reader = default_reader(model, site) if reader is None else torch.as_tensor(reader)
    v_row, v_null = split_direction(v, reader)
    null_dim = v.shape[0] - row_basis(reader).shape[1]
    pos = _positions(positions)
    m_base, m_src = metric_range(model, base, source, metric)
    gap = m_src - m_base

    def effect(p: Patch) -> float:
        return (float(run_patch(model, p, base, source, metric)) - m_base) / gap

    h_b, h_s = cache_site(model, base, site), cache_site(model, source, site)
    cols = pair_columns(base, source, pos)
    if cols is None:  # every real token (base and source have the same lengths)
        real = torch.arange(base.width, device=base.lengths.device)[None, :] < base.lengths[:, None]
        delta = (h_s - h_b)[real.to(h_s.device)]
    else:
        rows = torch.arange(len(base), device=h_s.device)[:, None]
        delta = h_s[rows, cols[1].to(h_s.device)] - h_b[rows, cols[0].to(h_s.device)]
    delta = delta.reshape(-1, v.shape[0]).float().cpu()
    a, a_null = delta @ v, delta @ v_null
    denom = float((a * a).sum())
    null_share = float((a_null * a).sum()) / denom if denom > 0 else float("nan")
    e_v = effect(Patch.direction(site, v, pos))
    e_row = effect(Patch.direction(site, v_row, pos))
    illusion = null_dim > 0 and abs(e_v) >= min_effect and null_share > 0.5 and abs(e_row) < 0.5 * abs(e_v)
    return IllusionReport(
        site=site, positions=pos, row_norm=float(v_row.norm() / v.norm()), null_norm=float(v_null.norm() / v.norm()),
        effect_full=effect(Patch.full(site, pos)), effect_v=e_v, effect_row=e_row,
        effect_null=effect(Patch.direction(site, v_null, pos)), null_share=null_share,
        metric_base=m_base, metric_source=m_src, illusion=bool(illusion), null_dim=int(null_dim),
    )
