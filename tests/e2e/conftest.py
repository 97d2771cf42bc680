"""The README's main path, run once per session with the same code as ``steerscope demo`` (smaller sizes):
bundled model -> activations -> TopK SAE -> eval -> feature store, on austen-dense and on austen-moe."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app

DEMO_ARGS = ["--n-tokens", "20000", "--d-sae", "512", "--k", "16", "--tc-tokens", "4096", "--no-serve"]


def run_demo(out: Path, *extra: str):
    return CliRunner().invoke(app, ["demo", "--out", str(out), *DEMO_ARGS, *extra])


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory) -> dict[str, Path]:
    """{"dense": run dir, "moe": run dir}, each holding acts/, sae/ (with eval.json) and features/ (dense: also
    transcoders/, one per layer)."""
    root = tmp_path_factory.mktemp("demo")
    runs = {"dense": root / "dense", "moe": root / "moe"}
    for name, model in (("dense", "austen-dense"), ("moe", "austen-moe")):
        res = run_demo(runs[name], "--model", model)
        assert res.exit_code == 0, res.output
    return runs
