"""`forkview export`: one tidy row per token, the same documented columns in JSONL, CSV
and Parquet, on a small store built here (no model needed)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forkview.cli import main
from models.types import Alternative, GenerationParams, TokenStep
from store import Store
from store.db import EXPORT_COLUMNS, export_columns, export_mi_column, iter_export_rows

DOC = Path(__file__).resolve().parents[1] / "docs" / "schema.md"
SAMPLED = GenerationParams(max_new_tokens=32, temperature=0.7, top_p=0.9, top_k=5, seed=11)


def step(i: int) -> TokenStep:
    return TokenStep(position=i, token_id=100 + i, text=[" 4", " +", " 4", "\n"][i % 4],
                     logprob=-0.125 * (i + 1), rank=1 + i % 2, entropy=0.5 + i / 8,
                     sampling_entropy=0.25 + i / 16,
                     top=[Alternative(100 + i, "x", 0.75), Alternative(7, "«y»", 0.125)])


def mi_run(store: Store, tid: int, estimator: str, params: dict, values: dict[int, float],
           status: str = "complete") -> None:
    run, _ = store.open_mi_run(tid, estimator, params)
    store.add_mi_values(run, [(p, v, None) for p, v in values.items()])
    store.finish_mi_run(run, status)


@pytest.fixture
def small_db(db_path: Path) -> dict:
    """Two models, a prompt from a set and a typed one, a sampled root with a fork,
    a greedy root; MI runs the export must pick from or leave out."""
    store = Store.open(db_path)
    alpha = store.upsert_model(name="alpha", spec="/models/alpha", kind="dir",
                               dtype="float32", device="cpu", content_hash="a")
    beta = store.upsert_model(name="beta", spec="org/beta", kind="hub", dtype="float32",
                              device="cpu", content_hash="b")
    p1 = store.add_prompt("4 + 4?", reference_answer="8", source_set="gsm", source_id="q1")
    p2 = store.add_prompt("Say hi.")
    t1 = store.start_trace(model_id=alpha, prompt_id=p1, prompt_token_ids=[1, 2],
                           params=SAMPLED)
    with store.writer(t1) as w:
        w.add_all([step(0), step(1), step(2)])
    store.set_answer(t1, "8", "last_number", True)
    t2 = store.start_trace(model_id=beta, prompt_id=p2, prompt_token_ids=[3],
                           params=GenerationParams(max_new_tokens=8))
    with store.writer(t2) as w:
        w.add_all([step(0), step(1)])
    t3 = store.start_trace(model_id=alpha, prompt_id=p1, prompt_token_ids=[1, 2],
                           params=SAMPLED, parent_trace_id=t1, fork_position=1,
                           forced_token_ids=[7], origin="fork")
    with store.writer(t3) as w:
        w.add_all([step(1), step(2)])
    store.set_answer(t3, "9", "last_number", False)
    # t1: the latest complete hsic run wins (position 1 has no value in it); a stopped
    # later run, a control and another model's run are left out; a running rollout
    # run gives no column at all.
    mi_run(store, t1, "hsic", {"sigma": 1}, {0: 0.1, 1: 0.2, 2: 0.3})
    mi_run(store, t1, "hsic", {"sigma": 2}, {0: 1.0, 2: 3.0})
    mi_run(store, t1, "hsic", {"sigma": 4}, {0: 5.0, 1: 5.0, 2: 5.0}, status="stopped")
    mi_run(store, t1, "hsic", {"sigma": 2, "control": "bandwidth"}, {0: 9.0, 1: 9.0, 2: 9.0})
    mi_run(store, t1, "hsic", {"sigma": 2, "model": "other"}, {0: 8.0, 1: 8.0, 2: 8.0})
    mi_run(store, t1, "answer-gain", {}, {1: 0.5})
    mi_run(store, t1, "rollout", {}, {0: 7.0}, status="running")
    mi_run(store, t3, "answer-gain", {}, {1: -0.25})
    store.close()
    return {"db": db_path, "t1": t1, "t2": t2, "t3": t3}


def top(i: int) -> list[dict]:
    return [{"token_id": 100 + i, "text": "x", "prob": 0.75},
            {"token_id": 7, "text": "«y»", "prob": 0.125}]


def expected_rows(small_db: dict) -> list[dict]:
    """What the export must say, written out by hand from the fixture."""
    store = Store.open(small_db["db"], readonly=True)
    t1, t2, t3 = (store.trace(small_db[k]) for k in ("t1", "t2", "t3"))

    def row(info, position, hsic, gain, **trace):
        s = step(position)
        return {
            "trace_uid": info.uid, "trace_id": info.id, **trace,
            "position": position, "token_id": s.token_id, "text": s.text,
            "logprob": s.logprob, "rank": s.rank, "entropy": s.entropy,
            "sampling_entropy": s.sampling_entropy, "top": top(position),
            "mi_answer_gain": gain, "mi_hsic": hsic,
        }

    sampled = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_new_tokens": 32, "seed": 11}
    greedy = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 8, "seed": None}
    alpha = {"model_name": "alpha", "model_spec": "/models/alpha", "prompt_id": t1.prompt_id,
             "source_set": "gsm", "source_id": "q1", **sampled}
    beta = {"model_name": "beta", "model_spec": "org/beta", "prompt_id": t2.prompt_id,
            "source_set": None, "source_id": None, **greedy}
    root = {"parent_trace_id": None, "fork_position": None, "origin": "generate",
            "status": "complete"}
    r1 = {**alpha, **root, "answer": "8", "reference_answer": "8", "correct": True}
    r2 = {**beta, **root, "answer": None, "reference_answer": None, "correct": None}
    r3 = {**alpha, "parent_trace_id": t1.id, "fork_position": 1, "origin": "fork",
          "status": "complete", "answer": "9", "reference_answer": "8", "correct": False}
    return [
        row(t1, 0, 1.0, None, **r1), row(t1, 1, None, 0.5, **r1), row(t1, 2, 3.0, None, **r1),
        row(t2, 0, None, None, **r2), row(t2, 1, None, None, **r2),
        row(t3, 1, None, -0.25, **r3), row(t3, 2, None, None, **r3),
    ]


COLUMNS = [*EXPORT_COLUMNS, "mi_answer_gain", "mi_hsic"]


def test_columns_and_mi_names(small_db: dict) -> None:
    store = Store.open(small_db["db"], readonly=True)
    assert export_columns(store) == COLUMNS
    assert export_columns(store, [small_db["t2"]]) == list(EXPORT_COLUMNS)
    assert export_columns(store, [small_db["t3"]]) == [*EXPORT_COLUMNS, "mi_answer_gain"]
    assert export_mi_column("answer-gain") == "mi_answer_gain"
    assert export_mi_column("my.plug-in") == "mi_my_plug_in"


def test_parquet_reads_back_with_every_column(small_db: dict, tmp_path: Path) -> None:
    out = tmp_path / "tokens.parquet"
    assert main(["export", "--db", str(small_db["db"]), "--format", "parquet",
                 "-o", str(out)]) == 0
    assert not Path(f"{out}.partial").exists()
    table = pq.read_table(out)
    assert table.column_names == COLUMNS
    assert table.to_pylist() == expected_rows(small_db)
    types = dict(zip(table.column_names, table.schema.types, strict=True))
    assert types["trace_id"] == pa.int64() and types["seed"] == pa.int64()
    assert types["correct"] == pa.bool_() and types["mi_hsic"] == pa.float64()
    assert types["trace_uid"] == pa.string()
    assert pa.types.is_list(types["top"])


def test_jsonl_and_csv_carry_the_same_columns(small_db: dict, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    want = expected_rows(small_db)
    assert main(["export", "--db", str(small_db["db"])]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [list(r) for r in rows] == [COLUMNS] * len(want)
    assert rows == want

    out = tmp_path / "tokens.csv"
    assert main(["export", "--db", str(small_db["db"]), "--format", "csv",
                 "-o", str(out)]) == 0
    with out.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        got = list(reader)
        assert reader.fieldnames == COLUMNS

    def as_csv(col: str, v: object) -> str:
        if v is None:
            return ""
        return json.dumps(v, ensure_ascii=False) if col == "top" else str(v)

    assert got == [{c: as_csv(c, r[c]) for c in COLUMNS} for r in want]


def test_chosen_traces_and_empty_exports(small_db: dict, tmp_path: Path) -> None:
    out = tmp_path / "t3.parquet"
    assert main(["export", "--db", str(small_db["db"]), "--format", "parquet",
                 "--trace", str(small_db["t3"]), "-o", str(out)]) == 0
    table = pq.read_table(out)
    assert table.column_names == [*EXPORT_COLUMNS, "mi_answer_gain"]
    assert table.column("mi_answer_gain").to_pylist() == [-0.25, None]

    empty = tmp_path / "empty.db"
    Store.open(empty).close()
    out = tmp_path / "empty.parquet"
    assert main(["export", "--db", str(empty), "--format", "parquet", "-o", str(out)]) == 0
    table = pq.read_table(out)
    assert (table.num_rows, table.column_names) == (0, list(EXPORT_COLUMNS))


def test_parquet_needs_an_output_file(small_db: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "--db", str(small_db["db"]), "--format", "parquet"]) == 2
    err = capsys.readouterr().err
    assert "--format parquet needs -o FILE" in err
    assert err.count("\n") == 1


def test_export_streams_one_trace_at_a_time(small_db: dict,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(small_db["db"], readonly=True)
    read: list[int] = []
    tokens = store.tokens
    monkeypatch.setattr(store, "tokens", lambda tid: read.append(tid) or tokens(tid))
    rows = iter_export_rows(store, None)
    first = next(rows)
    assert (first["trace_id"], read) == (small_db["t1"], [small_db["t1"]])
    assert len(list(rows)) == 6 and read == [small_db["t1"], small_db["t2"], small_db["t3"]]


def test_doc_lists_the_export_columns() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = re.search(r"^## Export columns\n(.*?)^## ", text, re.S | re.M)
    assert section, "docs/schema.md has no '## Export columns' section"
    documented = re.findall(r"^\| `([^`]+)` \| (\w+) \|", section.group(1), re.M)
    assert documented == [*EXPORT_COLUMNS.items(), ("mi_<estimator>", "real")]
