"""`forkview merge OUT.db IN.db ...`: one database from several machines' databases.

Nothing is lost and nothing is duplicated:

- a trace is identified by its `uid` (made at generation, kept by merges): a trace
  already in OUT is not copied again; a new one gets a fresh id in OUT with its
  parent, model and prompt ids remapped (parents are copied before their children);
- models are matched on (spec, content_hash, revision, dtype, device, backend) and prompts on
  (text, reference_answer, source_set, source_id), the keys `Store.upsert_model` and
  `Store.add_prompt` use, so one model or prompt stays one row;
- MI runs are matched on their unique key (trace, estimator, params): a run OUT
  lacks is copied with its values; for a run both have, values OUT lacks are added
  (and the run takes the input's status if only the input's is complete);
- token_scores rows are keyed (trace, model, position) and added where missing;
- OUT's `meta` gets a `merged_from` JSON list: which file was merged when, from which
  schema, and what it added (and the input's own `merged_from`, if it was itself a
  merge).

Inputs are never modified: they are read through SQLite's read-only mode; an input
from an older schema is first copied (SQLite backup API) to a temporary file and the
copy upgraded. A running trace is copied as it is (its status stays `running`).

No torch here.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from store.db import Store, _check_file, named_rows, now_iso
from store.errors import StoreError
from store.schema import MODEL_KEY, SCHEMA_VERSION

# Key columns of `models` added by later schemas, as an upgrade fills them in.
MODEL_DEFAULTS: dict[str, Any] = {"backend": "hf"}

PROMPT_KEY = ("text", "reference_answer", "source_set", "source_id")


@dataclass
class MergeStats:
    file: str
    schema: int
    traces_added: int = 0
    traces_present: int = 0
    tokens_added: int = 0
    models_added: int = 0
    prompts_added: int = 0
    mi_runs_added: int = 0
    mi_values_added: int = 0
    token_scores_added: int = 0

    @property
    def added_anything(self) -> bool:
        return any((self.traces_added, self.tokens_added, self.models_added,
                    self.prompts_added, self.mi_runs_added, self.mi_values_added,
                    self.token_scores_added))


def _ro_connect(path: Path) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    con = sqlite3.connect(uri, uri=True, timeout=60)
    con.execute("PRAGMA busy_timeout = 60000")
    return con


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_inputs(out: Path, inputs: Sequence[Path]) -> list[int]:
    """Schema version of every input, refusing (StoreError, one line) a missing file, a
    file that is not a forkview database, a newer schema, or OUT named as an input."""
    if not inputs:
        raise StoreError("nothing to merge: name at least one input database")
    versions = []
    for p in inputs:
        if p.resolve() == out.resolve() or _same_file(p, out):
            raise StoreError(f"{p} is the output database; merge it into another file")
        if p.is_dir():
            raise StoreError(f"{p} is a directory, not a database file")
        if not p.exists():
            raise StoreError(f"database not found: {p}")
        version = _check_file(p)
        if version == 0:
            raise StoreError(f"{p} is not a forkview database (no forkview tables)")
        versions.append(version)
    return versions


def merge(out: str | Path, inputs: Sequence[str | Path],
          on_file: Callable[[MergeStats], None] | None = None) -> list[MergeStats]:
    """Merge every input into OUT (created if missing), one transaction per input."""
    out_path = Path(out).expanduser()
    in_paths = [Path(p).expanduser() for p in inputs]
    versions = check_inputs(out_path, in_paths)
    store = Store.open(out_path)
    stats = []
    try:
        for path, version in zip(in_paths, versions, strict=True):
            with tempfile.TemporaryDirectory(prefix="forkview-merge-") as tmp:
                src_path = path if version >= SCHEMA_VERSION else _upgraded_copy(path, Path(tmp))
                src = _ro_connect(src_path)
                try:
                    s = MergeStats(file=str(path.resolve()), schema=version)
                    with store.engine.begin() as conn:
                        dst = conn.connection.dbapi_connection
                        _merge_one(src, dst, s)
                        if s.added_anything:
                            _record(src, dst, s)
                finally:
                    src.close()
            stats.append(s)
            if on_file:
                on_file(s)
    finally:
        store.close()
    return stats


def _upgraded_copy(path: Path, tmp: Path) -> Path:
    """A copy of an older-schema input, upgraded; the input itself is only read."""
    copy = tmp / "input.db"
    src = _ro_connect(path)
    try:
        dst = sqlite3.connect(copy)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    Store.open(copy).close()  # runs the migrations on the copy
    return copy


def _columns(con: Any, table: str) -> list[str]:
    return [r["name"] for r in named_rows(con, f"PRAGMA table_info({table})")]


def _rows(con: sqlite3.Connection, table: str, cols: Sequence[str],
          order: str = "") -> list[dict[str, Any]]:
    sql = f"SELECT {', '.join(cols)} FROM {table} {order}"
    return [dict(r) for r in named_rows(con, sql)]


def _insert(dst: Any, table: str, row: dict[str, Any]) -> int:
    cols = list(row)
    cur = dst.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
                      f"({', '.join('?' * len(cols))})", [row[c] for c in cols])
    return int(cur.lastrowid)


def _find(dst: Any, table: str, key: Sequence[str], row: dict[str, Any]) -> int | None:
    # IS, not =: NULL content_hash / source_set must match NULL.
    where = " AND ".join(f"{k} IS ?" for k in key)
    found = named_rows(dst, f"SELECT id FROM {table} WHERE {where} ORDER BY id LIMIT 1",
                       [row[k] for k in key]).fetchone()
    return None if found is None else int(found["id"])


def _merge_keyed(src: sqlite3.Connection, dst: Any, table: str, cols: list[str],
                 key: tuple[str, ...], backfill: str, added: int,
                 defaults: dict[str, Any] | None = None) -> tuple[dict[int, int], int]:
    """Rows of a table matched on their natural key: the old id -> the id in OUT, and
    the count of rows added. A matched row missing `backfill` gets the input's value.
    Key columns an older input lacks take their value in `defaults` (what the upgrade
    of that file would give them)."""
    id_map: dict[int, int] = {}
    for row in _rows(src, table, cols):
        for k, v in (defaults or {}).items():
            row.setdefault(k, v)
        old = row.pop("id")
        found = _find(dst, table, key, row)
        if found is None:
            found = _insert(dst, table, row)
            added += 1
        elif row.get(backfill):
            dst.execute(f"UPDATE {table} SET {backfill} = ? WHERE id = ? AND {backfill} IS NULL",
                        (row[backfill], found))
        id_map[old] = found
    return id_map, added


def _merge_one(src: sqlite3.Connection, dst: Any, s: MergeStats) -> None:
    # Columns both files have (the same set once the input is at the current schema).
    def common(table: str) -> list[str]:
        have = set(_columns(dst, table))
        return [c for c in _columns(src, table) if c in have]

    # models and prompts: matched on their natural keys, added when missing.
    model_map, s.models_added = _merge_keyed(src, dst, "models", common("models"), MODEL_KEY,
                                             "tokenizer_hash", s.models_added,
                                             defaults=MODEL_DEFAULTS)
    prompt_map, s.prompts_added = _merge_keyed(src, dst, "prompts", common("prompts"),
                                               PROMPT_KEY, "reference_solution",
                                               s.prompts_added)

    # traces: parents before children, matched on uid.
    trace_cols = common("traces")
    rows = _rows(src, "traces", trace_cols, "ORDER BY id")
    by_id = {r["id"]: r for r in rows}
    depth: dict[int, int] = {}
    for r in rows:
        chain, t = [], r["id"]
        while t in by_id and t not in depth:
            chain.append(t)
            t = by_id[t]["parent_trace_id"]
        d = depth.get(t, -1)  # a root's parent (None, or one not in this file) is -1
        for c in reversed(chain):
            d += 1
            depth[c] = d
    rows.sort(key=lambda r: (depth[r["id"]], r["id"]))
    existing = {r["uid"]: r["id"] for r in named_rows(dst, "SELECT uid, id FROM traces")}
    trace_map: dict[int, int] = {}
    new_traces: list[tuple[int, int]] = []
    token_cols = common("tokens")
    for row in rows:
        old = row.pop("id")
        if row["uid"] in existing:
            trace_map[old] = int(existing[row["uid"]])
            s.traces_present += 1
            continue
        row["model_id"] = model_map[row["model_id"]]
        row["prompt_id"] = prompt_map[row["prompt_id"]]
        if row["parent_trace_id"] is not None:
            row["parent_trace_id"] = trace_map.get(row["parent_trace_id"])
        new = _insert(dst, "traces", row)
        trace_map[old] = new
        existing[row["uid"]] = new
        new_traces.append((old, new))
        s.traces_added += 1
    pos = token_cols.index("trace_id")
    for old, new in new_traces:
        toks = [list(r) for r in src.execute(
            f"SELECT {', '.join(token_cols)} FROM tokens WHERE trace_id = ?", (old,))]
        for t in toks:
            t[pos] = new
        if toks:
            dst.executemany(f"INSERT INTO tokens ({', '.join(token_cols)}) VALUES "
                            f"({', '.join('?' * len(token_cols))})", toks)
            s.tokens_added += len(toks)

    _merge_mi(src, dst, s, common, trace_map, model_map)
    _merge_scores(src, dst, s, common, trace_map, model_map)


def _merge_mi(src: sqlite3.Connection, dst: Any, s: MergeStats, common: Callable[[str], list[str]],
              trace_map: dict[int, int], model_map: dict[int, int]) -> None:
    for row in _rows(src, "mi_runs", common("mi_runs"), "ORDER BY id"):
        old = row.pop("id")
        row["trace_id"] = trace_map[row["trace_id"]]
        if row.get("model_id") is not None:
            row["model_id"] = model_map[row["model_id"]]
        found = named_rows(
            dst, "SELECT id, status FROM mi_runs WHERE trace_id = ? AND estimator = ? "
            "AND params = ?", (row["trace_id"], row["estimator"], row["params"])).fetchone()
        if found is None:
            run_id = _insert(dst, "mi_runs", row)
            s.mi_runs_added += 1
        else:
            run_id = int(found["id"])
            if found["status"] != "complete" and row["status"] == "complete":
                dst.execute("UPDATE mi_runs SET status = ?, error = ?, info = ?, "
                            "finished_at = ? WHERE id = ?",
                            (row["status"], row["error"], row["info"], row["finished_at"],
                             run_id))
        values = [(run_id, r["position"], r["value"], r["detail"]) for r in named_rows(
            src, "SELECT position, value, detail FROM mi_values WHERE run_id = ?", (old,))]
        if values:
            before = dst.total_changes
            dst.executemany("INSERT OR IGNORE INTO mi_values (run_id, position, value, detail) "
                            "VALUES (?, ?, ?, ?)", values)
            s.mi_values_added += dst.total_changes - before


def _merge_scores(src: sqlite3.Connection, dst: Any, s: MergeStats,
                  common: Callable[[str], list[str]], trace_map: dict[int, int],
                  model_map: dict[int, int]) -> None:
    cols = common("token_scores")
    ti, mi = cols.index("trace_id"), cols.index("model_id")
    rows = []
    for r in src.execute(f"SELECT {', '.join(cols)} FROM token_scores"):
        r = list(r)
        r[ti], r[mi] = trace_map[r[ti]], model_map[r[mi]]
        rows.append(r)
    if rows:
        before = dst.total_changes
        dst.executemany(f"INSERT OR IGNORE INTO token_scores ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' * len(cols))})", rows)
        s.token_scores_added += dst.total_changes - before


def _record(src: sqlite3.Connection, dst: Any, s: MergeStats) -> None:
    """Append this merge to OUT's meta.merged_from (with the input's own history)."""
    row = named_rows(dst, "SELECT value FROM meta WHERE key = 'merged_from'").fetchone()
    history = json.loads(row["value"]) if row else []
    entry: dict[str, Any] = {"merged_at": now_iso(), **asdict(s)}
    meta = {r["key"]: r["value"] for r in named_rows(src, "SELECT key, value FROM meta")}
    if "created_by" in meta:
        entry["created_by"] = meta["created_by"]
    if "merged_from" in meta:
        entry["its_merged_from"] = json.loads(meta["merged_from"])
    history.append(entry)
    dst.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('merged_from', ?)",
                (json.dumps(history, ensure_ascii=False),))
