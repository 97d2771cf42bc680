"""Eight browser sessions at once on one served store (issue: the app must serve them without errors)."""

from __future__ import annotations

from app.store import FeatureStore
from bench.app_load import load, plan, serve_app
from tests.browser import skip_without_browser


def test_plan_mixes_feature_pages_and_searches():
    visits = plan(100, sessions=8, pages=3)
    assert len(visits) == 8 and all(len(v) == 3 for v in visits)
    kinds = [k for v in visits for k, _ in v]
    assert kinds.count("feature") == 12 and kinds.count("search") == 12
    assert all(0 <= a < 100 for v in visits for k, a in v if k == "feature")


@skip_without_browser
def test_eight_concurrent_sessions_get_every_page_without_errors(demo_runs, tmp_path):
    store = demo_runs["dense"] / "features"
    n = FeatureStore.open(store).n_features
    with serve_app(store, tmp_path / "app.log") as url:
        res = load(url, n, sessions=8, pages=2)
    assert res.errors == []
    assert len(res.times) == 16 and all(t > 0 for t in res.times)
