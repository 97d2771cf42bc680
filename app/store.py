"""Read-only DuckDB queries over a feature store (the Parquet tables of ``saes.features``).

>>> fs = FeatureStore.open("runs/features")
>>> fs.feature(12)["density"], fs.examples(12)[0]["tokens"], fs.logits(12)["top"], fs.neighbours(12)

Opening checks the store is complete and consistent (meta.json, every table with the size and sha256
meta.json records, each table stamped with the meta's dictionary fingerprint); every problem is a ``StoreError`` with a one-line, actionable
message. Small tables are loaded into DuckDB memory; ``examples`` stays a view over its Parquet file,
whose row groups are small and sorted by feature, so one feature's query reads a few of them. Each
query runs on its own cursor, so one store can serve many Streamlit sessions (threads).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from probe.errors import SteerscopeError

FORMAT = "steerscope-features"
TABLES = ("features", "examples", "logits", "neighbours", "vocab")
IN_MEMORY = ("features", "logits", "neighbours", "vocab")
BUILD_HINT = "build one with: steerscope features DICTIONARY_DIR --model MODEL --out DIR"


class StoreError(SteerscopeError):
    """The feature store is missing, incomplete, corrupt, or belongs to another dictionary."""


class FeatureStore:
    """One feature store directory, opened read-only."""

    def __init__(self, path: Path, meta: dict[str, Any], con: duckdb.DuckDBPyConnection):
        self.path, self.meta, self._con = path, meta, con
        self.n_features: int = int(meta["d_sae"])

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, {self.meta['architecture']} x {self.n_features} at {self.meta['site']})"

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise StoreError(f"no feature store at {path}: the directory does not exist; {BUILD_HINT}")
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise StoreError(f"{path} is not a finished feature store (no meta.json: never built, or the build was "
                             f"interrupted); {BUILD_HINT}")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise StoreError(f"{meta_file} is corrupt ({str(e)[:80]}); rebuild the store with --overwrite") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "fingerprint" not in meta or "d_sae" not in meta:
            raise StoreError(f"{meta_file} is not the meta of a steerscope feature store; {BUILD_HINT}")
        for name in TABLES:
            _check_table(path / f"{name}.parquet", meta["fingerprint"], (meta.get("tables") or {}).get(name))
        con = duckdb.connect(":memory:")
        try:
            for name in TABLES:
                kind = "TABLE" if name in IN_MEMORY else "VIEW"
                con.execute(f"CREATE {kind} {name} AS SELECT * FROM read_parquet('{_sql_path(path / f'{name}.parquet')}')")
        except duckdb.Error as e:
            raise StoreError(f"{path}: cannot read the tables ({str(e).splitlines()[0][:120]}); rebuild the store") from e
        store = cls(path, meta, con)
        if store._rows("SELECT count(*) AS n FROM features")[0]["n"] != store.n_features:
            raise StoreError(f"{path}: features.parquet does not have {store.n_features} rows as meta.json says; rebuild")
        return store

    # ------------------------------------------------------------------ queries
    def _rows(self, sql: str, params: list | None = None) -> list[dict[str, Any]]:
        try:
            cur = self._con.cursor()
            try:
                res = cur.execute(sql, params or [])
                cols = [d[0] for d in res.description]
                return [dict(zip(cols, row, strict=True)) for row in res.fetchall()]
            finally:
                cur.close()
        except duckdb.Error as e:
            raise StoreError(f"{self.path}: query failed ({str(e).splitlines()[0][:120]}); the store may be damaged") from e

    def check_id(self, feature: Any) -> int:
        """``feature`` as an int in range, or a StoreError saying which ids exist."""
        text = str(feature).strip()
        try:
            i = int(text)
        except ValueError as e:
            raise StoreError(f"feature id {text!r} is not a whole number") from e
        if not 0 <= i < self.n_features:
            raise StoreError(f"feature {i} does not exist: this dictionary has {self.n_features} features "
                             f"(0 to {self.n_features - 1})")
        return i

    def feature(self, i: int) -> dict[str, Any]:
        """Statistics of one feature: density, n_fired, max_act, mean_act, hist_counts, hist_width."""
        return self._rows("SELECT * FROM features WHERE feature = ?", [self.check_id(i)])[0]

    def examples(self, i: int) -> list[dict[str, Any]]:
        """Top examples (kind "top", by rank) then interval samples, highest interval first."""
        return self._rows("SELECT kind, rank, interval_lo, interval_hi, interval_frac, context, position, act, center, "
                          "token_ids, tokens, acts FROM examples WHERE feature = ? "
                          "ORDER BY kind = 'top' DESC, interval_lo DESC, rank", [self.check_id(i)])

    def logits(self, i: int) -> dict[str, list[dict[str, Any]]]:
        """{"top": [...], "bottom": [...]} tokens with their logit effects (empty if the site has none)."""
        rows = self._rows("SELECT kind, rank, token_id, token, value FROM logits WHERE feature = ? ORDER BY rank",
                          [self.check_id(i)])
        return {k: [r for r in rows if r["kind"] == k] for k in ("top", "bottom")}

    def neighbours(self, i: int) -> list[dict[str, Any]]:
        """Nearest features by decoder cosine, with their density and max activation."""
        return self._rows("SELECT n.neighbour, n.cosine, f.density, f.max_act FROM neighbours n JOIN features f "
                          "ON f.feature = n.neighbour WHERE n.feature = ? ORDER BY n.rank", [self.check_id(i)])

    def stats(self, features: list[int]) -> dict[int, dict[str, Any]]:
        """density and max_act of several features at once."""
        if not features:
            return {}
        rows = self._rows("SELECT feature, density, max_act FROM features WHERE feature IN (SELECT unnest(?))",
                          [[int(f) for f in features]])
        return {r["feature"]: r for r in rows}

    def overview(self):
        """feature, density, max_act, mean_act, n_fired of every feature (a pandas DataFrame)."""
        cur = self._con.cursor()
        try:
            return cur.execute("SELECT feature, density, max_act, mean_act, n_fired FROM features ORDER BY feature").df()
        finally:
            cur.close()

    def density_histogram(self, bins: int = 40) -> dict[str, Any]:
        """Counts of live features over log10(density) in ``bins`` equal bins, and the number of dead ones."""
        rows = self._rows("SELECT log10(density) AS x FROM features WHERE density > 0")
        dead = self.n_features - len(rows)
        if not rows:
            return {"edges": [], "counts": [], "dead": dead}
        xs = [r["x"] for r in rows]
        lo, hi = math.floor(min(xs) * 4) / 4, math.ceil(max(xs) * 4) / 4 + 1e-9
        width = max(hi - lo, 1e-6) / bins
        counts = [0] * bins
        for x in xs:
            counts[min(int((x - lo) / width), bins - 1)] += 1
        return {"edges": [lo + k * width for k in range(bins + 1)], "counts": counts, "dead": dead}

    def search_token(self, text: str, limit: int = 25) -> dict[str, list[dict[str, Any]]]:
        """Features whose top examples sit on this token ("fires_on"), and features whose logit effect
        promotes it most ("promotes"). Matching ignores case and surrounding spaces."""
        key = text.strip().lower()
        if not key:
            return {"fires_on": [], "promotes": []}
        fires = self._rows("SELECT feature, count(*) AS n_top_examples, max(act) AS max_act FROM examples "
                           "WHERE kind = 'top' AND lower(trim(CAST(token AS VARCHAR))) = ? GROUP BY feature "
                           "ORDER BY n_top_examples DESC, max_act DESC LIMIT ?", [key, limit])
        promotes = self._rows("SELECT feature, min(rank) AS rank, max(value) AS logit_effect FROM logits "
                              "WHERE kind = 'top' AND lower(trim(CAST(token AS VARCHAR))) = ? GROUP BY feature "
                              "ORDER BY logit_effect DESC LIMIT ?", [key, limit])
        return {"fires_on": fires, "promotes": promotes}

    def dictionary_dir(self) -> Path | None:
        """The directory of the dictionary this store was built from (recorded relative to the store, or
        absolute), if it is still there; else None."""
        from saes.provenance import resolve_dictionary_path

        return resolve_dictionary_path(self.meta, self.path)

    def evaluation(self) -> dict[str, Any] | None:
        """The dictionary's ``eval.json`` as it is now (an evaluation written after the build shows), else the
        one recorded at build time; an eval.json of another dictionary (fingerprint) is ignored."""
        from saes.provenance import read_beside

        return read_beside(self.dictionary_dir(), "eval", self.meta["fingerprint"]) or self.meta.get("eval")

    def history(self) -> Any:
        """Training curves: the dictionary's ``history.json`` now, else those recorded at build time."""
        from saes.provenance import read_beside

        return read_beside(self.dictionary_dir(), "history", self.meta["fingerprint"]) or self.meta.get("history")

    def check_dictionary(self, dictionary) -> None:
        """Raise StoreError unless ``dictionary`` is the one this store was built from."""
        from saes.base import fingerprint

        fp = fingerprint(dictionary)
        if fp != self.meta["fingerprint"]:
            raise StoreError(f"this feature store was built from another dictionary (fingerprint "
                             f"{self.meta['fingerprint'][:12]}, the loaded {dictionary.architecture} has {fp[:12]}); "
                             "pass the dictionary it was built from, or rebuild the store for this one")


def _check_table(file: Path, fingerprint: str, entry: dict | None) -> None:
    """Present, a Parquet file stamped with the meta's fingerprint, and of the size and sha256 meta.json records
    (stores built before checksums: not checked)."""
    if not file.is_file():
        raise StoreError(f"{file.parent} is incomplete: {file.name} is missing; rebuild the store with --overwrite")
    try:
        meta = pq.read_schema(file).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"{file} is corrupt ({str(e).splitlines()[0][:100]}); rebuild the store with --overwrite") from e
    if meta.get(b"fingerprint", b"").decode() != fingerprint:
        raise StoreError(f"{file.name} belongs to another dictionary than meta.json (a mix of two builds in "
                         f"{file.parent}); rebuild the store with --overwrite")
    if entry is not None:
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise StoreError(f"{file} is truncated or altered ({size} bytes, meta.json says {entry.get('bytes')}); "
                             "rebuild the store with --overwrite")
        if _sha256(file) != entry.get("sha256"):
            raise StoreError(f"{file} is corrupted (its sha256 differs from meta.json's); rebuild the store with --overwrite")


def _sha256(file: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sql_path(path: Path) -> str:
    return str(path.resolve()).replace("'", "''")
