"""`steerscope steer` and `steerscope experts` on the bundled models (CLI level, one-line errors)."""

from typer.testing import CliRunner

from app.cli import app

runner = CliRunner()


def _texts(output: str) -> dict[str, str]:
    return {ln.split(":")[0].strip(): ln.split(":", 1)[1].strip() for ln in output.splitlines()
            if ln.split(":")[0].strip() in ("prompt", "baseline", "steered")}


def test_steer_prints_baseline_and_steered(tmp_path):
    # Greedy, at layer 0: ActAdd Love - Hate at coefficient 8 changes the continuation of the bundled dense model
    # (from the third token: 'was' -> 'the', top-1 margins 0.5 and 1.3). At the default layer 1 it does not.
    res = runner.invoke(app, ["steer", "She walked into the room", "--add", "Love", "--sub", "Hate", "--coeff", "8",
                              "--layer", "0", "--max-new-tokens", "8", "--save", str(tmp_path / "v")])
    assert res.exit_code == 0, res.output
    out = _texts(res.output)
    assert set(out) == {"prompt", "baseline", "steered"} and out["baseline"] and out["steered"]
    assert out["steered"] != out["baseline"]  # coefficient 8 steers
    assert (tmp_path / "v" / "vector.json").exists()
    again = runner.invoke(app, ["steer", "She walked into the room", "--vector", str(tmp_path / "v"), "--coeff", "0",
                                "--max-new-tokens", "8"])
    assert again.exit_code == 0, again.output
    zero = _texts(again.output)
    assert zero["baseline"] == zero["steered"] == out["baseline"]  # coefficient 0 changes nothing


def test_steer_with_a_saved_controller(tmp_path):
    from probe.models import load_model
    from steering.controller import Controller

    m = load_model("austen-dense")
    ctl = Controller.fit(m, ["She was very angry.", "He shouted in fury."], ["She smiled warmly.", "He laughed kindly."],
                         alpha=0.5, hidden=8, epochs=50)
    ctl.save(tmp_path / "ctl")
    res = runner.invoke(app, ["steer", "She was very angry and", "--controller", str(tmp_path / "ctl"), "--mode", "all",
                              "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output
    assert "controller: s = " in res.output and "alpha = 0.5" in res.output
    out = _texts(res.output)
    assert out["baseline"] and out["steered"]
    off = runner.invoke(app, ["steer", "She was very angry and", "--controller", str(tmp_path / "ctl"), "--alpha", "0",
                              "--max-new-tokens", "6"])
    assert _texts(off.output)["steered"] == _texts(off.output)["baseline"]  # alpha 0 steers nothing
    wrong = runner.invoke(app, ["steer", "Hello", "--controller", str(tmp_path / "ctl"), "--model", "austen-moe"])
    assert wrong.exit_code != 0 and "trained on 'austen-dense'" in str(wrong.exception)


def test_steer_needs_a_vector():
    res = runner.invoke(app, ["steer", "Hello", "--add", "Love"])
    assert res.exit_code != 0 and "give --add and --sub" in str(res.exception)


def test_experts_table_and_heatmap(tmp_path):
    import torch

    from probe.models import load_model
    from steering import ExpertScores

    speech = ['"I am sure you are right," said she.', '"Oh! my dear," cried he.']
    narration = ["She walked slowly home.", "The house was large and old."]
    beh, ctl = tmp_path / "b.txt", tmp_path / "c.txt"
    beh.write_text("\n".join(speech) + "\n")
    ctl.write_text("\n".join(narration) + "\n")
    res = runner.invoke(app, ["experts", str(beh), str(ctl), "--top", "3", "--plot", str(tmp_path / "h.html")])
    assert res.exit_code == 0, res.output
    rows = [ln.split() for ln in res.output.splitlines() if ln.strip()[:1].isdigit()]
    direct = ExpertScores.score(load_model("austen-moe"), speech, narration)
    top = direct.top(3)
    assert [(int(r[1]), int(r[2])) for r in rows] == top and [r[0] for r in rows] == ["1", "2", "3"]
    printed = torch.tensor([float(r[3]) for r in rows])
    torch.testing.assert_close(printed, torch.stack([direct.diff("weight")[le] for le in top]).float(), atol=5e-5, rtol=0)
    assert bool((printed[:-1] >= printed[1:]).all()) and float(printed[0]) > 0  # best first
    assert (tmp_path / "h.html").exists()
    # swapping behaviour and control negates the scores: the top experts become those least used on speech
    res = runner.invoke(app, ["experts", str(ctl), str(beh), "--top", "1"])
    row = next(ln.split() for ln in res.output.splitlines() if ln.strip()[:1].isdigit())
    lowest = int(direct.diff("weight").argmin())
    assert (int(row[1]), int(row[2])) == divmod(lowest, direct.shape[1])


def test_experts_on_a_dense_model_is_refused(tmp_path):
    beh = tmp_path / "b.txt"
    beh.write_text("a\n")
    res = runner.invoke(app, ["experts", str(beh), str(beh), "--model", "austen-dense"])
    msg = str(res.exception)
    assert res.exit_code != 0 and ("MoE" in msg or "expert" in msg.lower()), msg


def test_steer_sweep_table(tmp_path):
    res = runner.invoke(app, ["steer", "She walked into the room and", "--add", "Love", "--sub", "Hate", "--sweep", "0,8",
                              "--words", "love,heart,happy,the", "--samples", "2", "--max-new-tokens", "8", "--openings", "2",
                              "--plot", str(tmp_path / "s.html")])
    assert res.exit_code == 0, res.output
    rows = [ln.split() for ln in res.output.splitlines() if ln.strip()[:1].isdigit() and len(ln.split()) == 7]
    assert [r[0] for r in rows] == ["0", "8"] and rows[0][3] == "1.00" and rows[0][5] == "1.000"
    assert (tmp_path / "s.html").exists() and "3 prompt(s) x 2 samples" in res.output


def test_steer_sweep_bad_inputs():
    res = runner.invoke(app, ["steer", "Hello", "--add", "Love", "--sub", "Hate", "--sweep", "0,4"])
    assert "--words" in str(res.exception)
    res = runner.invoke(app, ["steer", "Hello", "--add", "Love", "--sub", "Hate", "--sweep", "0,x", "--words", "love"])
    assert "comma-separated numbers" in str(res.exception)


def _sae_dir(tmp_path, model, site="blocks.1.hook_resid_post"):
    import torch

    from saes.topk import TopKConfig, TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=model.cfg.d_model, d_sae=32, k=4, site=site, model=model.cfg.model_name))
    sae.save(tmp_path / "sae")
    return tmp_path / "sae", sae


def test_steer_with_a_dictionary_feature(tmp_path):
    from probe.models import load_model
    from steering import SteeringVector, generate

    m = load_model("austen-dense")
    d, sae = _sae_dir(tmp_path, m)
    prompt, n = "She walked into the room", 8
    res = runner.invoke(app, ["steer", prompt, "--feature", f"{d}:5", "--coeff", "40",
                              "--max-new-tokens", str(n), "--mode", "all"])
    assert res.exit_code == 0, res.output
    out = _texts(res.output)
    # the CLI's steered text is exactly the library's: feature 5's unit decoder row at length 40
    direct = generate(m, prompt, steer=[SteeringVector.from_feature(sae, 5, coeff=40.0)], mode="all", max_new_tokens=n)
    assert out["steered"] == direct.strip()
    assert out["steered"] != out["baseline"]  # length 40 in a residual of norm ~10-20 steers
    zero = _texts(runner.invoke(app, ["steer", prompt, "--feature", f"{d}:5", "--coeff", "0",
                                      "--max-new-tokens", str(n)]).output)
    assert zero["steered"] == zero["baseline"] == out["baseline"]


def test_steer_feature_bad_input_gets_one_line(tmp_path):
    from probe.models import load_model

    d, _ = _sae_dir(tmp_path, load_model("austen-dense"))
    cases = {f"{d}:32": "out of range", f"{d}:x": "wants DIR:N", str(d): "wants DIR:N",
             f"{tmp_path / 'nope'}:3": "is not a directory"}
    for spec, msg in cases.items():
        res = runner.invoke(app, ["steer", "Hello", "--feature", spec, "--max-new-tokens", "2"])
        assert res.exit_code != 0 and msg in str(res.exception), (spec, res.output, res.exception)
    both = runner.invoke(app, ["steer", "Hello", "--feature", f"{d}:1", "--add", "Love", "--sub", "Hate"])
    assert both.exit_code != 0 and "give one of" in str(both.exception)
    from saes.topk import TopKConfig, TopKSAE

    TopKSAE(TopKConfig(d_in=7, d_sae=4, k=1, site="blocks.1.hook_resid_post")).save(tmp_path / "narrow")
    wrong = runner.invoke(app, ["steer", "Hello", "--feature", f"{tmp_path / 'narrow'}:1", "--max-new-tokens", "2"])
    assert wrong.exit_code != 0 and "has dimension 7" in str(wrong.exception)


def test_steer_with_an_inlp_erasure(tmp_path):
    import torch

    from probe.models import load_model
    from steering import INLP, generate
    from steering.vectors import read_activations

    m = load_model("austen-dense")
    site = "blocks.1.hook_resid_post"
    speech = ['"I am sure you are right," said she.', '"Oh! my dear," cried he.', '"Pray, sit down," said he.']
    narration = ["She walked slowly home.", "The house was large and old.", "They dined at five."]
    X = read_activations(m, speech + narration, site)
    y = torch.tensor([1] * len(speech) + [0] * len(narration))
    erasure = INLP.fit(X, y, n_iter=2, seed=0, dev_fraction=0.34)
    erasure.save(tmp_path / "e")
    prompt = '"I am sure," said'
    no_site = runner.invoke(app, ["steer", prompt, "--erase", str(tmp_path / "e")])
    assert no_site.exit_code != 0 and "give --site" in str(no_site.exception)
    res = runner.invoke(app, ["steer", prompt, "--erase", str(tmp_path / "e"), "--site", site, "--mode", "all",
                              "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    direct = generate(m, prompt, steer=[erasure.at(site)], mode="all", max_new_tokens=8)
    assert _texts(res.output)["steered"] == direct.strip()
    # the site can come from the provenance; a site of another width gets one clear line
    erasure.provenance["site"] = site
    erasure.save(tmp_path / "e2")
    again = runner.invoke(app, ["steer", prompt, "--erase", str(tmp_path / "e2"), "--mode", "all", "--max-new-tokens", "8"])
    assert _texts(again.output)["steered"] == _texts(res.output)["steered"]
    wrong = runner.invoke(app, ["steer", prompt, "--erase", str(tmp_path / "e"), "--site", "blocks.1.mlp.hook_post"])
    assert wrong.exit_code != 0 and "width" in str(wrong.exception)
    swept = runner.invoke(app, ["steer", prompt, "--erase", str(tmp_path / "e2"), "--sweep", "0,1", "--words", "love"])
    assert swept.exit_code != 0 and "no coefficient" in str(swept.exception)
