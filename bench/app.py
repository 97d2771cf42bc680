"""Feature-store build speed and feature-page render time on a 16k-feature store (goal: page p95 <= 300 ms).

    python -m bench.app                      # random 2-layer model, random TopK SAE (16,384 features)
    python -m bench.app --model austen-dense --site blocks.2.hook_resid_post --tokens 200000

1. Build: ``saes.features.build_feature_store`` over ``--tokens`` random-token contexts (or the Austen
   corpus with ``--corpus austen``); prints tokens/s of the streaming scan and the total time.
2. Open, then queries: ``FeatureStore.open`` (which checks every table's sha256), and the four store queries a
   feature page makes (feature, examples, logits, neighbours).
3. Page: the dashboard's Feature page under Streamlit's AppTest, one full rerun per feature id (the
   entry script, the queries, the plotly figures and the token HTML; AppTest's own protobuf handling
   is included, a browser's drawing is not). p50/p95 over ``--pages`` random features, after a warm-up.
4. Load: the store served by ``steerscope app`` to ``--sessions`` concurrent chromium sessions (feature
   pages and searches at once, :mod:`bench.app_load`); p50/p95 page time in the browser and the errors.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from probe.models import build_model, load_model
from probe.zoo.specs import MODEL_SPECS
from saes.features import build_feature_store
from saes.topk import TopKConfig, TopKSAE

ROOT = Path(__file__).resolve().parents[1]
TINY = {**MODEL_SPECS["austen-dense"], "n_layers": 2, "d_model": 64, "d_head": 16, "n_heads": 4, "d_mlp": 128}


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if len(values) > 1 else values[0]


def build(args, out: Path) -> dict:
    torch.manual_seed(0)
    model = load_model(args.model, device=args.device) if args.model else build_model(TINY, ROOT / "probe/zoo/tokenizer.json")
    site = args.site or f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    sae = TopKSAE(TopKConfig(d_in=model.cfg.d_model, d_sae=args.d_sae, k=args.k, site=site)).to(model.cfg.device)
    sae.save(out / "sae")
    if args.corpus:
        data = args.corpus
    else:
        g = torch.Generator().manual_seed(0)
        n = -(-args.tokens // 127)
        data = torch.cat([torch.zeros(n, 1, dtype=torch.long), torch.randint(3, model.cfg.d_vocab, (n, 127), generator=g)], 1)
    meta = build_feature_store(out / "sae", model, data, out / "store", n_tokens=args.tokens, n_ctx=128,
                               batch_contexts=args.batch_contexts, model_ref=args.model or "tiny", device=args.device,
                               overwrite=True, progress=True)
    b = meta["build"]
    print(f"build: {meta['n_tokens']:,} tokens x {args.d_sae:,} features on {torch.get_num_threads()} thread(s): "
          f"scan {b['scan_seconds']:.1f} s = {b['tokens_per_s']:,.0f} tokens/s; total {b['seconds']:.1f} s "
          f"(tables, logits, neighbours); {b['n_example_rows']:,} example rows")
    return meta


def time_queries(store_dir: Path, ids: list[int]) -> list[float]:
    from app.store import FeatureStore

    fs = FeatureStore.open(store_dir)
    out = []
    for i in ids:
        t0 = time.perf_counter()
        fs.feature(i), fs.examples(i), fs.logits(i), fs.neighbours(i)
        out.append(time.perf_counter() - t0)
    return out


def time_pages(store_dir: Path, ids: list[int]) -> list[float]:
    from streamlit.testing.v1 import AppTest

    os.environ["STEERSCOPE_STORE"] = str(store_dir)
    at = AppTest.from_file(str(ROOT / "app" / "dashboard.py"), default_timeout=120)
    at.query_params["feature"] = str(ids[0])
    at.run()
    at.switch_page("views/feature.py").run()  # warm-up: imports, store open, first render
    out = []
    for i in ids:
        at.number_input(key="feature_id").set_value(i)
        t0 = time.perf_counter()
        at.run()
        out.append(time.perf_counter() - t0)
        assert not at.exception and at.title[0].value == f"Feature {i}", (at.exception, at.title)
    import streamlit as st

    st.cache_resource.clear()  # close the cached store before the interpreter exits
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--model", default=None, help="a load_model name (default: a random 2-layer model)")
    ap.add_argument("--site", default=None)
    ap.add_argument("--corpus", default=None, help="a corpus spec instead of random tokens, e.g. austen")
    ap.add_argument("--batch-contexts", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pages", type=int, default=40, help="feature pages to time")
    ap.add_argument("--store", type=Path, default=None, help="time an existing store; skip the build")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--sessions", type=int, default=8, help="concurrent browser sessions (0: skip the load test)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store
        if store is None:
            build(args, Path(tmp))
            store = Path(tmp) / "store"
        from app.store import FeatureStore

        opens = []
        for _ in range(5):  # opening checks every table's sha256 (goal: under 1 s at 16k features)
            t0 = time.perf_counter()
            fs = FeatureStore.open(store)
            opens.append(time.perf_counter() - t0)
        n, size = fs.n_features, sum(f.stat().st_size for f in Path(store).glob("*.parquet"))
        print(f"store open (checksums of {size / 1e6:.1f} MB of tables included): median "
              f"{statistics.median(opens) * 1e3:.0f} ms over 5 (goal < 1000 ms)")
        ids = random.Random(0).sample(range(n), min(args.pages, n))
        q = time_queries(store, ids)
        print(f"store queries per feature page: p50 {p(q, .5) * 1e3:.1f} ms, p95 {p(q, .95) * 1e3:.1f} ms")
        pages = time_pages(store, ids)
        p95 = p(pages, .95) * 1e3
        print(f"feature page render (AppTest rerun, {len(ids)} features of {n:,}): p50 {p(pages, .5) * 1e3:.0f} ms, "
              f"p95 {p95:.0f} ms (goal <= 300 ms: {'met' if p95 <= 300 else 'NOT met'})")
        if args.sessions:
            from bench.app_load import load, serve_app

            with serve_app(Path(store), Path(tmp) / "app.log") as url:
                res = load(url, n, args.sessions, pages=6)
            print(f"{args.sessions} concurrent browser sessions (chromium, feature pages + searches): {res.summary()}")
            for e in res.errors[:5]:
                print("  error:", e)


if __name__ == "__main__":
    main()
