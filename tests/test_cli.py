"""The headless command contract and its bad-input behaviour.

Most cases call `main()` in-process (torch is already imported by the session); the
ones about process behaviour (exit codes, no traceback, signals, import cost) run the
real command in a subprocess.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forkview.cli import main
from models.types import GenerationParams
from store import Store

ROOT = Path(__file__).resolve().parents[1]
TOKEN_FIELDS = {"position", "token_id", "text", "logprob", "rank", "entropy",
                "sampling_entropy", "top"}


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "forkview", *args], capture_output=True, text=True,
        timeout=timeout, cwd=ROOT, env=env, **kw,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str, code: int = 1):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert any(needle in ln for ln in lines), proc.stderr
    if code == 1:
        assert len(lines) == 1, proc.stderr


def annotate_json(capsys, *args: str) -> dict:
    assert main(["annotate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------ the contract
def test_annotate_json_contract(tiny_model_dir, db_path, capsys):
    out = annotate_json(capsys, "--prompt", "Tom has 3 apples.", "--answer", "3",
                        "--model", str(tiny_model_dir), "--db", str(db_path),
                        "--max-new-tokens", "12", "--temperature", "1", "--seed", "7")
    assert {"trace_id", "model", "prompt", "prompt_token_ids", "params", "status", "text",
            "tokens"} <= out.keys()
    assert out["prompt"] == "Tom has 3 apples."
    assert out["status"] == "complete"
    assert out["params"]["seed"] == 7 and out["params"]["temperature"] == 1.0
    assert 1 <= len(out["tokens"]) <= 12
    for i, tok in enumerate(out["tokens"]):
        assert set(tok) == TOKEN_FIELDS
        assert tok["position"] == i
        assert len(tok["top"]) == 10
        assert set(tok["top"][0]) == {"token_id", "text", "prob"}
    assert out["text"] == "".join(t["text"] for t in out["tokens"])
    # prompt_token_ids are exactly what the model was fed: the chat template included.
    from models.loading import load_model

    lm = load_model(str(tiny_model_dir))
    expected = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tom has 3 apples."}], add_generation_prompt=True,
        tokenize=True, return_dict=False,
    )
    assert out["prompt_token_ids"] == list(expected)
    stored = Store.open(db_path).trace(out["trace_id"])
    assert stored.reference_answer == "3"
    assert stored.prompt_token_ids == out["prompt_token_ids"]


def test_same_seed_same_trace_through_cli(tiny_model_dir, db_path, capsys):
    args = ["--prompt", "Count to five", "--model", str(tiny_model_dir), "--db",
            str(db_path), "--max-new-tokens", "20", "--temperature", "1", "--seed", "3"]
    a = annotate_json(capsys, *args)
    b = annotate_json(capsys, *args)
    assert [t["token_id"] for t in a["tokens"]] == [t["token_id"] for t in b["tokens"]]
    assert a["trace_id"] != b["trace_id"]


def test_raw_skips_chat_template(tiny_model_dir, db_path, capsys):
    out = annotate_json(capsys, "--prompt", "hello", "--raw", "--model", str(tiny_model_dir),
                        "--db", str(db_path), "--max-new-tokens", "3")
    from models.loading import load_model

    tok = load_model(str(tiny_model_dir)).tokenizer
    assert out["prompt_token_ids"] == tok("hello")["input_ids"]
    assert out["params"]["raw"] is True


def test_export_jsonl_and_csv(tiny_model_dir, db_path, capsys, tmp_path):
    a = annotate_json(capsys, "--prompt", "one", "--model", str(tiny_model_dir), "--db",
                      str(db_path), "--max-new-tokens", "5")
    b = annotate_json(capsys, "--prompt", "two", "--model", str(tiny_model_dir), "--db",
                      str(db_path), "--max-new-tokens", "4")
    assert main(["export", "--db", str(db_path), "--format", "jsonl",
                 "--trace", str(b["trace_id"])]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["trace_id"] for r in rows] == [b["trace_id"]] * len(b["tokens"])
    for row, tok in zip(rows, b["tokens"], strict=True):
        assert {k: row[k] for k in tok} == tok  # the token's fields, as annotate wrote them
        assert (row["trace_id"], row["answer"], row["correct"]) == (
            b["trace_id"], b["answer"], b["correct"])

    out_file = tmp_path / "all.csv"
    assert main(["export", "--db", str(db_path), "--format", "csv", "-o", str(out_file)]) == 0
    got = list(csv.DictReader(io.StringIO(out_file.read_text(encoding="utf-8"))))
    assert len(got) == len(a["tokens"]) + len(b["tokens"])
    first = got[0]
    assert int(first["trace_id"]) == a["trace_id"]
    assert json.loads(first["top"]) == a["tokens"][0]["top"]
    assert float(first["entropy"]) == pytest.approx(a["tokens"][0]["entropy"])


def test_traces_json_lists_newest_first(tiny_model_dir, db_path, capsys):
    ids = [annotate_json(capsys, "--prompt", p, "--model", str(tiny_model_dir), "--db",
                         str(db_path), "--max-new-tokens", "2")["trace_id"]
           for p in ("alpha", "beta")]
    assert main(["traces", "--db", str(db_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["trace_id"] for t in listed] == ids[::-1]
    assert main(["traces", "--db", str(db_path), "--json", "--search", "alpha"]) == 0
    assert [t["prompt"] for t in json.loads(capsys.readouterr().out)] == ["alpha"]
    assert main(["traces", "--db", str(db_path)]) == 0
    assert "alpha" in capsys.readouterr().out


# ------------------------------------------------------------------ bad input
def test_model_path_missing(db_path, capsys):
    assert main(["annotate", "--prompt", "x", "--model", "/no/such/model",
                 "--db", str(db_path)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "forkview: error: model path does not exist: /no/such/model"


def test_directory_that_is_not_a_model(tmp_path, db_path, capsys):
    (tmp_path / "notes").mkdir()
    assert main(["annotate", "--prompt", "x", "--model", str(tmp_path / "notes"),
                 "--db", str(db_path)]) == 1
    assert "is not a model directory" in capsys.readouterr().err


def test_gguf_transformers_cannot_load(tmp_path, db_path, capsys, monkeypatch):
    monkeypatch.setenv("FORKVIEW_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    assert main(["annotate", "--prompt", "x", "--model", str(bad), "--db", str(db_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("forkview: error: transformers cannot load broken.gguf")
    assert "\n" not in err


def test_empty_prompt_is_usage_error(db_path):
    proc = run_cli("annotate", "--prompt", "   ", "--db", str(db_path), timeout=60)
    assert_one_line_error(proc, "the prompt is empty", code=2)
    assert not db_path.exists()  # nothing was created for a bad command


def test_prompt_longer_than_context(tiny_model_dir, db_path, capsys):
    long_prompt = "apples and pears " * 400
    assert main(["annotate", "--prompt", long_prompt, "--model", str(tiny_model_dir),
                 "--db", str(db_path)]) == 1
    err = capsys.readouterr().err
    assert "but the model's context is 512 tokens" in err
    assert Store.open(db_path).count_traces() == 0


@pytest.mark.parametrize("value, flag", [("-1", "--temperature"), ("0", "--top-p"),
                                         ("1.5", "--top-p"), ("0", "--max-new-tokens"),
                                         ("x", "--seed"), ("-2", "--top-k")])
def test_bad_generation_values(value, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["annotate", "--prompt", "x", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_missing_database(tmp_path):
    proc = run_cli("traces", "--db", str(tmp_path / "nope.db"), timeout=60)
    assert_one_line_error(proc, "database not found")


def test_garbled_database(tmp_path):
    bad = tmp_path / "garbled.db"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    before = bad.read_bytes()
    proc = run_cli("export", "--db", str(bad), timeout=60)
    assert_one_line_error(proc, "is not a forkview database")
    assert bad.read_bytes() == before


def test_database_from_newer_schema(tmp_path, capsys):
    newer = tmp_path / "newer.db"
    Store.open(newer).close()
    con = sqlite3.connect(newer)
    con.execute("PRAGMA user_version = 99")
    con.close()
    before = newer.read_bytes()
    assert main(["traces", "--db", str(newer)]) == 1
    assert "written by a newer forkview (schema 99" in capsys.readouterr().err
    assert newer.read_bytes() == before


def test_unwritable_database_directory(tmp_path, capsys):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    # A directory cannot be made under a regular file, even as root.
    assert main(["annotate", "--prompt", "x", "--db", str(blocker / "sub" / "t.db")]) == 1
    assert "cannot create the database directory" in capsys.readouterr().err


def test_unknown_trace_id(tiny_model_dir, db_path, capsys):
    annotate_json(capsys, "--prompt", "x", "--model", str(tiny_model_dir), "--db",
                  str(db_path), "--max-new-tokens", "2")
    assert main(["export", "--db", str(db_path), "--trace", "999"]) == 1
    captured = capsys.readouterr()
    assert "no trace with id 999" in captured.err
    assert captured.out == ""  # nothing half-written


@pytest.mark.parametrize("command", ["traces", "report", "export"])
def test_read_only_command_refuses_an_empty_file_untouched(tmp_path, command):
    empty = tmp_path / "empty.db"
    empty.touch()
    proc = run_cli(command, "--db", str(empty), timeout=60)
    assert_one_line_error(proc, f"{empty} is empty (0 bytes), not a forkview database")
    assert empty.stat().st_size == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]


@pytest.mark.parametrize("command", ["traces", "report"])
def test_read_only_command_does_not_create_a_missing_file(tmp_path, command):
    proc = run_cli(command, "--db", str(tmp_path / "nope.db"), timeout=60)
    assert_one_line_error(proc, "database not found")
    assert list(tmp_path.iterdir()) == []


def test_traces_shows_a_dead_writer_as_crashed(tmp_path):
    """A trace left `running` by a process of this host that is gone reads as stopped
    (crashed) in `traces`, decided at read time: the file keeps every byte."""
    import hashlib

    from tests.test_store import dead_pid

    db = tmp_path / "t.db"
    store = Store.open(db)
    m = store.upsert_model(name="m", spec="m", kind="object", dtype="float32", device="cpu")
    ids = [store.start_trace(model_id=m, prompt_id=store.add_prompt(p), prompt_token_ids=[1],
                             params=GenerationParams()) for p in ("dead writer", "live writer")]
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE traces SET pid = ? WHERE id = ?", (dead_pid(), ids[0]))
    store.close()
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode = DELETE")  # one file: its bytes say it all
    con.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()

    proc = run_cli("traces", "--db", str(db), "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = {t["trace_id"]: (t["status"], t["stop_reason"]) for t in json.loads(proc.stdout)}
    # ids[1] carries this test's pid, alive while the command runs
    assert listed == {ids[0]: ("stopped", "crashed"), ids[1]: ("running", None)}
    proc = run_cli("traces", "--db", str(db), timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[0]: ln.split()[1] for ln in proc.stdout.splitlines()[1:]}
    assert rows == {str(ids[0]): "stopped", str(ids[1]): "running"}
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.db"]


def test_wal_database_in_unwritable_directory_names_the_cause(tmp_path):
    from tests.test_store import make_wal_db, unwritable_dir

    db = make_wal_db(tmp_path / "locked")
    before = db.read_bytes()
    with unwritable_dir(db.parent):
        proc = run_cli("traces", "--db", str(db), timeout=60)
    assert_one_line_error(proc, f"cannot read {db}: it is in WAL mode and its directory is "
                                f"not writable (SQLite needs to create t.db-shm)")
    assert db.read_bytes() == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["t.db"]


# ------------------------------------------------------------------ process level
def test_help_is_fast_and_never_imports_torch():
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from forkview.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('ELAPSED', time.perf_counter() - t)\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'textual') "
        "if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert "usage: forkview" in proc.stdout
    assert "HEAVY []" in proc.stdout
    elapsed = float(proc.stdout.split("ELAPSED")[1].split()[0])
    assert elapsed < 1.0


def test_python_dash_m_matches_command():
    proc = run_cli("--version", timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("forkview ")


def _count_tokens(db: Path) -> int:
    if not db.exists():
        return 0
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute("SELECT COUNT(*) FROM tokens").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def test_signals_keep_tokens_marked_stopped(long_context_model_dir, tmp_path):
    """Ctrl-C (SIGINT) and SIGTERM/SIGHUP mid-generation: the trace keeps its tokens and
    is marked stopped. Both processes run side by side to halve the start-up cost."""
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        db = tmp_path / f"{sig.name}.db"
        runs[sig] = (db, subprocess.Popen(
            [sys.executable, "-m", "forkview", "annotate", "--prompt", "go on forever",
             "--model", str(long_context_model_dir), "--db", str(db),
             "--max-new-tokens", "900000"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        ))
    try:
        deadline = time.monotonic() + 120
        pending = dict(runs)
        seen = {}
        while pending and time.monotonic() < deadline:
            time.sleep(0.3)
            for sig, (db, proc) in list(pending.items()):
                seen[sig] = _count_tokens(db)
                if seen[sig] >= 40:
                    proc.send_signal(sig)
                    del pending[sig]
        assert not pending, f"generation did not start: {seen}"
        results = {sig: proc.communicate(timeout=60) for sig, (_db, proc) in runs.items()}
    finally:
        for _db, proc in runs.values():
            if proc.poll() is None:
                proc.kill()
    for sig, (db, proc) in runs.items():
        out, err = results[sig]
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert "kept with" in err and "(stopped)" in err
        store = Store.open(db)
        (info,) = store.list_traces()
        assert info.status == "stopped" and info.stop_reason == "interrupted"
        tokens = store.tokens(info.id)
        assert len(tokens) == info.n_tokens >= seen[sig]
        assert [t.position for t in tokens] == list(range(len(tokens)))
        assert out.strip() == str(info.id)


def test_sample_db_opens_read_only_and_unchanged():
    import hashlib

    sample = ROOT / "sample_db" / "arith.db"
    before = hashlib.sha256(sample.read_bytes()).hexdigest()
    proc = run_cli("traces", "--db", str(sample), "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    traces = json.loads(proc.stdout)
    assert len(traces) >= 40
    assert {t["status"] for t in traces} == {"complete"}
    assert all(t["reference_answer"] for t in traces)
    greedy = [t for t in traces if t["params"]["temperature"] == 0]
    sampled = [t for t in traces if t["params"]["temperature"] > 0]
    assert len(greedy) >= 20 and len(sampled) >= 20
    assert hashlib.sha256(sample.read_bytes()).hexdigest() == before
    assert not (ROOT / "sample_db" / "arith.db-wal").exists()


def test_sample_db_carries_mi():
    store = Store.open(ROOT / "sample_db" / "arith.db", readonly=True)
    roots = store.list_traces(roots_only=True)
    with_rollout = 0
    for info in roots:
        runs = {r.estimator: r for r in store.mi_runs(info.id)}
        assert {"hsic", "answer-gain"} <= set(runs), info.id
        for name in ("hsic", "answer-gain"):
            assert runs[name].status == "complete"
            assert runs[name].n_values == info.n_tokens
        if "rollout" in runs:
            assert runs["rollout"].status == "complete" and runs["rollout"].n_values > 0
            with_rollout += 1
    assert with_rollout >= 5
    assert len(store.list_traces()) > len(roots)  # the continuations are kept as traces


# ------------------------------------------------------------------ usage errors
@pytest.mark.parametrize("argv, command", [
    (["bogus"], ""),  # unknown command
    (["--bogus"], ""),  # unknown option of the main parser
    (["--device", "tpu"], ""),  # bad choice
    (["--max-new-tokens", "x"], ""),  # bad int
    (["annotate", "--prompt", "x", "--bogus"], "annotate"),  # unknown option of a command
    (["annotate", "--prompt", "x", "stray"], "annotate"),  # unknown positional
    (["annotate"], "annotate"),  # missing required (one of a group)
    (["mi", "--all"], "mi"),  # missing required option
    (["fork", "--trace", "x", "--position", "0", "--top", "1"], "fork"),  # bad int
    (["export", "--format", "pdf"], "export"),  # bad choice
    (["annotate", "--prompt", " "], "annotate"),  # a UsageError raised by the command
])
def test_usage_errors_are_one_line(argv, command, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("forkview: error: ")
    assert lines[0].endswith(f"(see forkview{' ' + command if command else ''} --help)")


def test_usage_error_is_one_line_in_a_process(db_path):
    proc = run_cli("annotate", "--prompt", "x", "--seed", "x", "--db", str(db_path),
                   timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "forkview: error: argument --seed: invalid int value: 'x' "
        "(see forkview annotate --help)"]
    assert not db_path.exists()


# ------------------------------------------------------------------ hub ids
def _closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("offline, needle", [
    ("1", "the hub is offline"),
    ("0", "cannot reach the hub"),  # online, the endpoint refuses: no minute of retries
])
def test_hub_id_that_cannot_load_fails_at_once(tmp_path, offline, needle):
    env = {**os.environ, "HF_HUB_OFFLINE": offline, "TRANSFORMERS_OFFLINE": offline,
           "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": _closed_port_url()}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "forkview", "annotate", "--prompt", "hi", "--model",
         "someorg/nonexistent-model", "--db", str(tmp_path / "t.db")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("forkview: error: "), proc.stderr
    assert needle in lines[0] and "someorg/nonexistent-model" in lines[0]
    assert elapsed < 5, elapsed


# ------------------------------------------------------------------ printed hints
def test_every_hint_runs_as_printed(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The commands browse mode suggests (forkview.ui.browser.command_hints) name the
    database and everything else they need: each runs through main() as printed."""
    import shlex

    import forkview.app
    from forkview.ui.browser import command_hints

    db = tmp_path / "with space" / "t.db"
    db.parent.mkdir()
    trace = annotate_json(capsys, "--prompt", "Tom has 3 apples. How many?", "--answer", "3",
                          "--model", str(tiny_model_dir), "--db", str(db),
                          "--max-new-tokens", "6")
    opened = {}

    class FakeApp:  # the explorer itself: what it would open, without a terminal
        return_code = 0

        def run(self):
            pass

    def create_app(**kw):
        opened.update(kw)
        return FakeApp()

    monkeypatch.setattr(forkview.app, "create_app", create_app)
    hints = command_hints(db, trace["trace_id"], position=1)
    assert set(hints) == {"explore", "mi", "replay", "fork"}
    for name, hint in hints.items():
        argv = shlex.split(hint)
        assert argv[0] == "forkview" and argv[argv.index("--db") + 1] == str(db), hint
        assert main(argv[1:]) == 0, (name, hint, capsys.readouterr().err)
    assert str(opened["db_path"]) == str(db)
    store = Store.open(db, readonly=True)
    assert [r.estimator for r in store.mi_runs(trace["trace_id"])] == ["hsic"]
    assert len(store.list_traces()) == 1 + 3  # the trace and its three branches
    store.close()
