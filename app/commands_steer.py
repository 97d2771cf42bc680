"""``steerscope steer`` and ``steerscope experts``: steering from the command line."""

from __future__ import annotations

from pathlib import Path

import typer

from probe.errors import SteerscopeError


def register(app: typer.Typer) -> None:
    app.command("steer")(steer_cmd)
    app.command("experts")(experts_cmd)


def steer_cmd(
    prompt: str = typer.Argument(..., help="the prompt to continue"),
    model: str = typer.Option("austen-dense", help="zoo name, TL name or local HF dir"),
    add: str = typer.Option(None, help="ActAdd: the prompt whose activations are added (e.g. 'Love')"),
    sub: str = typer.Option(None, help="ActAdd: the prompt whose activations are subtracted (e.g. 'Hate')"),
    layer: int = typer.Option(1, help="ActAdd: block whose hook_resid_pre is steered"),
    coeff: float = typer.Option(5.0, help="steering coefficient"),
    vector: Path = typer.Option(None, help="a saved steering vector directory (instead of --add/--sub)"),
    mode: str = typer.Option("prompt", help="positions: prompt, generated or all"),
    max_new_tokens: int = typer.Option(40, help="tokens to generate"),
    sample: bool = typer.Option(False, help="sample (temperature 0.8, seeded) instead of greedy"),
    seed: int = typer.Option(0, help="sampling seed (the same for both runs)"),
    save: Path = typer.Option(None, help="also save the vector to this directory"),
) -> None:
    """Print the steered continuation next to the unsteered one (same seed)."""
    from probe.models import load_model
    from steering import SteeringVector, generate

    m = load_model(model)
    if vector is not None:
        v = SteeringVector.load(vector).with_coeff(coeff)
    elif add is not None and sub is not None:
        v = SteeringVector.actadd(m, add, sub, layer=layer, coeff=coeff)
    else:
        raise SteerscopeError("give --add and --sub (ActAdd) or --vector DIR")
    if save is not None:
        v.save(save)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=0.8, seed=seed)
    base = generate(m, prompt, **kw)
    steered = generate(m, prompt, steer=[v], mode=mode, **kw)
    typer.echo(f"{v!r}\n\nprompt   : {prompt}\nbaseline : {base}\nsteered  : {steered}")


def experts_cmd(
    behaviour: Path = typer.Argument(..., help="text file: one behaviour prompt per line"),
    control: Path = typer.Argument(..., help="text file: one control prompt per line"),
    model: str = typer.Option("austen-moe", help="an MoE model"),
    top: int = typer.Option(4, help="experts to list"),
    by: str = typer.Option("weight", help="weight (fTRI mean routing-weight difference) or selection (rate difference)"),
    plot: Path = typer.Option(None, help="save the layer x expert heatmap here (.html)"),
) -> None:
    """Score experts on behaviour vs control prompts (fTRI); print the top ones and optionally save the heatmap."""
    from probe.models import load_model
    from steering import ExpertScores

    prompts = [_lines(behaviour), _lines(control)]
    scores = ExpertScores.score(load_model(model), *prompts)
    diff = scores.diff(by)
    typer.echo(f"{'rank':>4}  {'layer':>5}  {'expert':>6}  {by + ' diff':>12}")
    for i, (layer, expert) in enumerate(scores.top(top, by=by), 1):
        typer.echo(f"{i:>4}  {layer:>5}  {expert:>6}  {float(diff[layer, expert]):>+12.4f}")
    if plot is not None:
        scores.heatmap(by).write_html(str(plot))
        typer.echo(f"heatmap: {plot}")


def _lines(path: Path) -> list[str]:
    if not path.exists():
        raise SteerscopeError(f"{path} does not exist")
    lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    if not lines:
        raise SteerscopeError(f"{path} has no prompts (one per line)")
    return lines
