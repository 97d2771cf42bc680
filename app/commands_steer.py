"""``steerscope steer`` and ``steerscope experts``: steering from the command line."""

from __future__ import annotations

from pathlib import Path

import typer

from probe.errors import SteerscopeError


def register(app: typer.Typer) -> None:
    app.command("steer")(steer_cmd)
    app.command("experts")(experts_cmd)
    app.command("compare")(compare_cmd)


def steer_cmd(
    prompt: str = typer.Argument(..., help="the prompt to continue"),
    model: str = typer.Option("austen-dense", help="zoo name, smollm2-135m-instruct, a .gguf file, TL name or local HF dir"),
    chat: bool = typer.Option(False, "--chat", help="send PROMPT as a user message through the model's chat template"),
    add: str = typer.Option(None, help="ActAdd: the prompt whose activations are added (e.g. 'Love')"),
    sub: str = typer.Option(None, help="ActAdd: the prompt whose activations are subtracted (e.g. 'Hate')"),
    layer: int = typer.Option(1, help="ActAdd: block whose hook_resid_pre is steered"),
    coeff: float = typer.Option(5.0, help="steering coefficient"),
    vector: Path = typer.Option(None, help="a saved steering vector directory (instead of --add/--sub)"),
    feature: str = typer.Option(None, help="DIR:N, a dictionary feature as the vector: the unit decoder row N of the "
                                           "dictionary in DIR (an SAE, transcoder, SNMF or codebook; e.g. "
                                           "runs/codebook/dictionaries/blocks.1.hook_mlp_out:17), added with --coeff "
                                           "as its length in the residual stream"),
    erase: Path = typer.Option(None, help="a saved INLP erasure directory (steering.INLP.save): project the concept "
                                          "out at --site during generation instead of adding a vector"),
    site: str = typer.Option(None, help="with --erase: the hook the projection applies at (default: the site its "
                                        "provenance records)"),
    controller: Path = typer.Option(None, help="a saved steering controller (steering.controller; bench/controller.py "
                                               "--save): per-layer directions weighted for this prompt (use --mode all)"),
    alpha: float = typer.Option(None, help="with --controller: its overall strength (default: the saved one)"),
    mode: str = typer.Option("prompt", help="positions: prompt, generated, all, or last (the last prompt token only)"),
    max_new_tokens: int = typer.Option(40, help="tokens to generate"),
    sample: bool = typer.Option(False, help="sample (temperature 0.8, seeded) instead of greedy"),
    seed: int = typer.Option(0, help="sampling seed (the same for both runs)"),
    save: Path = typer.Option(None, help="also save the vector to this directory"),
    sweep: str = typer.Option(None, help="comma-separated coefficients, e.g. 0,2,4,8,16: instead of one continuation, "
                                         "print topic-word frequency ratio, off-target perplexity ratio and KL per "
                                         "coefficient (needs --words)"),
    words: str = typer.Option(None, help="with --sweep: comma-separated topic words to count, e.g. love,heart,happy"),
    prompts: Path = typer.Option(None, help="with --sweep: a file of prompts, one per line (default: PROMPT only)"),
    openings: int = typer.Option(0, help="with --sweep: also use this many paragraph openings (first 8 words) from "
                                         "the test split of the Austen corpus as prompts"),
    samples: int = typer.Option(4, help="with --sweep: sampled continuations per prompt"),
    plot: Path = typer.Option(None, help="with --sweep: save the sweep chart here (.html)"),
) -> None:
    """Print the steered continuation next to the unsteered one (same seed), or with --sweep a table of effects
    across coefficients."""
    from probe.models import load_model
    from steering import SteeringVector, generate

    m = load_model(model)
    if controller is not None:
        from steering.controller import Controller

        if sweep is not None:
            raise SteerscopeError("--sweep varies one vector's coefficient; a controller sets its own per prompt")
        ctl = Controller.load(controller)
        if alpha is not None:
            ctl.alpha = alpha
        vecs = ctl.vectors_for(m, prompt, chat)
        kw = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=0.8, seed=seed, chat=chat)
        base, steered = generate(m, prompt, **kw), generate(m, prompt, steer=vecs, mode=mode, **kw)
        s_ = vecs[0].provenance["s"]
        typer.echo(f"controller: s = {s_:.3f}, alpha = {ctl.alpha}, layer weights "
                   f"{', '.join(f'{v.coeff / (ctl.alpha * s_) if ctl.alpha * s_ else 0.0:.2f}' for v in vecs)}\n\n"
                   f"prompt   : {prompt}\nbaseline : {base}\nsteered  : {steered}")
        return
    given = [name for name, x in (("--vector", vector), ("--feature", feature), ("--erase", erase)) if x is not None]
    if len(given) > 1 or (given and (add is not None or sub is not None)):
        raise SteerscopeError(f"give one of --add/--sub, --vector, --feature, --erase; got {', '.join(given)}"
                              + (" and --add/--sub" if add is not None or sub is not None else ""))
    if erase is not None:
        if sweep is not None or save is not None:
            raise SteerscopeError("--erase projects a concept out; it has no coefficient to --sweep and no vector to --save")
        v = _erasure(erase, site)
    elif vector is not None:
        v = SteeringVector.load(vector).with_coeff(coeff)
    elif feature is not None:
        v = feature_vector(feature, coeff, m)
    elif add is not None and sub is not None:
        v = SteeringVector.actadd(m, add, sub, layer=layer, coeff=coeff)
    else:
        raise SteerscopeError("give --add and --sub (ActAdd), --vector DIR, --feature DIR:N, --erase DIR or --controller DIR")
    if save is not None:
        v.save(save)
    if sweep is not None:
        if chat:
            raise SteerscopeError("--chat applies to a single continuation; --sweep scores plain prompts")
        chosen = (_lines(prompts) if prompts is not None else [prompt]) + _openings(openings)
        _sweep(m, v, sweep, words, chosen, samples, max_new_tokens, seed, plot)
        return
    kw = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=0.8, seed=seed, chat=chat)
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


def feature_vector(spec: str, coeff: float, model):
    """``DIR:N`` -> the unit steering vector of feature N of the dictionary saved in DIR, at length ``coeff``."""
    from saes.base import load_dictionary
    from steering import SteeringVector

    where, sep, index = spec.rpartition(":")
    if not sep or not where or not index.strip().lstrip("-").isdigit():
        raise SteerscopeError(f"--feature wants DIR:N (a dictionary directory and a feature index), got {spec!r}")
    if not Path(where).is_dir():
        raise SteerscopeError(f"--feature {spec}: {where} is not a directory (a saved dictionary: cfg.json + weights)")
    d = load_dictionary(where)
    want, name = getattr(d.cfg, "model", None), model.cfg.model_name
    if want and name not in (want, Path(want).name):
        typer.echo(f"note: {where} was trained on {want!r}; steering {name!r}", err=True)
    return SteeringVector.from_feature(d, int(index), coeff=coeff, model=model)


def _erasure(path: Path, site: str | None):
    from steering import INLP

    erasure = INLP.load(path)
    site = site or erasure.provenance.get("site")
    if not site:
        raise SteerscopeError(f"{path} records no site in its provenance; give --site (e.g. blocks.2.hook_resid_post)")
    return erasure.at(site)


def _openings(n: int) -> list[str]:
    """The first 8 words of ``n`` paragraphs (of 20+ words) evenly spaced through the test split."""
    if n <= 0:
        return []
    from probe import load_corpus

    paras = [p.split() for doc in load_corpus("austen", split="test") for p in doc.split("\n") if len(p.split()) >= 20]
    if n > len(paras):
        raise SteerscopeError(f"--openings {n}: the test split has only {len(paras)} paragraphs of 20+ words")
    return [" ".join(paras[round(i * (len(paras) - 1) / max(1, n - 1))][:8]) for i in range(n)]


def _sweep(m, v, sweep: str, words: str | None, prompts: list[str], samples: int, max_new_tokens: int, seed: int,
           plot: Path | None) -> None:
    from probe import load_corpus
    from steering.effects import coefficient_sweep

    try:
        coeffs = [float(c) for c in sweep.split(",") if c.strip()]
    except ValueError as e:
        raise SteerscopeError(f"--sweep wants comma-separated numbers, got {sweep!r}") from e
    topic = [w.strip() for w in (words or "").split(",") if w.strip()]
    if not topic:
        raise SteerscopeError("--sweep needs --words (comma-separated topic words to count)")
    off_target = [doc[:400] for doc in load_corpus("austen", split="val")[:8]]
    rows = coefficient_sweep(m, v, coeffs, prompts, topic, off_target, samples=samples, max_new_tokens=max_new_tokens,
                             seed=seed)
    typer.echo(f"{v!r}\n{len(prompts)} prompt(s) x {samples} samples x {max_new_tokens} tokens; topic words: "
               f"{', '.join(topic)}; off-target text: 8 val-split chapter openings")
    typer.echo(f"{'coeff':>7} {'topic':>6} {'base':>5} {'freq ratio':>10} {'~95% band':>14} {'ppl ratio':>9} {'KL':>7}")
    for r in rows:
        typer.echo(f"{r.coeff:>7g} {r.topic_words:>6} {r.baseline_words:>5} {r.freq_ratio:>10.2f} "
                   f"{f'{r.freq_ratio_lo:.2f}-{r.freq_ratio_hi:.2f}':>14} {r.ppl_ratio:>9.3f} {r.kl:>7.3f}")
    if plot is not None:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("topic-word frequency ratio", "off-target perplexity ratio"))
        xs = [r.coeff for r in rows]
        fig.add_trace(go.Scatter(x=xs, y=[r.freq_ratio for r in rows], mode="lines+markers", name="frequency ratio",
                                 error_y=dict(type="data", symmetric=False,
                                              array=[r.freq_ratio_hi - r.freq_ratio for r in rows],
                                              arrayminus=[r.freq_ratio - r.freq_ratio_lo for r in rows])), row=1, col=1)
        fig.add_trace(go.Scatter(x=xs, y=[r.ppl_ratio for r in rows], mode="lines+markers", name="perplexity ratio"),
                      row=1, col=2)
        fig.update_xaxes(title_text="coefficient")
        fig.update_layout(title=repr(v), height=380)
        fig.write_html(str(plot))
        typer.echo(f"plot: {plot}")


def compare_cmd(
    dictionary: list[Path] = typer.Argument(..., help="saved dictionaries (e.g. an SAE and an SNMF) whose best "
                                                      "feature per concept is compared with diff-in-means"),
    model: str = typer.Option("austen-dense", help="zoo name, smollm2-135m-instruct, a .gguf file, TL name or local HF dir"),
    chat: bool = typer.Option(False, "--chat", help="send PROMPT as a user message through the model's chat template"),
    concept: list[str] = typer.Option(None, help="'name: word word ...' (repeatable); default: six Austen concepts"),
    dim_site: str = typer.Option(None, help="site of the diff-in-means vector (default: the first dictionary's "
                                            "decoder site)"),
    kl: list[float] = typer.Option([0.05, 0.1, 0.25, 0.5], help="target next-token KLs (nats; repeatable)"),
    n_select: int = typer.Option(256, help="128-token train-split contexts (evenly spaced) used to choose features "
                                            "and diff-in-means"),
    n_prompts: int = typer.Option(64, help="prompts for KL calibration (val split) and for scoring (test split)"),
    random_control: bool = typer.Option(True, "--random/--no-random", help="also run a random direction per concept "
                                                                          "(the control)"),
    plot: Path = typer.Option(None, help="save the gain-vs-KL chart (mean over concepts) here, as .html"),
    json_out: Path = typer.Option(None, "--json", help="save every row here as JSON"),
) -> None:
    """Steer with diff-in-means and with each dictionary's best feature for a concept, at matched KL, and print
    how much each raises the log-probability mass of the concept's tokens (SNMF paper's causal evaluation)."""
    import json
    import statistics

    from probe import load_corpus
    from probe.models import load_model
    from saes.base import load_dictionary
    from steering.compare import AUSTEN_CONCEPTS, Matched, concept_comparison, figure

    m = load_model(model)
    dicts = {}
    for path in dictionary:
        d = load_dictionary(path)
        dicts[f"{d.architecture} ({path.name})"] = d
    concepts = _concepts(concept) if concept else AUSTEN_CONCEPTS
    first = next(iter(dicts.values()))
    site = dim_site or first.cfg.target_site or first.cfg.site
    if site.endswith("mlp.hook_post"):  # neuron-space features steer at hook_mlp_out (from_feature)
        site = site.replace("mlp.hook_post", "hook_mlp_out")
    # three disjoint splits: features chosen on train, KL calibrated on val, gains scored on test
    select, calib, evals = (load_corpus("austen", split=s) for s in ("train", "val", "test"))
    results = concept_comparison(m, dicts, concepts, select, calib, evals, site, kl, n_select=n_select,
                                 n_prompts=n_prompts, random_control=random_control)
    typer.echo(f"{'concept':<12} {'direction':<28} {'feature':>8} {'d':>6} {'KL':>6} {'coeff':>8} {'eval KL':>8} "
               f"{'gain':>7} {'± se':>6}")
    for res in results:
        for r in res.rows:
            feat, d = res.features.get(r.name, ("-", float("nan")))
            typer.echo(f"{res.concept:<12} {r.name:<28} {feat!s:>8} {d:>6.2f} {r.target_kl:>6.3g} {r.coeff:>8.3f} "
                       f"{r.eval_kl:>8.3f} {r.gain:>+7.3f} {r.gain_se:>6.3f}")
    names = list(dict.fromkeys(r.name for res in results for r in res.rows))
    typer.echo(f"\nmean concept gain over {len(results)} concepts (nats):")
    mean_rows = []
    for name in names:
        for t in kl:
            gains = [r.gain for res in results for r in res.rows if r.name == name and r.target_kl == t]
            mean_rows.append(Matched(name, t, float("nan"), t, float("nan"), statistics.mean(gains), float("nan")))
        typer.echo(f"  {name:<28} " + "  ".join(f"KL {r.target_kl:g}: {r.gain:+.3f}" for r in mean_rows[-len(kl):]))
    if plot is not None:
        figure(mean_rows, f"Concept gain at matched KL (mean over {len(results)} concepts)").write_html(str(plot))
        typer.echo(f"plot: {plot}")
    if json_out is not None:
        rows = [{"concept": res.concept, "words": res.words, "feature": res.features.get(r.name, (None,))[0],
                 **r._asdict()} for res in results for r in res.rows]
        json_out.write_text(json.dumps(rows, indent=1) + "\n")
        typer.echo(f"rows: {json_out}")


def _concepts(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs:
        name, sep, words = spec.partition(":")
        if not sep or not name.strip() or not words.split():
            raise SteerscopeError(f"--concept {spec!r}: write it as 'name: word word ...'")
        out[name.strip()] = words.split()
    return out


def _lines(path: Path) -> list[str]:
    from probe.corpus import read_text_file

    lines = [s.strip() for s in read_text_file(path, "prompts file").splitlines() if s.strip()]
    if not lines:
        raise SteerscopeError(f"{path} has no prompts (one per line)")
    return lines
