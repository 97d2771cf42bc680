"""`steerscope steer` and `steerscope experts` on the bundled models (CLI level, one-line errors)."""

from typer.testing import CliRunner

from app.cli import app

runner = CliRunner()


def test_steer_prints_baseline_and_steered(tmp_path):
    res = runner.invoke(app, ["steer", "She walked into the room", "--add", "Love", "--sub", "Hate", "--coeff", "8",
                              "--max-new-tokens", "8", "--save", str(tmp_path / "v")])
    assert res.exit_code == 0, res.output
    lines = {ln.split(":")[0].strip(): ln for ln in res.output.splitlines() if ":" in ln}
    assert {"baseline", "steered"} <= set(lines)
    assert (tmp_path / "v" / "vector.json").exists()
    again = runner.invoke(app, ["steer", "She walked into the room", "--vector", str(tmp_path / "v"), "--coeff", "0",
                                "--max-new-tokens", "8"])
    out = {ln.split(":")[0].strip(): ln.split(":", 1)[1] for ln in again.output.splitlines() if ":" in ln}
    assert out["baseline"] == out["steered"]  # coefficient 0 changes nothing


def test_steer_needs_a_vector():
    res = runner.invoke(app, ["steer", "Hello", "--add", "Love"])
    assert res.exit_code != 0 and "give --add and --sub" in str(res.exception)


def test_experts_table_and_heatmap(tmp_path):
    beh, ctl = tmp_path / "b.txt", tmp_path / "c.txt"
    beh.write_text('"I am sure you are right," said she.\n"Oh! my dear," cried he.\n')
    ctl.write_text("She walked slowly home.\nThe house was large and old.\n")
    res = runner.invoke(app, ["experts", str(beh), str(ctl), "--top", "3", "--plot", str(tmp_path / "h.html")])
    assert res.exit_code == 0, res.output
    rows = [ln.split() for ln in res.output.splitlines() if ln.strip()[:1].isdigit()]
    assert len(rows) == 3 and (tmp_path / "h.html").exists()


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
