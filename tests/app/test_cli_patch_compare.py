"""`steerscope patch` and `steerscope compare` on the bundled dense model (tables, plots, one-line errors)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from probe.errors import SteerscopeError
from saes.base import REGISTRY
from steering import SteeringVector

runner = CliRunner()
BASE, SOURCE = "Mr. Darcy came in and", "Mrs. Darcy came in and"


def _rows(output: str) -> dict[str, list[float]]:
    return {ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in output.splitlines() if ln.startswith("blocks.")}


def test_patch_grid_table_and_plot(tmp_path):
    res = runner.invoke(app, ["patch", BASE, SOURCE, "--good", " she", "--bad", " he", "--plot", str(tmp_path / "g.html")])
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    assert list(rows) == [f"blocks.{i}.hook_resid_pre" for i in range(4)]
    # layer 0: the residual stream is the token embedding, so only the differing token carries the whole effect
    first = rows["blocks.0.hook_resid_pre"]
    assert first[1] == pytest.approx(1.0, abs=0.01) and [v for i, v in enumerate(first) if i != 1] == [0.0] * 6
    assert (tmp_path / "g.html").exists()


def test_patch_along_a_direction_runs_the_illusion_diagnostics(tmp_path):
    torch.manual_seed(0)
    SteeringVector("blocks.0.mlp.hook_post", torch.randn(1024)).save(tmp_path / "v")
    res = runner.invoke(app, ["patch", BASE, SOURCE, "--good", " she", "--bad", " he", "--direction",
                              str(tmp_path / "v"), "--position", "1", "--plot", str(tmp_path / "bars.html")])
    assert res.exit_code == 0, res.output
    assert "IllusionReport(blocks.0.mlp.hook_post" in res.output and "null_share=" in res.output
    SteeringVector("blocks.1.hook_resid_pre", torch.randn(256)).save(tmp_path / "r")
    res = runner.invoke(app, ["patch", BASE, SOURCE, "--good", " she", "--bad", " he", "--direction", str(tmp_path / "r")])
    assert res.exit_code == 0 and "subspace" in res.output, res.output


def test_patch_grid_on_prompts_of_different_lengths_counts_from_the_end():
    res = runner.invoke(app, ["patch", BASE, "Later, " + SOURCE, "--good", " she", "--bad", " he"])
    assert res.exit_code == 0, res.output
    assert "counted from each prompt's last token (-7 to -1)" in res.output
    header = next(ln for ln in res.output.splitlines() if ln.startswith("site")).split()[1:]
    assert header == ["<|bos|>/,", "Mr/", "Mrs", ".", "Darcy", "came", "in", "and"]  # "Mr/ Mrs" is one column
    # layer 0 is the token embedding: aligned from the end, only the BOS/"," and Mr/Mrs columns differ
    first = _rows(res.output)["blocks.0.hook_resid_pre"]
    assert first[2:] == [0.0] * 5 and first[1] != 0.0
    res = runner.invoke(app, ["patch", BASE, SOURCE, "--good", " she he", "--bad", " he"])
    assert isinstance(res.exception, SteerscopeError) and "is not a single token" in str(res.exception)


@pytest.mark.parametrize(("args", "message"), [
    (["Mr. Darcy came", "Mr. Darcy came"], "same on base and source"),
    (["Mr. Darcy came"], "give a BASE and a SOURCE"),
    (["Mr. Darcy came", "Mrs. Darcy came in", "--direction", "."], "neither a saved patch"),
])
def test_patch_bad_inputs(args, message):
    res = runner.invoke(app, ["patch", *args, "--good", " she", "--bad", " he"])
    assert res.exit_code != 0 and isinstance(res.exception, SteerscopeError) and message in str(res.exception)


def test_patch_direction_on_prompts_of_different_lengths(tmp_path):
    torch.manual_seed(0)
    SteeringVector("blocks.1.hook_resid_pre", torch.randn(256)).save(tmp_path / "r")
    args = ["patch", "Mr. Darcy came in and", "Mrs. Darcy, who was tired, came in and", "--good", " she", "--bad",
            " he", "--direction", str(tmp_path / "r")]
    res = runner.invoke(app, args)
    assert isinstance(res.exception, SteerscopeError) and "as many tokens as its source" in str(res.exception)
    res = runner.invoke(app, [*args, "--position", "-1"])
    assert res.exit_code == 0, res.output
    assert "illusion check: not applicable" in res.output


def test_patch_bad_pairs_file_and_direction(tmp_path):
    (tmp_path / "p.tsv").write_text("only one column\n")
    res = runner.invoke(app, ["patch", "--pairs", str(tmp_path / "p.tsv"), "--good", " she", "--bad", " he"])
    assert "base<TAB>source" in str(res.exception)
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["patch", BASE, SOURCE, "--good", " she", "--bad", " he", "--direction",
                              str(tmp_path / "empty")])
    assert "neither a saved patch" in str(res.exception)


def _random_sae(path):
    cls = REGISTRY["topk"]
    torch.manual_seed(0)
    cls.from_config(cls.Config(d_in=256, d_sae=64, k=4, site="blocks.2.hook_mlp_out", model="austen-dense")).save(path)


def test_compare_rows_are_matched_in_kl(tmp_path):
    _random_sae(tmp_path / "sae")
    res = runner.invoke(app, ["compare", str(tmp_path / "sae"), "--concept", "family: sister mother",
                              "--kl", "0.1", "--n-select", "32", "--n-prompts", "8", "--json", str(tmp_path / "r.json"),
                              "--plot", str(tmp_path / "c.html")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["name"] for r in rows] == ["diff-in-means", "topk (sae)", "random direction"]
    assert all(abs(r["kl"] - 0.1) <= 0.002 and r["words"] == ["sister", "mother"] for r in rows)
    assert rows[1]["feature"] in range(64) and (tmp_path / "c.html").exists()


def test_compare_chooses_calibrates_and_scores_on_three_disjoint_splits(tmp_path, monkeypatch):
    import steering.compare
    from probe import load_corpus

    seen = {}

    def spy(model, dictionaries, concepts, select_texts, calib_texts, eval_texts, *args, **kw):
        seen.update(select=list(select_texts), calib=list(calib_texts), eval=list(eval_texts))
        return []

    monkeypatch.setattr(steering.compare, "concept_comparison", spy)
    _random_sae(tmp_path / "sae")
    res = runner.invoke(app, ["compare", str(tmp_path / "sae"), "--concept", "family: sister mother"])
    assert res.exit_code == 0, res.output
    docs = {k: set(v) for k, v in seen.items()}
    assert docs["select"] and docs["calib"] and docs["eval"]
    assert not docs["select"] & docs["calib"] and not docs["select"] & docs["eval"] and not docs["calib"] & docs["eval"]
    assert seen["calib"] == load_corpus("austen", split="val") and seen["eval"] == load_corpus("austen", split="test")


def test_compare_bad_concepts(tmp_path):
    _random_sae(tmp_path / "sae")
    res = runner.invoke(app, ["compare", str(tmp_path / "sae"), "--concept", "no colon here"])
    assert "name: word word" in str(res.exception)
    res = runner.invoke(app, ["compare", str(tmp_path / "sae"), "--concept", "junk: xqzjvwpk", "--n-select", "4",
                              "--no-random"])
    assert "single token" in str(res.exception)
