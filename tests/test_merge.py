"""`forkview merge`: databases from several machines combine without losing or
duplicating a trace; inputs are never modified; bad inputs are refused on one line."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from forkview.cli import main
from models.types import Alternative, GenerationParams, TokenStep
from store import Store
from store.merge import merge

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def step(pos: int, tok: int = 0) -> TokenStep:
    return TokenStep(position=pos, token_id=100 + pos + tok, text=f"t{pos}.{tok} ",
                     logprob=-0.1 * pos, rank=1, entropy=0.5 + pos + tok,
                     sampling_entropy=0.0, top=[Alternative(100 + pos, "x", 0.9)])


def make_db(path: Path, tag: str, *, spec: str = "model-a", running: bool = False) -> Store:
    """A root trace with a branch, an MI run, a rescoring by a second model and
    optionally a trace still running; models and prompt shared across tags."""
    store = Store.open(path)
    mid = store.upsert_model(name="A", spec=spec, kind="dir", dtype="float32", device="cpu",
                             content_hash="h1", tokenizer_hash="tok")
    other = store.upsert_model(name="B", spec="model-b", kind="dir", dtype="float32",
                               device="cpu", content_hash="h2", tokenizer_hash="tok")
    pid = store.add_prompt("What is 2 + 2?", reference_answer="4", source_set="s",
                           source_id="1")
    own = store.add_prompt(f"Prompt of {tag}", source_set="s", source_id=tag)
    root = store.start_trace(model_id=mid, prompt_id=pid, prompt_token_ids=[1, 2, 3],
                             params=GenerationParams(max_new_tokens=4))
    with store.writer(root) as w:
        for i in range(4):
            w.add(step(i))
        w.finish("complete", "length")
    store.set_answer(root, "4", "last_number", True)
    store.add_child_trace(root, fork_position=2, forced_token_ids=[7],
                          params=GenerationParams(max_new_tokens=2, temperature=1.0, seed=1),
                          text_="t2.1 t3.1 ", steps=[step(2, 1), step(3, 1)], n_tokens=2,
                          stop_reason="length", answer="5", answer_method="last_number",
                          origin="fork")
    run, _ = store.open_mi_run(root, "hsic", {"bandwidth": 50.0}, mid)
    store.add_mi_values(run, [(0, 0.1, None), (1, None, {"why": "x"}), (2, 0.3, None)])
    store.finish_mi_run(run, "complete", info={"tag": tag})
    store.add_token_scores(root, other, [step(i, 5) for i in range(4)])
    second = store.start_trace(model_id=mid, prompt_id=own, prompt_token_ids=[4, 5],
                               params=GenerationParams(max_new_tokens=3))
    with store.writer(second) as w:
        w.add(step(0, 9))
        if not running:
            w.finish("complete", "eos")
        else:
            w.flush()
            w.finished = True  # leave it `running`, as a live process would
    return store


def dump(path: Path) -> dict:
    """Everything a database says, keyed by what survives a merge (uids, model and
    prompt keys), never by local ids."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    models = {r[0]: tuple(r[1:]) for r in con.execute(
        "SELECT id, spec, content_hash, revision, dtype, device, tokenizer_hash FROM models")}
    prompts = {r[0]: tuple(r[1:]) for r in con.execute(
        "SELECT id, text, reference_answer, source_set, source_id FROM prompts")}
    uid = dict(con.execute("SELECT id, uid FROM traces"))
    traces = {}
    for r in con.execute("SELECT id, uid, model_id, prompt_id, parent_trace_id, fork_position, "
                         "forced_token_ids, origin, status, text, n_tokens, answer, correct, "
                         "seed FROM traces"):
        tokens = con.execute("SELECT position, token_id, text, logprob, entropy, top FROM "
                             "tokens WHERE trace_id = ? ORDER BY position", (r[0],)).fetchall()
        runs = {}
        for run in con.execute("SELECT id, estimator, params, status, info, model_id FROM "
                               "mi_runs WHERE trace_id = ?", (r[0],)).fetchall():
            values = con.execute("SELECT position, value, detail FROM mi_values WHERE "
                                 "run_id = ? ORDER BY position", (run[0],)).fetchall()
            runs[(run[1], run[2])] = (run[3], run[4], models.get(run[5]), values)
        scores = {}
        for s in con.execute("SELECT model_id, position, logprob, rank, entropy, top FROM "
                             "token_scores WHERE trace_id = ?", (r[0],)).fetchall():
            scores[(models[s[0]], s[1])] = s[2:]
        traces[r[1]] = dict(model=models[r[2]], prompt=prompts[r[3]],
                            parent=uid.get(r[4]), rest=r[5:], tokens=tokens, runs=runs,
                            scores=scores)
    con.close()
    return {"traces": traces, "models": sorted(models.values(), key=repr),
            "prompts": sorted(prompts.values(), key=repr)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def counts(path: Path) -> dict[str, int]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    out = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
           for t in ("models", "prompts", "traces", "tokens", "mi_runs", "mi_values",
                     "token_scores", "meta")}
    con.close()
    return out


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    make_db(a, "a").close()
    make_db(b, "b", running=True).close()
    return a, b


def test_merge_keeps_everything_once(two, tmp_path):
    a, b = two
    before = {p: sha(p) for p in two}
    out = tmp_path / "sub" / "out.db"
    stats = merge(out, [a, b])
    assert [s.traces_added for s in stats] == [3, 3]
    assert {p: sha(p) for p in two} == before  # inputs untouched
    da, db, do = dump(a), dump(b), dump(out)
    assert do["traces"] == {**da["traces"], **db["traces"]}
    assert len(do["traces"]) == 6
    # One row per model and per prompt (the shared ones are not duplicated).
    assert do["models"] == da["models"]
    assert len(do["prompts"]) == 3
    # The running trace is copied as it is.
    assert sorted(t["rest"][3] for t in do["traces"].values()).count("running") == 1
    meta = json.loads(dict(sqlite3.connect(out).execute("SELECT key, value FROM meta"))
                      ["merged_from"])
    assert [m["file"] for m in meta] == [str(a.resolve()), str(b.resolve())]
    assert meta[0]["traces_added"] == 3 and "merged_at" in meta[0]


def test_merging_again_adds_nothing(two, tmp_path):
    out = tmp_path / "out.db"
    merge(out, list(two))
    first = counts(out)
    stats = merge(out, [*two, two[0]])
    assert not any(s.added_anything for s in stats)
    assert counts(out) == first


def test_merge_brings_new_work_on_known_traces(two, tmp_path):
    a, _ = two
    out = tmp_path / "out.db"
    merge(out, [a])
    store = Store.open(a)  # machine A goes on working: a new MI run and more values
    root = store.root_traces()[0].id
    run, _ = store.open_mi_run(root, "hsic", {"bandwidth": 50.0})
    store.add_mi_values(run, [(3, 0.4, None)])
    run2, _ = store.open_mi_run(root, "answer-gain", {"stride": 1})
    store.add_mi_values(run2, [(0, 1.0, None)])
    store.finish_mi_run(run2, "complete")
    store.close()
    (s,) = merge(out, [a])
    assert s.traces_added == 0 and s.mi_runs_added == 1 and s.mi_values_added == 2
    assert dump(out)["traces"] == dump(a)["traces"]


def test_old_schema_input_is_upgraded_in_a_copy(tmp_path):
    old = tmp_path / "v1.db"
    con = sqlite3.connect(old)
    con.executescript((DATA / "schema_v1.sql").read_text())
    con.close()
    before = sha(old)
    out = tmp_path / "out.db"
    (s,) = merge(out, [old])
    assert s.schema == 1 and s.traces_added >= 1
    assert sha(old) == before
    assert sqlite3.connect(old).execute("PRAGMA user_version").fetchone()[0] == 1
    assert Store.open(out, readonly=True).schema_version >= 4


def test_sample_db_merges_without_change():
    sample = ROOT / "sample_db" / "arith.db"
    before = sha(sample)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.db"
        (s,) = merge(out, [sample])
        assert s.traces_added == counts(out)["traces"] >= 40
        assert s.mi_values_added == counts(out)["mi_values"] > 0
    assert sha(sample) == before
    assert not (sample.parent / "arith.db-wal").exists()


def _newer(path: Path) -> Path:
    make_db(path, "n").close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 99")
    con.close()
    return path


@pytest.mark.parametrize("case, needle", [
    ("missing", "database not found"),
    ("garbage", "not a forkview database"),
    ("foreign", "not a forkview database"),
    ("newer", "newer forkview"),
    ("same", "is the output database"),
    ("dir", "is a directory"),
])
def test_bad_inputs_one_line(case, needle, tmp_path, capsys):
    out = tmp_path / "out.db"
    bad = tmp_path / "in.db"
    if case == "garbage":
        bad.write_bytes(b"not a database at all" * 100)
    elif case == "foreign":
        sqlite3.connect(bad).execute("CREATE TABLE t (x)").connection.close()
    elif case == "newer":
        _newer(bad)
    elif case == "same":
        make_db(out, "o").close()
        bad = out
    elif case == "dir":
        bad.mkdir()
    before = counts(out) if out.exists() else None
    assert main(["merge", str(out), str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    if before is None:
        assert not out.exists()  # refused before OUT is made
    else:
        assert counts(out) == before


def test_cli_merge_reports(two, tmp_path, capsys):
    out = tmp_path / "out.db"
    assert main(["merge", str(out), *map(str, two)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "+3 traces" in lines[0]
    assert main(["merge", str(out), str(two[0])]) == 0
    assert "nothing new" in capsys.readouterr().out


def test_merge_never_imports_torch(two, tmp_path):
    code = ("import sys; from store.merge import merge; "
            f"merge({str(tmp_path / 'o.db')!r}, [{str(two[0])!r}]); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
