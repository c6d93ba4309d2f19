"""The SQLite store: opening, versioning, writing, crash recovery, reading back.

Everything here runs against real SQLite files in a temp dir; the only subprocesses
are the ones that check what two processes (or a killed one) do to the same file.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from models.types import Alternative, GenerationParams, TokenStep
from store import Store, StoreError, TraceWriter, default_db_path
from store.db import iter_export_rows
from store.schema import SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
PARAMS = GenerationParams(max_new_tokens=32, temperature=0.7, top_k=5, top_p=0.9, seed=11,
                          stop=("\n\n",))


def make_step(i: int) -> TokenStep:
    """A token whose fields are all distinct per position (catches column mix-ups)."""
    text = ["Tom", " has", " 8", " 🍎", " é", "日本", "\n"][i % 7]
    return TokenStep(
        position=i,
        token_id=100 + i,
        text=text,
        logprob=-0.125 * (i + 1),
        rank=1 + i % 3,
        entropy=0.5 + i / 7,
        sampling_entropy=0.25 + i / 11,
        top=[Alternative(100 + i, text, 0.75), Alternative(7, "«x»", 0.125)],
    )


def new_trace(store: Store, prompt: str = "How many apples?", *, model: str = "tiny",
              params: GenerationParams = PARAMS, **kw) -> int:
    model_id = store.upsert_model(name=f"{model}-name", spec=f"{model}-spec", kind="dir",
                                  dtype="float32", device="cpu", content_hash="h")
    prompt_id = store.add_prompt(prompt, reference_answer="8", source_set="arith",
                                 source_id="1")
    return store.start_trace(model_id=model_id, prompt_id=prompt_id,
                             prompt_token_ids=[1, 2, 3], params=params, **kw)


def sql(path: Path, query: str, args: tuple = ()) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


def run_py(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


# ---------------------------------------------------------------------- opening


def test_create_sets_wal_and_schema_version(db_path: Path) -> None:
    store = Store.open(db_path)
    assert db_path.is_file()
    assert store.schema_version == SCHEMA_VERSION
    store.close()
    assert sql(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    # WAL is a property of the file, so a plain sqlite3 connection sees it too.
    assert sql(db_path, "PRAGMA journal_mode") == [("wal",)]
    tables = {r[0] for r in sql(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "models", "prompts", "traces", "tokens"} <= tables
    assert sql(db_path, "SELECT value FROM meta WHERE key='created_by'")[0][0].startswith(
        "forkview")


def test_reopen_keeps_data(db_path: Path) -> None:
    store = Store.open(db_path)
    tid = new_trace(store)
    with store.writer(tid) as w:
        w.add(make_step(0))
    store.close()
    again = Store.open(db_path, create=False)
    assert again.count_traces() == 1
    assert again.trace(tid).status == "complete"
    assert [s.token_id for s in again.tokens(tid)] == [100]


def test_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "traces.db"
    Store.open(path).close()
    assert path.is_file()


@pytest.mark.parametrize("folder", ["with space", "hash#1", "what?x", "50%25", "日本 ü"])
def test_odd_characters_in_the_path(folder: str, tmp_path: Path) -> None:
    # "?", "#" and "%" mean something in SQLite and SQLAlchemy URLs: the store must
    # still open exactly this file (and check exactly this file).
    path = tmp_path / folder / "traces.db"
    store = Store.open(path)
    tid = new_trace(store)
    store.close()
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder]  # nothing written elsewhere
    assert Store.open(path, create=False).trace(tid).prompt == "How many apples?"
    garbage = tmp_path / folder / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a forkview database"):
        Store.open(garbage)


def test_default_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "env" / "fv.db"
    monkeypatch.setenv("FORKVIEW_DB", str(target))
    assert default_db_path() == target
    store = Store.open()
    assert store.path == target
    assert target.is_file()


def test_missing_file_without_create(db_path: Path) -> None:
    with pytest.raises(StoreError, match="not found"):
        Store.open(db_path, create=False)
    assert not db_path.exists()


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="directory"):
        Store.open(tmp_path)


def test_unwritable_location_under_a_file(tmp_path: Path) -> None:
    # Tests run as root, so chmod would not stop anything: a path whose parent is a
    # regular file can never be created, whoever we are.
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError) as err:
        Store.open(blocker / "sub" / "db.sqlite")
    assert "\n" not in str(err.value)
    assert blocker.read_text() == "not a directory"


def test_unwritable_location_in_proc() -> None:
    with pytest.raises(StoreError) as err:
        Store.open("/proc/forkview-test.db")
    assert "\n" not in str(err.value)


def test_garbage_file_is_refused(db_path: Path) -> None:
    garbage = b"this is not a database, just some bytes\x00\x01\x02" * 200
    db_path.write_bytes(garbage)
    with pytest.raises(StoreError, match="not a forkview database") as err:
        Store.open(db_path)
    assert "\n" not in str(err.value)
    assert db_path.read_bytes() == garbage


def test_foreign_sqlite_file_is_refused(db_path: Path) -> None:
    con = sqlite3.connect(db_path)
    con.execute("CREATE TABLE recipes (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO recipes (name) VALUES ('soup')")
    con.commit()
    con.close()
    before = db_path.read_bytes()
    with pytest.raises(StoreError, match="not a forkview database"):
        Store.open(db_path)
    assert db_path.read_bytes() == before


def test_forkview_tables_without_version_are_refused(db_path: Path) -> None:
    Store.open(db_path).close()
    con = sqlite3.connect(db_path)
    con.execute("PRAGMA user_version = 0")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="schema version"):
        Store.open(db_path)


def test_newer_schema_is_refused_and_untouched(db_path: Path) -> None:
    store = Store.open(db_path)
    new_trace(store)
    store.close()
    con = sqlite3.connect(db_path)
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    before = db_path.read_bytes()
    with pytest.raises(StoreError, match="newer forkview") as err:
        Store.open(db_path)
    assert "\n" not in str(err.value)
    assert db_path.read_bytes() == before
    assert sql(db_path, "PRAGMA user_version") == [(99,)]


def build_v1(path: Path) -> None:
    con = sqlite3.connect(path)
    con.executescript((DATA / "schema_v1.sql").read_text())
    con.commit()
    con.close()


def test_v1_file_is_upgraded_and_keeps_data(db_path: Path) -> None:
    build_v1(db_path)
    assert sql(db_path, "PRAGMA user_version") == [(1,)]
    store = Store.open(db_path)
    assert store.schema_version == SCHEMA_VERSION == 5
    cols = {r[1] for r in sql(db_path, "PRAGMA table_info(traces)")}
    assert {"stop_reason", "tokens_per_second", "host", "pid", "answer", "answer_method",
            "correct"} <= cols
    assert "reference_solution" in {r[1] for r in sql(db_path, "PRAGMA table_info(prompts)")}
    tables = {r[0] for r in sql(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"mi_runs", "mi_values"} <= tables
    assert sql(db_path, "SELECT value FROM meta WHERE key='upgraded_from'") == [("1",)]

    old = store.trace(1)
    assert old.status == "complete" and old.stop_reason is None
    assert old.text == "He has" and old.n_tokens == 2
    assert old.prompt.startswith("Tom has 3 apples")
    assert old.reference_answer == "8"
    assert old.prompt_token_ids == [1, 2, 3]
    assert old.params == GenerationParams(max_new_tokens=64, top_alternatives=2)
    toks = store.tokens(1)
    assert [t.text for t in toks] == ["He", " has"]
    assert toks[1].top[1] == Alternative(10, " é", 0.05)

    # The new columns are usable: a trace written after the upgrade records them.
    prompt_id = store.add_prompt("a new prompt")
    tid = store.start_trace(model_id=1, prompt_id=prompt_id, prompt_token_ids=[5],
                            params=GenerationParams())
    with store.writer(tid) as w:
        w.add(make_step(0))
        w.finish("complete", "eos")
    info = store.trace(tid)
    assert info.stop_reason == "eos"
    assert info.tokens_per_second is not None and info.tokens_per_second > 0
    assert sql(db_path, "SELECT host, pid FROM traces WHERE id = ?", (tid,)) == [
        (socket.gethostname(), os.getpid())]
    store.close()
    # Opening the upgraded file again is a no-op.
    assert Store.open(db_path).schema_version == SCHEMA_VERSION


def test_racing_openers_do_not_redo_setup(db_path: Path) -> None:
    # Two processes can both read "version 1" (or "new file") before either has
    # upgraded (created) it; the loser then runs _prepare with the stale version
    # it read. That must be a no-op, not "duplicate column" or "table exists".
    build_v1(db_path)
    store = Store.open(db_path)
    store._prepare(1)
    store._prepare(0)
    assert store.schema_version == SCHEMA_VERSION
    assert store.trace(1).text == "He has"
    assert sql(db_path, "SELECT COUNT(*) FROM traces") == [(1,)]


# ---------------------------------------------------------------------- writing


def test_models_and_prompts_are_deduplicated(db_path: Path) -> None:
    store = Store.open(db_path)
    kw = dict(name="m", spec="s", kind="dir", dtype="float32", device="cpu", content_hash="x")
    assert store.upsert_model(**kw) == store.upsert_model(**kw)
    assert store.upsert_model(**kw) != store.upsert_model(**{**kw, "dtype": "bfloat16"})
    assert store.add_prompt("p", reference_answer="1") == store.add_prompt(
        "p", reference_answer="1")
    assert store.add_prompt("p", reference_answer="1") != store.add_prompt("p")


def test_trace_round_trip(db_path: Path) -> None:
    store = Store.open(db_path)
    tid = new_trace(store, "Tom has 3 apples", forced_token_ids=[4, 5])
    assert store.trace(tid).status == "running"
    steps = [make_step(i) for i in range(10)]
    with store.writer(tid, flush_every=3) as w:
        w.add_all(steps)
        w.finish("complete", "stop_string")
    info = store.trace(tid)
    assert info.status == "complete"
    assert info.stop_reason == "stop_string"
    assert info.n_tokens == 10
    assert info.text == "".join(s.text for s in steps)
    assert info.params == PARAMS
    assert info.prompt == "Tom has 3 apples"
    assert info.model_name == "tiny-name" and info.model_spec == "tiny-spec"
    assert info.prompt_token_ids == [1, 2, 3]
    assert info.finished_at is not None and info.finished_at >= info.started_at
    assert info.error is None
    # Stored steps equal the written ones field for field (floats are REAL: exact).
    assert store.tokens(tid) == steps
    assert sql(db_path, "SELECT forced_token_ids FROM traces WHERE id=?", (tid,)) == [
        ("[4, 5]",)]


def test_fork_fields(db_path: Path) -> None:
    store = Store.open(db_path)
    parent = new_trace(store)
    child = new_trace(store, parent_trace_id=parent, fork_position=4)
    info = store.trace(child)
    assert (info.parent_trace_id, info.fork_position) == (parent, 4)
    assert store.trace(parent).parent_trace_id is None


def test_writer_flushes_in_batches(db_path: Path) -> None:
    store = Store.open(db_path)
    tid = new_trace(store)
    w = TraceWriter(store, tid, flush_every=4, flush_seconds=3600)
    for i in range(6):
        w.add(make_step(i))
    # Another connection sees the first full batch while the writer is still going.
    assert sql(db_path, "SELECT COUNT(*) FROM tokens WHERE trace_id=?", (tid,)) == [(4,)]
    assert sql(db_path, "SELECT n_tokens, status FROM traces WHERE id=?", (tid,)) == [
        (4, "running")]
    w.finish("complete", "length")
    w.finish("failed", "eos")  # a second finish changes nothing
    assert store.trace(tid).status == "complete"
    assert len(store.tokens(tid)) == 6


def test_writer_normal_exit_is_complete(db_path: Path) -> None:
    store = Store.open(db_path)
    tid = new_trace(store)
    with store.writer(tid) as w:
        w.add(make_step(0))
    assert store.trace(tid).status == "complete"


def test_keyboard_interrupt_keeps_tokens(db_path: Path) -> None:
    store = Store.open(db_path)
    tid = new_trace(store)
    with pytest.raises(KeyboardInterrupt), store.writer(tid, flush_every=100) as w:
        for i in range(5):
            w.add(make_step(i))
        raise KeyboardInterrupt
    info = store.trace(tid)
    assert (info.status, info.stop_reason) == ("stopped", "interrupted")
    assert info.n_tokens == 5
    assert [s.position for s in store.tokens(tid)] == [0, 1, 2, 3, 4]


def test_error_marks_failed_and_keeps_tokens(db_path: Path) -> None:
    store = Store.open(db_path)
    tid = new_trace(store)
    with pytest.raises(ValueError), store.writer(tid, flush_every=100) as w:
        w.add(make_step(0))
        w.add(make_step(1))
        raise ValueError("boom")
    info = store.trace(tid)
    assert info.status == "failed"
    assert info.error == "ValueError: boom"
    assert len(store.tokens(tid)) == 2


def test_unknown_trace_id(db_path: Path) -> None:
    store = Store.open(db_path)
    with pytest.raises(StoreError, match="no trace with id 42"):
        store.trace(42)
    assert store.tokens(42) == []
    with pytest.raises(StoreError):
        list(iter_export_rows(store, [42]))


# ---------------------------------------------------------------------- reading


def test_list_traces_filters_and_order(db_path: Path) -> None:
    store = Store.open(db_path)
    a = new_trace(store, "apples and pears", model="alpha")
    b = new_trace(store, "the capital of France", model="beta")
    c = new_trace(store, "more apples", model="beta")
    with store.writer(b) as w:
        w.add(TokenStep(0, 1, " Paris is lovely", -0.1, 1, 0.2, 0.0))
    assert [t.id for t in store.list_traces()] == [c, b, a]  # newest first
    assert [t.id for t in store.list_traces(limit=2)] == [c, b]
    assert [t.id for t in store.list_traces(search="APPLES")] == [c, a]
    assert [t.id for t in store.list_traces(search="paris")] == [b]  # output text
    assert [t.id for t in store.list_traces(model="beta")] == [c, b]
    assert [t.id for t in store.list_traces(model="alpha-spec")] == [a]
    assert [t.id for t in store.list_traces(search="apples", model="beta")] == [c]
    assert store.list_traces(search="no such text") == []
    assert store.count_traces() == 3


def test_export_rows(db_path: Path) -> None:
    store = Store.open(db_path)
    t1, t2 = new_trace(store), new_trace(store)
    with store.writer(t1) as w:
        w.add_all([make_step(0), make_step(1)])
    with store.writer(t2) as w:
        w.add(make_step(0))
    rows = list(iter_export_rows(store, None))
    # All traces oldest first, tokens in position order, one JSON-ready dict each.
    assert [(r["trace_id"], r["position"]) for r in rows] == [(t1, 0), (t1, 1), (t2, 0)]
    from store.db import EXPORT_COLUMNS

    assert list(rows[1])[:len(EXPORT_COLUMNS)] == list(EXPORT_COLUMNS)
    assert {k: rows[1][k] for k in make_step(1).to_json()} == make_step(1).to_json()
    assert rows[1]["answer"] is None and rows[1]["correct"] is None
    assert "hidden" not in rows[0]
    run, _ = store.open_mi_run(t1, "hsic", {"sigma": 50.0})
    store.add_mi_values(run, [(1, 0.75, None)])
    store.finish_mi_run(run, "complete")
    store.set_answer(t1, "8", "last_number", True)
    rows = list(iter_export_rows(store, [t1]))
    assert [r["mi_hsic"] for r in rows] == [None, 0.75]
    assert {(r["answer"], r["correct"]) for r in rows} == {("8", True)}
    json.dumps(rows, ensure_ascii=False)
    assert [r["trace_id"] for r in iter_export_rows(store, [t2])] == [t2]


def test_superseded_traces_are_kept_but_not_listed(db_path: Path) -> None:
    """A stopped copy made again is marked superseded (tokens and stop_reason kept,
    meta points at its replacement); listings, counts and exports leave it out unless
    asked; a remake that failed gives it back."""
    store = Store.open(db_path)
    old = new_trace(store)
    with store.writer(old) as w:
        w.add_all([make_step(0), make_step(1)])
        w.finish("stopped", "interrupted")
    done = new_trace(store)  # a complete trace is never superseded
    with store.writer(done) as w:
        w.add(make_step(0))
    new = new_trace(store)
    with store.writer(new) as w:
        w.add_all([make_step(0), make_step(1), make_step(2)])
    assert store.supersede([old, done, new], by=new) == [old]
    info = store.trace(old)
    assert (info.status, info.stop_reason, info.n_tokens) == ("superseded", "interrupted", 2)
    assert len(store.tokens(old)) == 2
    assert store.trace(done).status == "complete"
    assert store.superseded_by(old) == new and store.superseded_by(done) is None
    assert sql(db_path, "SELECT key, value FROM meta WHERE key LIKE 'superseded_by:%'") == [
        (f"superseded_by:{info.uid}", store.trace(new).uid)]
    assert [t.id for t in store.list_traces()] == [new, done]
    assert [t.id for t in store.list_traces(superseded=True)] == [new, done, old]
    assert (store.count_traces(), store.count_traces(superseded=True)) == (2, 3)
    assert {r["trace_id"] for r in iter_export_rows(store, None)} == {done, new}
    assert {r["trace_id"] for r in iter_export_rows(store, None, superseded=True)} == {
        old, done, new}
    assert {r["trace_id"] for r in iter_export_rows(store, [old])} == {old}  # asked by id
    ro = Store.open(db_path, readonly=True)
    assert ro.trace(old).status == "superseded" and ro.superseded_by(old) == new
    assert store.supersede([old], by=new) == []  # only stopped traces change
    assert store.unsupersede(new) == [old]
    assert store.trace(old).status == "stopped" and store.superseded_by(old) is None
    assert sql(db_path, "SELECT COUNT(*) FROM meta WHERE key LIKE 'superseded_by:%'") == [(0,)]


# ---------------------------------------------------------------- processes

# The subprocesses reuse the helpers above by source, not by importing this module
# (which would import pytest: seconds per process on a busy CI box).
HELPERS = (
    "from __future__ import annotations\n"
    "import sys\n"
    "from models.types import Alternative, GenerationParams, TokenStep\n"
    "from store import Store\n"
    f"PARAMS = {PARAMS!r}\n"
    + inspect.getsource(make_step)
    + inspect.getsource(new_trace)
)

WRITER = HELPERS + """
store = Store.open(sys.argv[1])
tid = new_trace(store, "writer " + sys.argv[2])
print(tid, flush=True)
sys.stdin.readline()  # wait until both writers are ready, then write at once
with store.writer(tid, flush_every=2, flush_seconds=3600) as w:
    for i in range(int(sys.argv[3])):
        w.add(make_step(i))
    w.finish("complete", "length")
"""


def test_two_processes_write_the_same_file(db_path: Path) -> None:
    Store.open(db_path).close()
    n = 200
    procs = [run_py(WRITER, str(db_path), name, str(n)) for name in ("a", "b")]
    ids = []
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip(), p.communicate()[1]
        ids.append(int(line))
    results = [p.communicate("go\n", timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    store = Store.open(db_path)
    assert sorted(ids) == sorted(t.id for t in store.list_traces())
    for tid in ids:
        info = store.trace(tid)
        assert (info.status, info.n_tokens) == ("complete", n)
        assert [s.position for s in store.tokens(tid)] == list(range(n))


KILLED = HELPERS + """
import time
store = Store.open(sys.argv[1])
tid = new_trace(store, "about to be killed")
w = store.writer(tid, flush_every=5, flush_seconds=3600)
for i in range(12):  # two full batches reach the file, two tokens stay pending
    w.add(make_step(i))
print(tid, flush=True)
time.sleep(120)
"""


def test_killed_process_leaves_a_stopped_trace(db_path: Path) -> None:
    Store.open(db_path).close()
    proc = run_py(KILLED, str(db_path))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip(), proc.communicate()[1]
    tid = int(line)
    assert sql(db_path, "SELECT status FROM traces WHERE id=?", (tid,)) == [("running",)]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)  # reaped: its pid no longer exists
    assert proc.returncode == -signal.SIGKILL

    # A trace of a live process (this one) must not be touched by the recovery.
    store = Store.open(db_path)
    mine = new_trace(store, "still running here")
    store.close()

    store = Store.open(db_path)
    info = store.trace(tid)
    assert (info.status, info.stop_reason) == ("stopped", "crashed")
    assert info.finished_at is not None
    assert info.n_tokens == 10
    assert store.tokens(tid) == [make_step(i) for i in range(10)]
    assert store.trace(mine).status == "running"


# ------------------------------------------------------------------ read-only opening
def test_readonly_open_changes_no_byte(tmp_path):
    """Browsing, listing and exporting must not modify a file (e.g. the committed
    sample database, kept in rollback-journal mode)."""
    import hashlib
    import sqlite3

    db = tmp_path / "sample.db"
    s = Store.open(db)
    m = s.upsert_model(name="m", spec="m", kind="object", dtype="float32", device="cpu")
    p = s.add_prompt("p")
    s.start_trace(model_id=m, prompt_id=p, prompt_token_ids=[1], params=GenerationParams())
    s.close()
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode = DELETE")
    con.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    ro = Store.open(db, readonly=True)
    (info,) = ro.list_traces()
    assert info.status == "running"  # read-only: no crash recovery either
    assert ro.tokens(info.id) == []
    ro.close()
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.db"]


def test_readonly_reads_a_wal_file_while_it_is_written(tmp_path):
    db = tmp_path / "live.db"
    w = Store.open(db)
    m = w.upsert_model(name="m", spec="m", kind="object", dtype="float32", device="cpu")
    tid = w.start_trace(model_id=m, prompt_id=w.add_prompt("p"), prompt_token_ids=[1],
                        params=GenerationParams())
    ro = Store.open(db, readonly=True)
    assert ro.trace(tid).status == "running"
    with w.writer(tid) as writer:
        writer.add(TokenStep(0, 5, "x", -0.1, 1, 0.5, 0.0, []))
    assert ro.trace(tid).status == "complete"
    assert len(ro.tokens(tid)) == 1


def test_readonly_missing_file_is_an_error(tmp_path):
    with pytest.raises(StoreError, match="database not found"):
        Store.open(tmp_path / "nope.db", readonly=True)
    assert not (tmp_path / "nope.db").exists()


def test_readonly_refuses_an_empty_file_untouched(tmp_path):
    """A 0-byte file (or SQLite with no tables) is not a database to read: refused, and
    never given a schema by a read-only open."""
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(StoreError) as exc:
        Store.open(empty, readonly=True)
    assert str(exc.value) == f"{empty} is empty (0 bytes), not a forkview database"
    assert empty.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]

    blank = tmp_path / "blank.db"
    con = sqlite3.connect(blank)
    con.execute("CREATE TABLE x (a)")
    con.execute("DROP TABLE x")
    con.close()
    before = blank.read_bytes()
    with pytest.raises(StoreError, match="is a SQLite file with no tables, not a forkview"):
        Store.open(blank, readonly=True)
    assert blank.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.db", "empty.db"]


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_writer_rules() -> None:
    here = socket.gethostname()
    assert Store.is_stale(here, dead_pid())
    assert Store.is_stale(here, None)  # a running trace without a pid cannot be live
    assert not Store.is_stale(here, os.getpid())
    assert not Store.is_stale("another-host", dead_pid())  # cannot be checked from here
    assert not Store.is_stale(None, dead_pid())
    assert Store.effective_status("running", None, here, dead_pid()) == ("stopped", "crashed")
    assert Store.effective_status("running", None, here, os.getpid()) == ("running", None)
    for status, reason in (("complete", "eos"), ("stopped", "interrupted"), ("failed", None)):
        assert Store.effective_status(status, reason, here, dead_pid()) == (status, reason)


def test_readonly_views_see_a_killed_writer_as_crashed(db_path: Path) -> None:
    """Liveness is decided at read time: after kill -9 a read-only store shows the
    trace as stopped (crashed) and changes no byte; a live writer's trace and one from
    another host (which cannot be checked) still read as running."""
    import hashlib

    from tests.conftest import db_content

    store = Store.open(db_path)
    mine = new_trace(store, "still running here")
    elsewhere = new_trace(store, "running on another host")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE traces SET host = 'another-host', pid = ? WHERE id = ?",
                             (dead_pid(), elsewhere))
    store.close()
    proc = run_py(KILLED, str(db_path))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip(), proc.communicate()[1]
    tid = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)  # reaped: its pid no longer exists

    def files() -> dict[str, str]:  # the database and its WAL (-shm is SQLite's index)
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in db_path.parent.iterdir() if not p.name.endswith("-shm")}

    before, content = files(), db_content(db_path)
    assert f"{db_path.name}-wal" in before  # the killed writer never checkpointed
    ro = Store.open(db_path, readonly=True)
    status = {t.id: (t.status, t.stop_reason) for t in ro.list_traces()}
    assert status == {tid: ("stopped", "crashed"), mine: ("running", None),
                      elsewhere: ("running", None)}
    assert (ro.trace(tid).status, ro.trace(tid).stop_reason) == ("stopped", "crashed")
    assert ro.trace(tid).n_tokens == 10  # the tokens that reached the file
    assert ro.stale_trace_ids() == [tid]
    with ro.engine.connect() as conn:  # the same rule in SQL, for the report
        rows = conn.exec_driver_sql(
            "SELECT id FROM traces WHERE status = 'running' AND forkview_stale(host, pid)"
        ).fetchall()
    assert rows == [(tid,)]
    ro.close()
    assert files() == before and db_content(db_path) == content
    assert [ln for ln in content if "about to be killed" in ln]
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as con:
        stored = con.execute("SELECT status FROM traces WHERE id = ?", (tid,)).fetchone()
    assert stored == ("running",)  # nothing was written: the writable open records it


@contextmanager
def unwritable_dir(path: Path) -> Iterator[None]:
    """`path` made really unwritable: chmod 0o555 for a normal user; as root (CI),
    whom chmod does not stop, the immutable attribute (chattr +i). Skips only where
    neither works (e.g. a filesystem without chattr); the detection is also tested
    without it (test_cannot_open_reason_names_the_cause)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        undo = [lambda: path.chmod(0o755)]
    else:
        if shutil.which("chattr") is None or subprocess.run(
                ["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a directory unwritable for root here (chattr +i)")
        undo = [lambda: subprocess.run(["chattr", "-i", str(path)], check=True)]
    try:
        if os.access(path, os.W_OK) or _can_create_in(path):
            pytest.skip(f"{path} is still writable")
        yield
    finally:
        undo[0]()


def _can_create_in(path: Path) -> bool:
    try:
        (path / "probe").touch()
    except OSError:
        return False
    (path / "probe").unlink()
    return True


def make_wal_db(folder: Path) -> Path:
    """A forkview file in WAL mode, closed cleanly (no -wal or -shm beside it)."""
    folder.mkdir()
    db = folder / "t.db"
    store = Store.open(db)
    new_trace(store)
    store.close()
    assert sorted(p.name for p in folder.iterdir()) == ["t.db"]
    assert sql(db, "PRAGMA journal_mode") == [("wal",)]
    return db


def test_readonly_wal_file_in_unwritable_directory_names_the_cause(tmp_path):
    db = make_wal_db(tmp_path / "locked")
    before = db.read_bytes()
    with unwritable_dir(db.parent), pytest.raises(StoreError) as exc:
        Store.open(db, readonly=True)
    message = str(exc.value)
    assert message == (
        f"cannot read {db}: it is in WAL mode and its directory is not writable (SQLite "
        f"needs to create t.db-shm); copy it elsewhere, or run `sqlite3 {db} 'PRAGMA "
        f"journal_mode=DELETE'` where you can write")
    assert "\n" not in message
    assert db.read_bytes() == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["t.db"]


def test_cannot_open_reason_names_the_cause(tmp_path, monkeypatch):
    """The detection on its own, with the permission answers simulated: a WAL file
    without -shm in an unwritable directory; an unreadable file; and the cases that
    are not it (rollback journal, -shm already there, writable directory)."""
    from store.db import cannot_open_reason

    db = make_wal_db(tmp_path / "wal")
    denied: set[tuple[Path, int]] = set()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: (Path(p), mode) not in denied
                        and real_access(p, mode))
    assert cannot_open_reason(db) is None  # directory writable
    denied.add((db.parent, os.W_OK))
    assert "it is in WAL mode and its directory is not writable" in cannot_open_reason(db)
    (db.parent / "t.db-shm").touch()
    assert cannot_open_reason(db) is None  # SQLite can use the existing -shm
    (db.parent / "t.db-shm").unlink()
    denied.add((db, os.R_OK))
    assert cannot_open_reason(db) == f"cannot read {db}: permission denied"

    rollback = tmp_path / "rollback"
    rollback.mkdir()
    plain = rollback / "p.db"
    sqlite3.connect(plain).execute("CREATE TABLE x (a)").connection.close()
    denied.add((rollback, os.W_OK))
    assert cannot_open_reason(plain) is None


# ------------------------------------------------------------------ MI runs and answers
def _one_trace(store: Store) -> int:
    m = store.upsert_model(name="m", spec="m", kind="object", dtype="float32", device="cpu")
    return store.start_trace(model_id=m, prompt_id=store.add_prompt("p"),
                             prompt_token_ids=[1], params=GenerationParams())


def test_mi_runs_keep_each_parameter_set_and_resume(db_path: Path) -> None:
    store = Store.open(db_path)
    tid = _one_trace(store)
    run, done = store.open_mi_run(tid, "hsic", {"sigma": 50.0, "layer": -1})
    assert done == set()
    store.add_mi_values(run, [(0, 0.5, None), (1, None, {"why": "skipped"})])
    # Same parameters in another key order: the same run, resuming after 0 and 1.
    again, done = store.open_mi_run(tid, "hsic", {"layer": -1, "sigma": 50.0})
    assert again == run and done == {0, 1}
    other, done = store.open_mi_run(tid, "hsic", {"sigma": "median", "layer": -1})
    assert other != run and done == set()
    store.add_mi_values(other, [(0, 0.25, None)])
    store.finish_mi_run(run, "complete", info={"self_reference": True})
    runs = store.mi_runs(tid)
    assert [(r.estimator, r.params["sigma"], r.status, r.n_values) for r in runs] == [
        ("hsic", 50.0, "complete", 2), ("hsic", "median", "running", 1)]
    assert runs[0].info == {"self_reference": True}
    assert store.mi_values(run) == {0: 0.5, 1: None}
    assert store.mi_details(run) == {1: {"why": "skipped"}}
    assert store.latest_mi(tid) == {"hsic": {0: 0.25}}


def test_answers_are_stored_per_trace(db_path: Path) -> None:
    store = Store.open(db_path)
    tid = _one_trace(store)
    store.set_answer(tid, "15", "final_answer", True)
    info = store.trace(tid)
    assert (info.answer, info.answer_method, info.correct) == ("15", "final_answer", True)
    pid = store.add_prompt("q", reference_answer="3", reference_solution="1 + 2 = 3")
    assert store.add_prompt("q", reference_answer="3") == pid
