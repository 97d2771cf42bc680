"""``steerscope patch``: activation-patching grids, and subspace patches with illusion diagnostics."""

from __future__ import annotations

from pathlib import Path

import typer

from probe.errors import SteerscopeError


def register(app: typer.Typer) -> None:
    app.command("patch")(patch_cmd)


def patch_cmd(
    base: str = typer.Argument(None, help="base prompt: the run that gets patched"),
    source: str = typer.Argument(None, help="source prompt: where the activations come from (it may have another "
                                            "length than BASE; positions are then counted from the last token)"),
    good: str = typer.Option(..., help="token the source favours, e.g. ' she'; metric = logit[good] - logit[bad] at "
                                       "each prompt's last token"),
    bad: str = typer.Option(..., help="token the base favours, e.g. ' he'"),
    model: str = typer.Option("austen-dense", help="zoo name, TL name or local HF dir"),
    pairs: Path = typer.Option(None, help="TSV file, one 'base<TAB>source' pair per line (instead of BASE SOURCE)"),
    site: list[str] = typer.Option(["blocks.*.hook_resid_pre"], help="sites to patch: names or globs (repeatable)"),
    direction: Path = typer.Option(None, help="a saved steering vector or patch directory: patch only along it "
                                              "(subspace patching); at blocks.L.mlp.hook_post also run the illusion "
                                              "diagnostics"),
    position: list[int] = typer.Option(None, help="with --direction: positions to patch (repeatable; 0 = BOS, -1 = "
                                                  "the last token; default all, which needs equal lengths)"),
    plot: Path = typer.Option(None, help="save the heatmap (or the diagnostics bar chart) here, as .html"),
) -> None:
    """Activation patching: print, for each site and position, the fraction of the source − base metric gap that
    patching that one activation from the source run recovers; save it as a heatmap. With --direction, patch a
    subspace instead and report how much of its effect rides on directions downstream weights cannot read.

    Prompts of different lengths are right-padded; the metric is read at each prompt's own last token, and when
    the lengths differ the grid's positions count back from the last token (-1 = the last token)."""
    from probe.models import load_model
    from steering.effects import token_id
    from steering.patching import logit_diff, paired_tokens

    m = load_model(model)
    bases, sources = _pairs(base, source, pairs)
    metric = logit_diff(token_id(m, good), token_id(m, bad))
    base_t, source_t = paired_tokens(m, bases, sources)
    if direction is None:
        _grid(m, base_t, source_t, site, metric, plot)
    else:
        _subspace(m, base_t, source_t, site, direction, position or None, metric, plot)


def _pairs(base: str | None, source: str | None, pairs: Path | None) -> tuple[list[str], list[str]]:
    if pairs is not None:
        if base is not None or source is not None:
            raise SteerscopeError("give BASE SOURCE or --pairs FILE, not both")
        from probe.corpus import read_text_file

        rows = [ln.split("\t") for ln in read_text_file(pairs, "pairs file").splitlines() if ln.strip()]
        bad = [i + 1 for i, r in enumerate(rows) if len(r) != 2 or not all(s.strip() for s in r)]
        if not rows or bad:
            raise SteerscopeError(f"{pairs}: want one 'base<TAB>source' pair per line (bad lines: {bad[:5] or 'none'})")
        return [r[0] for r in rows], [r[1] for r in rows]
    if not base or not source:
        raise SteerscopeError("give a BASE and a SOURCE prompt (or --pairs FILE)")
    return [base], [source]


def _grid(m, base_t, source_t, sites, metric, plot: Path | None) -> None:
    from steering.padding import position_labels
    from steering.patching import patching_grid

    grid = patching_grid(m, base_t, source_t, sites, metric)
    labels = position_labels(m, base_t, source_t, grid.positions)
    typer.echo(f"metric (logit diff, mean over {len(base_t)} pair(s)): base {grid.metric_base:+.3f}, "
               f"source {grid.metric_source:+.3f}")
    if grid.positions and grid.positions[0] < 0:
        typer.echo(f"prompts differ in length: columns are positions counted from each prompt's last token "
                   f"({grid.positions[0]} to -1), labelled with the first pair's tokens")
    width = max(len(s) for s in grid.sites)
    cols = [repr(t)[1:-1][:9] for t in labels]
    typer.echo(f"{'site':<{width}}  " + " ".join(f"{c:>9}" for c in cols))
    for name, row in zip(grid.sites, grid.effects.tolist(), strict=True):
        typer.echo(f"{name:<{width}}  " + " ".join(f"{v:>9.2f}" for v in row))
    typer.echo("effect = fraction of the source − base gap recovered by patching that one activation")
    if plot is not None:
        grid.figure(labels).write_html(str(plot))
        typer.echo(f"plot: {plot}")


def _subspace(m, base_t, source_t, sites, path: Path, positions, metric, plot: Path | None) -> None:
    from probe.sites import resolve_one
    from steering import Patch, SteeringVector, illusion_diagnostics, run_patch
    from steering.patching import metric_range

    if (path / "patch.json").exists():
        p = Patch.load(path)
        if positions is not None:
            p = Patch(p.site, p.basis, positions)
    elif (path / "vector.json").exists():
        v = SteeringVector.load(path)
        if v.positional:
            raise SteerscopeError(f"{path} is a positional (ActAdd) vector; subspace patching needs one direction [d]")
        p = Patch.direction(v.site, v.tensor, positions)
    else:
        raise SteerscopeError(f"{path} is neither a saved patch (patch.json) nor a steering vector (vector.json)")
    if sites != ["blocks.*.hook_resid_pre"] and [resolve_one(m, s) for s in sites] != [resolve_one(m, p.site)]:
        raise SteerscopeError(f"--site {sites} does not match the direction's own site {p.site!r}")
    site = resolve_one(m, p.site)
    if p.basis is not None and p.rank == 1 and site.endswith("mlp.hook_post"):
        report = illusion_diagnostics(m, base_t, source_t, site, p.basis[:, 0], metric, positions=p.positions)
        typer.echo(repr(report))
        fig = report.figure()
    else:
        import plotly.graph_objects as go

        with_base = run_patch(m, Patch.full(site, p.positions), base_t, source_t, metric)
        m_base, m_src = metric_range(m, base_t, source_t, metric)
        gap = m_src - m_base
        e_full = (float(with_base) - m_base) / gap
        e_sub = (float(run_patch(m, p, base_t, source_t, metric)) - m_base) / gap
        typer.echo(f"{p!r}\nmetric: base {m_base:+.3f}, source {m_src:+.3f}\n"
                   f"effect (fraction of the gap): whole site {e_full:.3f}, subspace {e_sub:.3f}")
        if ".hook_resid_" in site:
            typer.echo("illusion check: not applicable (the residual stream is read in full, so no part of the "
                       "direction is invisible downstream)")
        fig = go.Figure(go.Bar(x=["whole site", f"subspace (rank {p.rank})"], y=[e_full, e_sub]))
        fig.update_layout(title=f"Patching at {site}", yaxis_title="fraction of source − base metric gap")
    if plot is not None:
        fig.write_html(str(plot))
        typer.echo(f"plot: {plot}")
