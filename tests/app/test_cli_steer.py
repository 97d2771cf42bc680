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
