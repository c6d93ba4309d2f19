"""Opening, versioning and writing the forkview SQLite file.

Concurrency: WAL journal, a generous busy timeout and BEGIN IMMEDIATE for every
transaction, so two forkview processes writing the same file queue for the lock
instead of failing with "database is locked" on a read-to-write upgrade.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sqlite3
import threading
import time
import urllib.parse
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlmodel import Session, SQLModel, create_engine, select

from models.thinking import THINK_CLOSE, THINK_OPEN, ThinkSpan, find_think_span
from models.types import Alternative, GenerationParams, TokenStep, forkview_version
from store.errors import StoreError
from store.schema import MODEL_KEY, ORIGINS, SCHEMA_VERSION, ModelRow, PromptRow, TraceRow

FORKVIEW_TABLES = {"meta", "models", "prompts", "traces", "tokens"}
# meta key prefix of a superseded trace's pointer: `superseded_by:<its uid>` = the uid
# of the trace that replaced it (see Store.supersede).
SUPERSEDED_KEY = "superseded_by:"
# meta key prefix of an imported trace's provenance (`forkview import`): `import:<its
# uid>` = JSON {file, line (or row), sha256, format, imported_at} (see
# Store.add_import_provenance).
IMPORT_KEY = "import:"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def default_db_path() -> Path:
    env = os.environ.get("FORKVIEW_DB")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("forkview")) / "forkview.db"


def named_rows(con: Any, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
    """Run `sql` on a sqlite3 connection and return a cursor whose rows are
    `sqlite3.Row`s, read by column name (`row["id"]`), so adding a column to a SELECT
    never shifts another. The row factory is the cursor's, not the connection's: a
    pooled connection of a Store's engine is left as SQLAlchemy expects it."""
    cur = con.cursor()
    cur.row_factory = sqlite3.Row
    return cur.execute(sql, args)


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    for col, typ in (("stop_reason", "VARCHAR"), ("tokens_per_second", "FLOAT"),
                     ("host", "VARCHAR"), ("pid", "INTEGER")):
        conn.execute(f"ALTER TABLE traces ADD COLUMN {col} {typ}")


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE prompts ADD COLUMN reference_solution VARCHAR")
    for col, typ in (("answer", "VARCHAR"), ("answer_method", "VARCHAR"),
                     ("correct", "BOOLEAN")):
        conn.execute(f"ALTER TABLE traces ADD COLUMN {col} {typ}")
    # mi_runs and mi_values are new tables: create_all makes them after the upgrade.


def _migrate_3_to_4(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE models ADD COLUMN tokenizer_hash VARCHAR")
    conn.execute("ALTER TABLE traces ADD COLUMN origin VARCHAR NOT NULL DEFAULT 'generate'")
    # Before version 4 the only traces with a parent were rollout continuations.
    conn.execute("UPDATE traces SET origin = 'rollout' WHERE parent_trace_id IS NOT NULL")
    # token_scores is a new table: create_all makes it after the upgrade.


def _migrate_4_to_5(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE models ADD COLUMN backend VARCHAR NOT NULL DEFAULT 'hf'")
    # The cut-off rule (models/answers.py accept_answer), applied to what older versions
    # stored: a response stopped by the token limit keeps only an explicitly stated
    # answer; otherwise it has no answer and is not scored.
    from models.answers import CUT_OFF, CUT_OFF_REASONS, EXPLICIT_METHODS

    reasons = ", ".join("?" * len(CUT_OFF_REASONS))
    explicit = ", ".join("?" * len(EXPLICIT_METHODS))
    conn.execute(
        f"UPDATE traces SET answer = NULL, correct = NULL, answer_method = ? "
        f"WHERE stop_reason IN ({reasons}) "
        f"AND (answer_method IS NULL OR answer_method NOT IN ({explicit}))",
        (CUT_OFF, *CUT_OFF_REASONS, *EXPLICIT_METHODS))
    for col, typ in (("system", "VARCHAR"), ("enable_thinking", "BOOLEAN"),
                     ("think_start", "INTEGER"), ("think_end", "INTEGER"),
                     ("answer_start", "INTEGER")):
        conn.execute(f"ALTER TABLE traces ADD COLUMN {col} {typ}")
    # The thinking span of the root traces that hold a marker, from their token pieces.
    # Their rendered prompt is not known here (no tokenizer): a response that starts
    # inside the thinking part is recognised by a closing marker with no opening one
    # before it.
    ids = [r["id"] for r in named_rows(
        conn, "SELECT id FROM traces WHERE parent_trace_id IS NULL AND (instr(text, ?) > 0 "
        "OR instr(text, ?) > 0)", (THINK_OPEN, THINK_CLOSE))]
    for tid in ids:
        pieces = [r["text"] for r in named_rows(
            conn, "SELECT text FROM tokens WHERE trace_id = ? ORDER BY position", (tid,))]
        span = find_think_span(pieces)
        if span is not None:
            conn.execute("UPDATE traces SET think_start = ?, think_end = ?, answer_start = ? "
                         "WHERE id = ?", (span.start, span.end, span.answer_start, tid))


# MIGRATIONS[n] upgrades a file from schema n to n + 1.
MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4, 4: _migrate_4_to_5}


@dataclass
class TraceInfo:
    """A trace with its model and prompt, as the browser and exporters need it."""

    id: int
    uid: str
    status: str
    stop_reason: str | None
    model_name: str
    model_spec: str
    prompt: str
    reference_answer: str | None
    text: str
    n_tokens: int
    started_at: str
    finished_at: str | None
    tokens_per_second: float | None
    parent_trace_id: int | None
    fork_position: int | None
    prompt_token_ids: list[int]
    params: GenerationParams
    error: str | None
    answer: str | None = None
    answer_method: str | None = None
    correct: bool | None = None
    reference_solution: str | None = None
    source_set: str | None = None
    source_id: str | None = None
    model_id: int | None = None
    origin: str = "generate"
    forced_token_ids: list[int] | None = None
    model_tokenizer_hash: str | None = None
    prompt_id: int | None = None
    think_start: int | None = None  # the thinking part, models/thinking.py
    think_end: int | None = None
    answer_start: int | None = None

    @property
    def is_root(self) -> bool:
        return self.parent_trace_id is None


@dataclass
class MIRunInfo:
    id: int
    trace_id: int
    estimator: str
    params: dict[str, Any]
    info: dict[str, Any]
    status: str
    error: str | None
    created_at: str
    finished_at: str | None
    n_values: int


def _check_file(path: Path) -> int:
    """Schema version of an existing file, refusing anything that isn't ours."""
    try:
        # Percent-encoded: a raw "?", "#" or "%" in the path would be parsed as URI
        # syntax and the check would look at another file (or none).
        uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
        con = sqlite3.connect(uri, uri=True)
        con.row_factory = sqlite3.Row
        try:
            version = con.execute("PRAGMA user_version").fetchone()["user_version"]
            tables = {
                r["name"] for r in con.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")
            }
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise StoreError(cannot_open_reason(path)
                         or f"{path} is not a forkview database ({e})") from e
    if tables and not FORKVIEW_TABLES & tables:
        raise StoreError(f"{path} is a SQLite file but not a forkview database")
    if tables and version == 0:
        raise StoreError(f"{path} has no forkview schema version; refusing to touch it")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} was written by a newer forkview (schema {version}, this forkview "
            f"reads up to {SCHEMA_VERSION}); upgrade forkview to open it"
        )
    return version


def cannot_open_reason(path: Path) -> str | None:
    """Why SQLite cannot open an existing file for reading, when the cause is not the
    file's content: the file is unreadable, or it is in WAL mode in a directory that is
    not writable (a reader must create the -shm side file, which SQLite reports only as
    "unable to open database file"). None when neither applies."""
    if not os.access(path, os.R_OK):
        return f"cannot read {path}: permission denied"
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    # Bytes 18 and 19 of the header are the write and read format versions: 2 is WAL.
    wal = header[:16] == b"SQLite format 3\0" and 2 in header[18:20]
    shm = Path(f"{path}-shm")
    if wal and not shm.exists() and not os.access(path.parent, os.W_OK):
        return (f"cannot read {path}: it is in WAL mode and its directory is not writable "
                f"(SQLite needs to create {shm.name}); copy it elsewhere, or run "
                f"`sqlite3 {shlex.quote(str(path))} 'PRAGMA journal_mode=DELETE'` where you "
                f"can write")
    return None


def _empty_database(path: Path) -> str:
    size = path.stat().st_size
    what = "is empty (0 bytes)" if size == 0 else "is a SQLite file with no tables"
    return f"{path} {what}, not a forkview database"


class Store:
    """The results store. Open with `Store.open(path)`."""

    # Every store opened in this process, so a command can close what it opened (see
    # `close_all`): an engine left to the garbage collector closes its last WAL
    # connection, and so checkpoints into the file, at an arbitrary later moment.
    _open: ClassVar[weakref.WeakSet[Store]] = weakref.WeakSet()

    def __init__(self, path: Path, engine: Engine):
        self.path = path
        self.engine = engine
        Store._open.add(self)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, path: str | Path | None = None, *, create: bool = True, readonly: bool = False
    ) -> Store:
        """Open (or create) a forkview database.

        `readonly` is for browsing, listing and exporting: the file is opened with
        SQLite's mode=ro, its journal mode is left as it is and stale traces are not
        recovered (they read as crashed: see `effective_status`), so looking at a
        database (e.g. the committed sample) never changes a byte of it. A missing or
        empty file (0 bytes, or SQLite with no tables) is refused and left as it is. A
        file from an older schema is still upgraded first.
        """
        path = Path(path).expanduser() if path else default_db_path()
        if readonly:
            create = False
        if path.is_dir():
            raise StoreError(f"{path} is a directory, not a database file")
        exists = path.exists()
        if not exists:
            if not create:
                raise StoreError(f"database not found: {path}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the database directory {path.parent}: "
                                 f"{e.strerror}") from e
            if not os.access(path.parent, os.W_OK):
                raise StoreError(f"cannot create {path}: directory {path.parent} is not writable")
            version = 0
        else:
            version = _check_file(path)
        if readonly:
            if version == 0:  # no tables (_check_file refuses tables without a version)
                raise StoreError(_empty_database(path))
            if version < SCHEMA_VERSION:
                # The reads expect the current columns: upgrade in place, then read.
                cls.open(path).close()
            return cls(path, _readonly_engine(path))
        engine = create_engine(
            # URL.create, not an f-string URL: "?" or "%" in the path would otherwise be
            # parsed as a query string / escape and another file silently opened.
            URL.create("sqlite", database=str(path)),
            connect_args={"timeout": 60, "check_same_thread": False},
        )
        _install_pragmas(engine)
        store = cls(path, engine)
        try:
            store._prepare(version)
        except OperationalError as e:
            raise StoreError(f"cannot write {path}: {e.orig}") from e
        except DatabaseError as e:
            raise StoreError(f"{path} is not a usable forkview database ({e.orig})") from e
        return store

    def _prepare(self, version: int) -> None:
        if version == 0:
            # Tables and version in one BEGIN IMMEDIATE transaction: a second process
            # opening the new file at the same moment never sees forkview tables
            # without a version (which _check_file refuses), and create_all's
            # existence checks run under the write lock.
            with self.engine.begin() as conn:
                SQLModel.metadata.create_all(conn)
                conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.exec_driver_sql(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('created_by', ?)",
                    (f"forkview {forkview_version()}",),
                )
        elif version < SCHEMA_VERSION:
            self._upgrade(version)
        self._recover_stale()

    def _upgrade(self, version: int) -> None:
        with self.engine.begin() as conn:
            # Re-read under the write lock: another process may have upgraded the
            # file since _check_file looked (re-running ALTER TABLE would fail).
            version = int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)
            if version >= SCHEMA_VERSION:
                return
            raw = conn.connection.dbapi_connection
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](raw)
            conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.exec_driver_sql(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('upgraded_from', ?)",
                (str(version),),
            )
        # Tables and indexes new in this version (create_all skips existing ones).
        SQLModel.metadata.create_all(self.engine)

    # ------------------------------------------------------------------ liveness
    @staticmethod
    def is_stale(host: str | None, pid: int | None) -> bool:
        """Whether a `running` trace with this writer (host, pid) was left behind: its
        process ran on this host and no longer exists. See `is_stale` (module)."""
        return is_stale(host, pid)

    @staticmethod
    def effective_status(status: str, stop_reason: str | None, host: str | None,
                         pid: int | None) -> tuple[str, str | None]:
        """(status, stop_reason) as a reader should see them: a `running` trace whose
        writer is gone reads as ("stopped", "crashed"), what the next writable open
        records; anything else as stored (`complete`, `stopped`, `failed`, and
        `superseded`: a stopped copy a resumed batch made again, see `supersede`)."""
        if status == "running" and is_stale(host, pid):
            return "stopped", "crashed"
        return status, stop_reason

    def stale_trace_ids(self) -> list[int]:
        """Ids of the traces stored as `running` whose writer is gone (see `is_stale`),
        ascending. Reads only: a read-only store reports them without changing them."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT id, host, pid FROM traces WHERE status = 'running' AND host = ? "
                "ORDER BY id", (socket.gethostname(),)).mappings().fetchall()
        return [int(r["id"]) for r in rows if is_stale(r["host"], r["pid"])]

    def _recover_stale(self) -> None:
        """Traces left `running` by a process on this host that no longer exists
        (killed, crashed, power cut) are marked `stopped`: their tokens are kept."""
        host = socket.gethostname()
        with self.engine.begin() as conn:
            rows = conn.exec_driver_sql(
                "SELECT id, pid FROM traces WHERE status = 'running' AND host = ?", (host,)
            ).mappings().fetchall()
            dead = [r["id"] for r in rows if is_stale(host, r["pid"])]
            for tid in dead:
                conn.exec_driver_sql(
                    "UPDATE traces SET status = 'stopped', stop_reason = 'crashed', "
                    "finished_at = COALESCE(finished_at, ?) WHERE id = ?",
                    (now_iso(), tid),
                )

    def close(self) -> None:
        self.engine.dispose()
        Store._open.discard(self)

    @classmethod
    def close_all(cls) -> None:
        """Close every store still open in this process (the CLI calls it when a command
        ends, so the file is settled before `main` returns)."""
        for store in list(cls._open):
            store.close()

    @property
    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)

    # ------------------------------------------------------------------ writing
    def upsert_model(
        self,
        *,
        name: str,
        spec: str,
        kind: str,
        dtype: str,
        device: str,
        content_hash: str | None = None,
        revision: str | None = None,
        tokenizer_hash: str | None = None,
        backend: str = "hf",
    ) -> int:
        with Session(self.engine) as s:
            key = {"spec": spec, "content_hash": content_hash, "revision": revision,
                   "dtype": dtype, "device": device, "backend": backend}
            found = s.exec(select(ModelRow).where(
                *(getattr(ModelRow, k) == key[k] for k in MODEL_KEY))).first()
            if found is not None:
                if tokenizer_hash and not found.tokenizer_hash:
                    found.tokenizer_hash = tokenizer_hash
                    s.add(found)
                    s.commit()
                return int(found.id)  # type: ignore[arg-type]
            row = ModelRow(name=name, spec=spec, kind=kind, content_hash=content_hash,
                           revision=revision, tokenizer_hash=tokenizer_hash, dtype=dtype,
                           device=device, created_at=now_iso(), backend=backend)
            s.add(row)
            s.commit()
            return int(row.id)  # type: ignore[arg-type]

    def add_prompt(
        self,
        text_: str,
        *,
        reference_answer: str | None = None,
        reference_solution: str | None = None,
        source_set: str | None = None,
        source_id: str | None = None,
    ) -> int:
        """Prompts are shared by every trace made from them: the same text, answer and
        source give the same row."""
        with Session(self.engine) as s:
            found = s.exec(
                select(PromptRow).where(
                    PromptRow.text == text_,
                    PromptRow.reference_answer == reference_answer,
                    PromptRow.source_set == source_set,
                    PromptRow.source_id == source_id,
                )
            ).first()
            if found is not None:
                if reference_solution and not found.reference_solution:
                    found.reference_solution = reference_solution
                    s.add(found)
                    s.commit()
                return int(found.id)  # type: ignore[arg-type]
            row = PromptRow(text=text_, reference_answer=reference_answer,
                            reference_solution=reference_solution,
                            source_set=source_set, source_id=source_id, created_at=now_iso())
            s.add(row)
            s.commit()
            return int(row.id)  # type: ignore[arg-type]

    def start_trace(
        self,
        *,
        model_id: int,
        prompt_id: int,
        prompt_token_ids: Sequence[int],
        params: GenerationParams,
        parent_trace_id: int | None = None,
        fork_position: int | None = None,
        forced_token_ids: Sequence[int] | None = None,
        origin: str | None = None,
    ) -> int:
        if origin is None:
            origin = "generate" if parent_trace_id is None else "fork"
        if origin not in ORIGINS:
            raise StoreError(f"unknown trace origin {origin!r}")
        row = TraceRow(
            uid=uuid.uuid4().hex,
            model_id=model_id,
            prompt_id=prompt_id,
            parent_trace_id=parent_trace_id,
            fork_position=fork_position,
            forced_token_ids=(json.dumps([int(i) for i in forced_token_ids])
                              if forced_token_ids is not None
                              and (parent_trace_id is not None or len(forced_token_ids))
                              else None),
            origin=origin,
            prompt_token_ids=json.dumps([int(i) for i in prompt_token_ids]),
            raw=params.raw,
            system=params.system,
            enable_thinking=params.enable_thinking,
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop=json.dumps(list(params.stop)),
            top_alternatives=params.top_alternatives,
            status="running",
            started_at=now_iso(),
            host=socket.gethostname(),
            pid=os.getpid(),
            forkview_version=forkview_version(),
        )
        with Session(self.engine) as s:
            s.add(row)
            s.commit()
            return int(row.id)  # type: ignore[arg-type]

    def add_child_trace(
        self,
        parent_trace_id: int,
        *,
        fork_position: int,
        forced_token_ids: Sequence[int],
        params: GenerationParams,
        text_: str,
        steps: Sequence[TokenStep] | None,
        n_tokens: int,
        stop_reason: str,
        answer: str | None,
        answer_method: str | None,
        model_id: int | None = None,
        origin: str = "rollout",
    ) -> int:
        """A finished continuation forked from a trace (e.g. an MI rollout). It shares
        the parent's prompt; its `text` and tokens start at `fork_position` (positions
        below it are the parent's, which are not copied)."""
        parent = self.trace(parent_trace_id)
        with self.engine.connect() as conn:
            prompt_id = conn.exec_driver_sql(
                "SELECT prompt_id FROM traces WHERE id = ?", (parent_trace_id,)
            ).scalar_one()
        tid = self.start_trace(
            model_id=model_id or parent.model_id, prompt_id=prompt_id,
            prompt_token_ids=parent.prompt_token_ids, params=params,
            parent_trace_id=parent_trace_id, fork_position=fork_position,
            forced_token_ids=forced_token_ids, origin=origin,
        )
        with self.engine.begin() as conn:
            if steps:
                conn.exec_driver_sql(
                    "INSERT INTO tokens (trace_id, position, token_id, text, logprob, rank, "
                    "entropy, sampling_entropy, top) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [token_row(tid, s) for s in steps],
                )
            correct = None
            conn.exec_driver_sql(
                "UPDATE traces SET status = 'complete', stop_reason = ?, finished_at = ?, "
                "text = ?, n_tokens = ?, answer = ?, answer_method = ?, correct = ?, "
                "host = NULL, pid = NULL WHERE id = ?",
                (stop_reason, now_iso(), text_, n_tokens, answer, answer_method, correct, tid),
            )
        return tid

    def writer(self, trace_id: int, **kw: Any) -> TraceWriter:
        return TraceWriter(self, trace_id, **kw)

    # ------------------------------------------------------------------ reading
    def trace(self, trace_id: int) -> TraceInfo:
        infos = self._trace_infos("WHERE t.id = ?", (int(trace_id),))
        if not infos:
            raise StoreError(f"no trace with id {trace_id} in {self.path}")
        return infos[0]

    def list_traces(
        self, *, search: str | None = None, model: str | None = None, limit: int | None = None,
        roots_only: bool = False, superseded: bool = False,
    ) -> list[TraceInfo]:
        """Newest first. `search` matches prompt or output text, `model` the model's
        name or spec (case-insensitive substrings); `roots_only` leaves out branches and
        rollout continuations (traces with a parent); superseded traces (stopped copies
        a resumed batch made again) are left out unless `superseded`."""
        where, args = [], []
        if roots_only:
            where.append("t.parent_trace_id IS NULL")
        if not superseded:
            where.append("t.status != 'superseded'")
        if search:
            where.append("(p.text LIKE ? OR t.text LIKE ?)")
            args += [f"%{search}%", f"%{search}%"]
        if model:
            where.append("(m.name LIKE ? OR m.spec LIKE ?)")
            args += [f"%{model}%", f"%{model}%"]
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        clause += " ORDER BY t.started_at DESC, t.id DESC"
        if limit:
            clause += f" LIMIT {int(limit)}"
        return self._trace_infos(clause, tuple(args))

    def _trace_infos(self, clause: str, args: tuple[Any, ...]) -> list[TraceInfo]:
        # Every column aliased: a TraceInfo field's name, else the GenerationParams
        # field's (or host / pid, for the liveness check); rows are read by name.
        sql = (
            "SELECT t.id AS id, t.uid AS uid, t.status AS status, "
            "t.stop_reason AS stop_reason, m.name AS model_name, m.spec AS model_spec, "
            "p.text AS prompt, p.reference_answer AS reference_answer, t.text AS text, "
            "t.n_tokens AS n_tokens, t.started_at AS started_at, "
            "t.finished_at AS finished_at, t.tokens_per_second AS tokens_per_second, "
            "t.parent_trace_id AS parent_trace_id, t.fork_position AS fork_position, "
            "t.prompt_token_ids AS prompt_token_ids, t.max_new_tokens AS max_new_tokens, "
            "t.temperature AS temperature, t.top_p AS top_p, t.top_k AS top_k, "
            "t.seed AS seed, t.stop AS stop, t.top_alternatives AS top_alternatives, "
            "t.raw AS raw, t.error AS error, t.answer AS answer, "
            "t.answer_method AS answer_method, t.correct AS correct, "
            "p.reference_solution AS reference_solution, p.source_set AS source_set, "
            "p.source_id AS source_id, t.model_id AS model_id, t.origin AS origin, "
            "t.forced_token_ids AS forced_token_ids, "
            "m.tokenizer_hash AS model_tokenizer_hash, t.prompt_id AS prompt_id, "
            "t.host AS host, t.pid AS pid, t.system AS system, "
            "t.enable_thinking AS enable_thinking, t.think_start AS think_start, "
            "t.think_end AS think_end, t.answer_start AS answer_start "
            "FROM traces t JOIN models m ON m.id = t.model_id "
            "JOIN prompts p ON p.id = t.prompt_id " + clause
        )
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(sql, args).mappings().fetchall()
        out = []
        for r in rows:
            params = GenerationParams(
                max_new_tokens=r["max_new_tokens"], temperature=r["temperature"],
                top_p=r["top_p"], top_k=r["top_k"], seed=r["seed"],
                stop=tuple(json.loads(r["stop"] or "[]")),
                top_alternatives=r["top_alternatives"], raw=bool(r["raw"]),
                system=r["system"],
                enable_thinking=(None if r["enable_thinking"] is None
                                 else bool(r["enable_thinking"])),
            )
            # Liveness is decided here, at read time, without writing anything.
            status, stop_reason = self.effective_status(r["status"], r["stop_reason"],
                                                        r["host"], r["pid"])
            out.append(TraceInfo(
                id=r["id"], uid=r["uid"], status=status, stop_reason=stop_reason,
                model_name=r["model_name"], model_spec=r["model_spec"], prompt=r["prompt"],
                reference_answer=r["reference_answer"], text=r["text"] or "",
                n_tokens=r["n_tokens"] or 0, started_at=r["started_at"],
                finished_at=r["finished_at"], tokens_per_second=r["tokens_per_second"],
                parent_trace_id=r["parent_trace_id"], fork_position=r["fork_position"],
                prompt_token_ids=json.loads(r["prompt_token_ids"]), params=params,
                error=r["error"], answer=r["answer"], answer_method=r["answer_method"],
                correct=None if r["correct"] is None else bool(r["correct"]),
                reference_solution=r["reference_solution"], source_set=r["source_set"],
                source_id=r["source_id"], model_id=r["model_id"],
                origin=r["origin"] or "generate",
                forced_token_ids=(None if r["forced_token_ids"] is None
                                  else json.loads(r["forced_token_ids"])),
                model_tokenizer_hash=r["model_tokenizer_hash"], prompt_id=r["prompt_id"],
                think_start=r["think_start"], think_end=r["think_end"],
                answer_start=r["answer_start"],
            ))
        return out

    def tokens(self, trace_id: int) -> list[TokenStep]:
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT position, token_id, text, logprob, rank, entropy, sampling_entropy, top "
                "FROM tokens WHERE trace_id = ? ORDER BY position",
                (int(trace_id),),
            ).mappings().fetchall()
        return [
            TokenStep(
                position=r["position"], token_id=r["token_id"], text=r["text"],
                logprob=r["logprob"], rank=r["rank"], entropy=r["entropy"],
                sampling_entropy=r["sampling_entropy"],
                top=[Alternative(**a) for a in json.loads(r["top"])],
            )
            for r in rows
        ]

    # ------------------------------------------------------------------ families (forks)
    def children(self, trace_id: int) -> list[TraceInfo]:
        """Direct branches of a trace, by fork position then id."""
        return self._trace_infos("WHERE t.parent_trace_id = ? ORDER BY t.fork_position, t.id",
                                 (int(trace_id),))

    def ancestors(self, trace_id: int) -> list[TraceInfo]:
        """The chain from the root down to the trace itself (root first)."""
        chain = [self.trace(trace_id)]
        while chain[0].parent_trace_id is not None:
            chain.insert(0, self.trace(chain[0].parent_trace_id))
        return chain

    def root_id(self, trace_id: int) -> int:
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql(
                "WITH RECURSIVE up(id, parent) AS ("
                " SELECT id, parent_trace_id FROM traces WHERE id = ?"
                " UNION ALL SELECT t.id, t.parent_trace_id FROM traces t JOIN up"
                " ON t.id = up.parent) SELECT id FROM up WHERE parent IS NULL",
                (int(trace_id),),
            ).mappings().first()
        if row is None:
            raise StoreError(f"no trace with id {trace_id} in {self.path}")
        return int(row["id"])

    def descendant_ids(self, trace_id: int) -> list[int]:
        """Every trace below this one (not itself), breadth first. One recursive query
        over the indexed parent link."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "WITH RECURSIVE down(id, depth) AS ("
                " SELECT id, 1 FROM traces WHERE parent_trace_id = ?"
                " UNION ALL SELECT t.id, down.depth + 1 FROM traces t JOIN down"
                " ON t.parent_trace_id = down.id) SELECT id FROM down ORDER BY depth, id",
                (int(trace_id),),
            ).mappings().fetchall()
        return [int(r["id"]) for r in rows]

    def family(self, trace_id: int) -> list[TraceInfo]:
        """The whole family of the trace's root: the root first, then every descendant
        (branches, branches of branches, rollout continuations), parents before
        children."""
        root = self.root_id(trace_id)
        ids = [root, *self.descendant_ids(root)]
        infos = {t.id: t for t in self._trace_infos(
            "WHERE t.id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))}
        return [infos[i] for i in ids if i in infos]

    def full_tokens(self, trace_id: int) -> list[TokenStep]:
        """The trace's whole response: for a branch, its ancestors' tokens before the
        fork position, then its own (stored from the fork position on)."""
        chain = self.ancestors(trace_id)
        steps = self.tokens(chain[0].id)
        for node in chain[1:]:
            cut = node.fork_position or 0
            steps = [st for st in steps if st.position < cut] + self.tokens(node.id)
        return steps

    def delete_branch(self, trace_id: int) -> list[int]:
        """Delete a branch and everything below it (tokens, MI runs, scores go with
        them). A root that still has branches is refused; a root without branches is
        deleted on its own. Returns the ids deleted."""
        info = self.trace(trace_id)
        below = self.descendant_ids(trace_id)
        if info.parent_trace_id is None and below:
            raise StoreError(f"trace {trace_id} is a root with {len(below)} branch"
                             f"{'es' if len(below) != 1 else ''}; delete the branches first")
        ids = [int(trace_id), *below]
        with self.engine.connect() as conn:
            running = [r["id"] for r in conn.exec_driver_sql(
                "SELECT id, host, pid FROM traces WHERE status = 'running' AND id IN "
                "(SELECT value FROM json_each(?)) ORDER BY id", (json.dumps(ids),)).mappings()
                if not is_stale(r["host"], r["pid"])]
        if running:
            raise StoreError(f"trace {running[0]} is still running; stop it before deleting")
        with self.engine.begin() as conn:
            # Children before parents (the parent link is a foreign key).
            for tid in reversed(ids):
                for table in ("tokens", "token_scores"):
                    conn.exec_driver_sql(f"DELETE FROM {table} WHERE trace_id = ?", (tid,))
                conn.exec_driver_sql(
                    "DELETE FROM mi_values WHERE run_id IN "
                    "(SELECT id FROM mi_runs WHERE trace_id = ?)", (tid,))
                conn.exec_driver_sql("DELETE FROM mi_runs WHERE trace_id = ?", (tid,))
                conn.exec_driver_sql("DELETE FROM traces WHERE id = ?", (tid,))
        return ids

    # ------------------------------------------------------------------ answers and MI
    def set_think_span(self, trace_id: int, span: ThinkSpan | None) -> None:
        """Store a trace's thinking span (models/thinking.py); None: no thinking part."""
        values = (None, None, None) if span is None else (span.start, span.end,
                                                          span.answer_start)
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE traces SET think_start = ?, think_end = ?, answer_start = ? "
                "WHERE id = ?", (*values, int(trace_id)))

    def set_answer(self, trace_id: int, answer: str | None, method: str | None,
                   correct: bool | None) -> None:
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE traces SET answer = ?, answer_method = ?, correct = ? WHERE id = ?",
                (answer, method, correct, int(trace_id)),
            )

    def open_mi_run(self, trace_id: int, estimator: str, params: dict[str, Any],
                    model_id: int | None = None) -> tuple[int, set[int]]:
        """The run for this trace, estimator and exact parameter set (made if new), and
        the positions it already has values for: an interrupted run resumes."""
        key = canonical_json(params)
        with self.engine.begin() as conn:
            row = conn.exec_driver_sql(
                "SELECT id FROM mi_runs WHERE trace_id = ? AND estimator = ? AND params = ?",
                (int(trace_id), estimator, key),
            ).mappings().fetchone()
            if row is None:
                run_id = conn.exec_driver_sql(
                    "INSERT INTO mi_runs (trace_id, estimator, params, info, model_id, status, "
                    "created_at) VALUES (?, ?, ?, '{}', ?, 'running', ?) RETURNING id",
                    (int(trace_id), estimator, key, model_id, now_iso()),
                ).scalar_one()
                done: set[int] = set()
            else:
                run_id = row["id"]
                conn.exec_driver_sql(
                    "UPDATE mi_runs SET status = 'running', error = NULL WHERE id = ? "
                    "AND status != 'complete'", (run_id,),
                )
                done = {r["position"] for r in conn.exec_driver_sql(
                    "SELECT position FROM mi_values WHERE run_id = ?", (run_id,)).mappings()}
        return int(run_id), done

    def add_mi_values(self, run_id: int,
                      values: Iterable[tuple[int, float | None, Any]]) -> None:
        """(position, value, detail) triples; detail is stored as JSON (or NULL)."""
        rows = [
            (run_id, int(pos), None if v is None else float(v),
             None if d is None else json.dumps(d, ensure_ascii=False))
            for pos, v, d in values
        ]
        if not rows:
            return
        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT OR REPLACE INTO mi_values (run_id, position, value, detail) "
                "VALUES (?, ?, ?, ?)", rows,
            )

    def finish_mi_run(self, run_id: int, status: str, *, info: dict[str, Any] | None = None,
                      error: str | None = None) -> None:
        with self.engine.begin() as conn:
            if info is not None:
                conn.exec_driver_sql("UPDATE mi_runs SET info = ? WHERE id = ?",
                                     (json.dumps(info, ensure_ascii=False, default=str),
                                      run_id))
            conn.exec_driver_sql(
                "UPDATE mi_runs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                (status, error, now_iso(), run_id),
            )

    def mi_runs(self, trace_id: int) -> list[MIRunInfo]:
        """The trace's MI runs, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT r.id AS id, r.trace_id AS trace_id, r.estimator AS estimator, "
                "r.params AS params, r.info AS info, r.status AS status, r.error AS error, "
                "r.created_at AS created_at, r.finished_at AS finished_at, "
                "(SELECT COUNT(*) FROM mi_values v WHERE v.run_id = r.id) AS n_values "
                "FROM mi_runs r WHERE r.trace_id = ? ORDER BY r.id",
                (int(trace_id),),
            ).mappings().fetchall()
        return [
            MIRunInfo(id=r["id"], trace_id=r["trace_id"], estimator=r["estimator"],
                      params=json.loads(r["params"]), info=json.loads(r["info"] or "{}"),
                      status=r["status"], error=r["error"], created_at=r["created_at"],
                      finished_at=r["finished_at"], n_values=r["n_values"])
            for r in rows
        ]

    def mi_values(self, run_id: int) -> dict[int, float | None]:
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT position, value FROM mi_values WHERE run_id = ? ORDER BY position",
                (int(run_id),),
            ).mappings().fetchall()
        return {r["position"]: r["value"] for r in rows}

    def mi_details(self, run_id: int) -> dict[int, Any]:
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT position, detail FROM mi_values WHERE run_id = ? AND detail IS NOT NULL",
                (int(run_id),),
            ).mappings().fetchall()
        return {r["position"]: json.loads(r["detail"]) for r in rows}

    def latest_mi(self, trace_id: int) -> dict[str, dict[int, float | None]]:
        """Estimator name -> values of its most recent run on this trace with the model
        that made it (runs with another model carry a "model" parameter: rescoring)."""
        latest: dict[str, MIRunInfo] = {}
        for run in self.mi_runs(trace_id):
            if "model" not in run.params:
                latest[run.estimator] = run
        return {name: self.mi_values(run.id) for name, run in latest.items()}

    def count_traces(self, *, superseded: bool = False) -> int:
        """Number of traces, superseded ones only with `superseded`."""
        sql = "SELECT COUNT(*) FROM traces"
        if not superseded:
            sql += " WHERE status != 'superseded'"
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql(sql).scalar() or 0)

    # ------------------------------------------------------------------ superseded copies
    def supersede(self, trace_ids: Iterable[int], *, by: int) -> list[int]:
        """Mark stopped traces as made again by trace `by` (a resumed batch remade the
        same model, prompt, parameters and seed): their status becomes `superseded`
        (stop_reason, tokens, MI runs all kept, nothing deleted) and meta gets a row
        `superseded_by:<their uid>` = `<by's uid>`. Only traces stored as `stopped`
        change. Returns the ids marked."""
        ids = [int(t) for t in trace_ids if int(t) != int(by)]
        if not ids:
            return []
        marked = []
        with write_section(), self.engine.begin() as conn:
            new_uid = conn.exec_driver_sql("SELECT uid FROM traces WHERE id = ?",
                                           (int(by),)).scalar_one()
            for tid in ids:
                uid = conn.exec_driver_sql(
                    "UPDATE traces SET status = 'superseded' WHERE id = ? AND status = 'stopped' "
                    "RETURNING uid", (tid,)).scalar()
                if uid is None:
                    continue
                conn.exec_driver_sql("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                     (SUPERSEDED_KEY + uid, new_uid))
                marked.append(tid)
        return marked

    def unsupersede(self, by: int) -> list[int]:
        """Undo `supersede` for the traces trace `by` replaced (it failed, so they count
        again): back to `stopped`, their meta rows removed. Returns their ids."""
        with write_section(), self.engine.begin() as conn:
            rows = conn.exec_driver_sql(
                "SELECT t.id AS id, m.key AS key FROM meta m JOIN traces t "
                "ON m.key = ? || t.uid WHERE m.value = (SELECT uid FROM traces WHERE id = ?) "
                "AND t.status = 'superseded' ORDER BY t.id",
                (SUPERSEDED_KEY, int(by))).mappings().fetchall()
            for r in rows:
                conn.exec_driver_sql("UPDATE traces SET status = 'stopped' WHERE id = ?",
                                     (r["id"],))
                conn.exec_driver_sql("DELETE FROM meta WHERE key = ?", (r["key"],))
        return [int(r["id"]) for r in rows]

    def superseded_by(self, trace_id: int) -> int | None:
        """The id of the trace that replaced a superseded trace (None if it is not
        superseded, or the pointer did not survive, e.g. a merge)."""
        with self.engine.connect() as conn:
            found = conn.exec_driver_sql(
                "SELECT n.id FROM traces t JOIN meta m ON m.key = ? || t.uid "
                "JOIN traces n ON n.uid = m.value WHERE t.id = ?",
                (SUPERSEDED_KEY, int(trace_id))).scalar()
        return None if found is None else int(found)

    # ------------------------------------------------------------------ imported traces
    def add_import_provenance(self, trace_id: int, provenance: dict[str, Any]) -> None:
        """Where an imported trace came from: meta row `import:<its uid>` = the JSON of
        `provenance` (file, line or row, sha256 of the line or row, ...)."""
        with write_section(), self.engine.begin() as conn:
            uid = conn.exec_driver_sql("SELECT uid FROM traces WHERE id = ?",
                                       (int(trace_id),)).scalar_one()
            conn.exec_driver_sql("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 (IMPORT_KEY + uid, canonical_json(provenance)))

    def import_provenance(self, trace_id: int) -> dict[str, Any] | None:
        """An imported trace's provenance (None for any other trace)."""
        with self.engine.connect() as conn:
            value = conn.exec_driver_sql(
                "SELECT m.value FROM traces t JOIN meta m ON m.key = ? || t.uid "
                "WHERE t.id = ?", (IMPORT_KEY, int(trace_id))).scalar()
        return None if value is None else json.loads(value)

    def imported_hashes(self, model_id: int) -> dict[str, int]:
        """sha256 of an imported line or row -> id of the complete trace it became, for
        the traces of one model row (what a repeated import of the same line refuses)."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT json_extract(m.value, '$.sha256') AS sha256, t.id AS id "
                "FROM traces t JOIN meta m ON m.key = ? || t.uid WHERE t.model_id = ? "
                "AND t.status = 'complete' ORDER BY t.id", (IMPORT_KEY, int(model_id))
            ).mappings().fetchall()
        return {str(r["sha256"]): int(r["id"]) for r in rows if r["sha256"] is not None}

    # ------------------------------------------------------------------ batches and rescoring
    def find_mi_run(self, trace_id: int, estimator: str,
                    params: dict[str, Any]) -> tuple[int, str, set[int]] | None:
        """The run of this trace, estimator and exact parameter set, read only: (id,
        status, positions with a value), or None."""
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT id, status FROM mi_runs WHERE trace_id = ? AND estimator = ? AND "
                "params = ?", (int(trace_id), estimator, canonical_json(params))
            ).mappings().fetchone()
            if row is None:
                return None
            done = {r["position"] for r in conn.exec_driver_sql(
                "SELECT position FROM mi_values WHERE run_id = ?", (row["id"],)).mappings()}
        return int(row["id"]), str(row["status"]), done

    def other_reference(self, trace_id: int) -> tuple[int, str | None, str | None] | None:
        """Another prompt's reference, for the wrong-reference control of an MI estimator:
        (prompt id, reference answer, reference solution) of the next prompt after this
        trace's by id (cyclically) in the same prompt set (all prompts when it has none)
        whose reference answer differs from this one's; None if there is none."""
        with self.engine.connect() as conn:
            own = conn.exec_driver_sql(
                "SELECT p.id AS id, p.source_set AS source_set, "
                "p.reference_answer AS reference_answer FROM traces t JOIN prompts p "
                "ON p.id = t.prompt_id WHERE t.id = ?", (int(trace_id),)).mappings().fetchone()
            if own is None:
                return None
            pid, pset, answer = own["id"], own["source_set"], own["reference_answer"]
            rows = conn.exec_driver_sql(
                "SELECT id, reference_answer, reference_solution FROM prompts "
                "WHERE reference_answer IS NOT NULL AND id != ? AND "
                "(source_set IS ? OR ? IS NULL) ORDER BY id", (pid, pset, pset)
            ).mappings().fetchall()
        rows = [r for r in rows
                if (r["reference_answer"] or "").strip() != (answer or "").strip()]
        if not rows:
            return None
        after = [r for r in rows if r["id"] > pid]
        r = (after or rows)[0]
        return int(r["id"]), r["reference_answer"], r["reference_solution"]

    def model_row(self, model_id: int) -> dict[str, Any] | None:
        """A models row as a dict (None if there is no such row)."""
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT id, name, spec, kind, content_hash, revision, tokenizer_hash, dtype, "
                "device FROM models WHERE id = ?", (int(model_id),)).mappings().first()
        return None if row is None else dict(row)

    def root_traces(self, *, model_id: int | None = None,
                    source_set: str | None = None) -> list[TraceInfo]:
        """Root traces (no parent), oldest first, optionally of one model row and/or one
        prompt set (prompts.source_set)."""
        where, args = ["t.parent_trace_id IS NULL"], []
        if model_id is not None:
            where.append("t.model_id = ?")
            args.append(int(model_id))
        if source_set is not None:
            where.append("p.source_set = ?")
            args.append(source_set)
        return self._trace_infos("WHERE " + " AND ".join(where) + " ORDER BY t.id",
                                 tuple(args))

    def add_token_scores(self, trace_id: int, model_id: int,
                         steps: Iterable[TokenStep]) -> int:
        """Store a trace's tokens as scored by `model_id` (one transaction: a trace is
        either scored by that model or not). Returns the number of rows written."""
        rows = [
            (int(trace_id), int(model_id), s.position, s.logprob, s.rank, s.entropy,
             json.dumps([{"token_id": a.token_id, "text": a.text, "prob": a.prob}
                         for a in s.top], ensure_ascii=False) if s.top else None)
            for s in steps
        ]
        if rows:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(
                    "INSERT OR REPLACE INTO token_scores (trace_id, model_id, position, "
                    "logprob, rank, entropy, top) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def token_scores(self, trace_id: int, model_id: int) -> list[dict[str, Any]]:
        """The trace's tokens as `model_id` scored them, by position: dicts with
        position, logprob, rank, entropy (nats) and top (list of {token_id, text, prob},
        or None)."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT position, logprob, rank, entropy, top FROM token_scores "
                "WHERE trace_id = ? AND model_id = ? ORDER BY position",
                (int(trace_id), int(model_id))).mappings().fetchall()
        return [{"position": r["position"], "logprob": r["logprob"], "rank": r["rank"],
                 "entropy": r["entropy"],
                 "top": None if r["top"] is None else json.loads(r["top"])} for r in rows]

    def scored_models(self, trace_id: int) -> dict[int, int]:
        """Model row id -> number of scored positions, for every model that rescored
        this trace."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT model_id, COUNT(*) AS n FROM token_scores WHERE trace_id = ? "
                "GROUP BY model_id ORDER BY model_id", (int(trace_id),)).mappings().fetchall()
        return {int(r["model_id"]): int(r["n"]) for r in rows}


def canonical_json(obj: Any) -> str:
    """One spelling per parameter set, so equal parameters find the same run."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def is_stale(host: str | None, pid: int | None) -> bool:
    """Whether the writer (host, pid) recorded on a `running` trace is gone: it ran on
    this host and that process no longer exists (killed, crashed, power cut). A writer
    on another host cannot be checked from here and counts as alive. The one rule for
    both the read-time status (`Store.effective_status`) and the recovery a writable
    open does (`Store._recover_stale`); SQL can use it as `forkview_stale(host, pid)`
    on any connection of a Store's engine."""
    if host != socket.gethostname():
        return False
    return pid is None or not _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _readonly_engine(path: Path) -> Engine:
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"

    def connect() -> sqlite3.Connection:
        con = sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False)
        con.isolation_level = None
        con.execute("PRAGMA busy_timeout = 60000")
        _add_functions(con)
        return con

    return create_engine("sqlite://", creator=connect)


def _add_functions(con: sqlite3.Connection) -> None:
    """SQL functions every store connection has (reading only: nothing is written).
    forkview_stale(host, pid): 1 when that writer is gone (see `is_stale`), else 0."""
    con.create_function("forkview_stale", 2, lambda host, pid: int(is_stale(host, pid)))


def _install_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so BEGIN IMMEDIATE is ours.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 60000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()
        _add_functions(dbapi_conn)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


# forkview.cli turns Ctrl-C, SIGTERM and SIGHUP into KeyboardInterrupt. One raised in the
# middle of a write transaction can leave that connection holding SQLite's write lock,
# and the writer's own "stopped" update would then wait out the busy timeout. So the
# writes of a generation run inside `write_section()`, and an interrupt that arrives
# during one is held until it ends (a few milliseconds) and raised there.
_write_depth = 0
_interrupt_pending = False


def interrupt_or_defer() -> None:
    """For signal handlers: raise KeyboardInterrupt now, or at the end of the write
    section the main thread is in."""
    global _interrupt_pending
    if _write_depth > 0:
        _interrupt_pending = True
        return
    raise KeyboardInterrupt


@contextmanager
def write_section() -> Iterator[None]:
    global _write_depth, _interrupt_pending
    main = threading.current_thread() is threading.main_thread()
    if not main:  # signal handlers only ever run in the main thread
        yield
        return
    _write_depth += 1
    try:
        yield
    finally:
        _write_depth -= 1
    if _write_depth == 0 and _interrupt_pending:
        _interrupt_pending = False
        raise KeyboardInterrupt


def token_row(trace_id: int, step: TokenStep) -> tuple[Any, ...]:
    top = json.dumps(
        [{"token_id": a.token_id, "text": a.text, "prob": a.prob} for a in step.top],
        ensure_ascii=False,
    )
    return (trace_id, step.position, step.token_id, step.text, step.logprob, step.rank,
            step.entropy, step.sampling_entropy, top)


class TraceWriter:
    """Writes tokens as they are generated, in small batches.

    A batch is committed every `flush_every` tokens or `flush_seconds`, whichever comes
    first, together with the trace's text so far: a crash loses at most one batch.
    Use as a context manager: leaving it on KeyboardInterrupt or cancellation marks
    the trace `stopped`; on any other exception `failed` (with the error); on a normal
    exit the caller says how it ended via `finish`.
    """

    def __init__(self, store: Store, trace_id: int, *, flush_every: int = 16,
                 flush_seconds: float = 0.5):
        self.store = store
        self.trace_id = trace_id
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.pending: list[tuple[Any, ...]] = []
        self.pieces: list[str] = []
        self.n_tokens = 0
        self.t_start = time.perf_counter()
        self.t_last_flush = self.t_start
        self.finished = False

    def add(self, step: TokenStep) -> None:
        self.pending.append(token_row(self.trace_id, step))
        self.pieces.append(step.text)
        self.n_tokens += 1
        now = time.perf_counter()
        if len(self.pending) >= self.flush_every or now - self.t_last_flush >= self.flush_seconds:
            self.flush()

    def add_all(self, steps: Iterable[TokenStep]) -> None:
        for s in steps:
            self.add(s)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def flush(self) -> None:
        self.t_last_flush = time.perf_counter()
        with write_section(), self.store.engine.begin() as conn:
            if self.pending:
                conn.exec_driver_sql(
                    "INSERT OR REPLACE INTO tokens (trace_id, position, token_id, text, logprob, "
                    "rank, entropy, sampling_entropy, top) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    self.pending,
                )
            conn.exec_driver_sql(
                "UPDATE traces SET text = ?, n_tokens = ? WHERE id = ?",
                (self.text, self.n_tokens, self.trace_id),
            )
        self.pending = []

    def finish(self, status: str, stop_reason: str | None = None,
               error: str | None = None) -> None:
        if self.finished:
            return
        self.flush()
        elapsed = time.perf_counter() - self.t_start
        tps = self.n_tokens / elapsed if elapsed > 0 and self.n_tokens else None
        with write_section(), self.store.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE traces SET status = ?, stop_reason = ?, error = ?, finished_at = ?, "
                "tokens_per_second = ? WHERE id = ?",
                (status, stop_reason, error, now_iso(), tps, self.trace_id),
            )
        self.finished = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, _tb: Any) -> None:
        if self.finished:
            return
        if exc_type is None:
            self.finish("complete")
        elif issubclass(exc_type, (KeyboardInterrupt, GeneratorExit, SystemExit)) or (
            exc_type.__name__ in ("CancelledError", "WorkerCancelled")
        ):
            self.finish("stopped", "interrupted")
        else:
            self.finish("failed", error=f"{exc_type.__name__}: {exc}")


# ---------------------------------------------------------------------- export
# The export's columns, in order: one row per token, with what its trace needs to be
# analysed without joins. Every format (JSONL, CSV, Parquet) writes exactly these, then
# one `mi_<estimator>` column per MI estimator found (EXPORT_MI_PREFIX), sorted. The
# value is the kind of each column (docs/schema.md, "Export columns", lists the same).
EXPORT_COLUMNS: dict[str, str] = {
    "trace_uid": "text",
    "trace_id": "integer",
    "model_name": "text",
    "model_spec": "text",
    "prompt_id": "integer",
    "source_set": "text",
    "source_id": "text",
    "temperature": "real",
    "top_p": "real",
    "top_k": "integer",
    "max_new_tokens": "integer",
    "seed": "integer",
    "parent_trace_id": "integer",
    "fork_position": "integer",
    "origin": "text",
    "status": "text",
    "answer": "text",
    "reference_answer": "text",
    "correct": "boolean",
    "position": "integer",
    "token_id": "integer",
    "text": "text",
    "logprob": "real",
    "rank": "integer",
    "entropy": "real",
    "sampling_entropy": "real",
    "top": "list",
}
EXPORT_MI_PREFIX = "mi_"


def export_mi_column(estimator: str) -> str:
    """`answer-gain` -> `mi_answer_gain`: a name any dataframe library takes."""
    return EXPORT_MI_PREFIX + "".join(
        ch if ch.isascii() and (ch.isalnum() or ch == "_") else "_" for ch in estimator)


def _export_ids(store: Store, trace_ids: Sequence[int] | None, superseded: bool) -> list[int]:
    """The traces to export: those asked for, in that order, else all oldest first."""
    if trace_ids:
        return [int(t) for t in trace_ids]
    sql = "SELECT id FROM traces"
    if not superseded:
        sql += " WHERE status != 'superseded'"
    with store.engine.connect() as conn:
        return [r["id"] for r in conn.exec_driver_sql(sql + " ORDER BY started_at, id")
                .mappings()]


def _export_runs(run: MIRunInfo) -> bool:
    """Runs the export shows: complete, with the trace's own model (no "model"
    parameter: rescoring), and no control (a "control" parameter)."""
    return (run.status == "complete" and "model" not in run.params
            and "control" not in run.params)


def export_columns(store: Store, trace_ids: Sequence[int] | None = None, *,
                   superseded: bool = False) -> list[str]:
    """EXPORT_COLUMNS, then one `mi_<estimator>` column per estimator with an exported
    run on the traces exported (sorted): the header every format writes."""
    sql = ("SELECT DISTINCT r.estimator AS estimator FROM mi_runs r "
           "JOIN traces t ON t.id = r.trace_id "
           "WHERE r.status = 'complete' AND json_type(r.params, '$.model') IS NULL "
           "AND json_type(r.params, '$.control') IS NULL")
    args: tuple[Any, ...] = ()
    if trace_ids:
        ids = sorted({int(t) for t in trace_ids})
        sql += f" AND t.id IN ({', '.join('?' * len(ids))})"
        args = tuple(ids)
    elif not superseded:
        sql += " AND t.status != 'superseded'"
    with store.engine.connect() as conn:
        names = [r["estimator"] for r in conn.exec_driver_sql(sql, args).mappings()]
    return [*EXPORT_COLUMNS, *sorted({export_mi_column(n) for n in names})]


def iter_export_rows(store: Store, trace_ids: Sequence[int] | None, *,
                     superseded: bool = False,
                     columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """One dict per token, in trace then position order, keyed by `columns` (default:
    export_columns(...)), the export contract of docs/schema.md. Without `trace_ids`:
    every trace, superseded ones only with `superseded` (ids given are exported
    whatever their status). Streams: one trace's tokens in memory at a time. Each
    `mi_<estimator>` is the value of the latest complete run of that estimator on the
    trace (controls and other models' runs left out); None where it has none."""
    ids = _export_ids(store, trace_ids, superseded)
    cols = list(columns) if columns is not None else export_columns(
        store, trace_ids, superseded=superseded)
    for tid in ids:
        info = store.trace(tid)  # clear error for unknown ids
        latest: dict[str, MIRunInfo] = {}
        for run in store.mi_runs(tid):  # oldest first: the last one wins
            if _export_runs(run):
                latest[export_mi_column(run.estimator)] = run
        mi = {col: store.mi_values(run.id) for col, run in latest.items() if col in cols}
        p = info.params
        head = {
            "trace_uid": info.uid, "trace_id": tid, "model_name": info.model_name,
            "model_spec": info.model_spec, "prompt_id": info.prompt_id,
            "source_set": info.source_set, "source_id": info.source_id,
            "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
            "max_new_tokens": p.max_new_tokens, "seed": p.seed,
            "parent_trace_id": info.parent_trace_id, "fork_position": info.fork_position,
            "origin": info.origin, "status": info.status, "answer": info.answer,
            "reference_answer": info.reference_answer, "correct": info.correct,
        }
        for step in store.tokens(tid):
            full = {**head, **step.to_json()}
            for col, values in mi.items():
                full[col] = values.get(step.position)
            yield {c: full.get(c) for c in cols}
