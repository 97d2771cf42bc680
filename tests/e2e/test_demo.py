"""`steerscope demo --no-serve` runs the whole pipeline on the bundled model, and a rerun reuses it."""

import json

from typer.testing import CliRunner

from app.cli import app
from app.store import FeatureStore


def test_demo_pipeline_end_to_end_and_reuse(tmp_path):
    args = ["demo", "--out", str(tmp_path), "--n-tokens", "20000", "--d-sae", "512", "--k", "16", "--no-serve"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    for part in ("acts/manifest.json", "sae/cfg.json", "sae/eval.json", "features/meta.json"):
        assert (tmp_path / part).exists(), part
    metrics = json.loads((tmp_path / "sae" / "eval.json").read_text())
    assert metrics["l0"] <= 16 and 0 < metrics["fvu"] < 1
    assert FeatureStore.open(tmp_path / "features") is not None
    stamp = (tmp_path / "sae" / "weights.safetensors").stat().st_mtime_ns
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (tmp_path / "sae" / "weights.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
