"""`steerscope demo --no-serve` runs the whole pipeline on the bundled model, and a rerun reuses it."""

import json

from app.store import FeatureStore
from tests.e2e.conftest import run_demo


def test_demo_pipeline_end_to_end_and_reuse(demo_runs):
    run = demo_runs["dense"]
    for part in ("acts/manifest.json", "sae/cfg.json", "sae/eval.json", "features/meta.json"):
        assert (run / part).exists(), part
    metrics = json.loads((run / "sae" / "eval.json").read_text())
    assert metrics["l0"] <= 16 and 0 < metrics["fvu"] < 1
    store = FeatureStore.open(run / "features")
    assert store.dictionary_dir() == (run / "sae").resolve() and store.meta["dictionary_path"] == "../sae"
    assert store.evaluation() == metrics  # the Overview's numbers
    stamp = (run / "sae" / "weights.safetensors").stat().st_mtime_ns
    again = run_demo(run, "--model", "austen-dense")
    assert again.exit_code == 0, again.output
    assert (run / "sae" / "weights.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
