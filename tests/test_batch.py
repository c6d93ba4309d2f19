"""Batch annotation (`forkview annotate --prompts`): batched samples equal one-at-a-time
generation, seeds are derived, runs resume, Ctrl-C keeps tokens, MI runs once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forkview.batch import (
    BatchProgress,
    plan_jobs,
    run_batch,
    sample_seed,
    with_set,
)
from forkview.cli import main
from forkview.errors import UsageError
from forkview.prompt_sets import PromptItem, read_prompt_file
from models.types import GenerationParams
from store import Store

ITEMS = [
    PromptItem(id="q1", prompt="Tom has 3 apples and buys 5 more.", answer="8", set="toy"),
    PromptItem(id="q2", prompt="What is 2 + 5?", answer="7", set="toy"),
]
SAMPLED = GenerationParams(max_new_tokens=8, temperature=1.0)


def test_seeds_are_derived_and_distinct():
    groups = plan_jobs(ITEMS, 3, SAMPLED)
    seeds = [j.params.seed for g in groups for j in g]
    assert len(set(seeds)) == 6
    assert groups[1][2].params.seed == sample_seed(0, "q2", 2)
    assert plan_jobs(ITEMS, 3, SAMPLED)[0][0].params.seed == seeds[0]  # same every time
    other = plan_jobs(ITEMS, 3, GenerationParams(temperature=1.0, seed=5))
    assert other[0][0].params.seed == sample_seed(5, "q1", 0) != seeds[0]


def test_greedy_copies_are_refused():
    with pytest.raises(UsageError, match="identical copies"):
        plan_jobs(ITEMS, 2, GenerationParams(temperature=0.0))
    (group,) = plan_jobs(ITEMS[:1], 1, GenerationParams(temperature=0.0))
    assert group[0].params.seed is None


def test_batch_matches_one_at_a_time_and_resumes(tiny_lm, db_path):
    from models.generate import stream_annotated

    store = Store.open(db_path)
    summary = run_batch(tiny_lm, store, ITEMS, SAMPLED, samples=3)
    assert summary.generated == 6 and summary.skipped == 0 and not summary.interrupted
    assert len(summary.trace_ids) == 6
    for job in summary.jobs:
        info = store.trace(job.trace_id)
        assert info.status == "complete" and info.origin == "generate" and info.is_root
        assert (info.source_set, info.source_id) == ("toy", job.prompt_id)
        assert info.params.seed == job.seed == sample_seed(0, job.prompt_id, job.sample)
        # Row r of the batch draws exactly what stream_annotated draws with its seed.
        alone = list(stream_annotated(tiny_lm, info.prompt_token_ids, info.params))
        stored = store.tokens(info.id)
        assert [s.token_id for s in stored] == [s.token_id for s in alone]
        assert [s.entropy for s in stored] == pytest.approx([s.entropy for s in alone],
                                                            abs=1e-4)
        assert info.text == "".join(s.text for s in stored)
        # Cut off by the token limit: no answer ("cut_off", never scored) unless the
        # text states one explicitly (models.answers.accept_answer).
        if info.stop_reason in ("length", "context"):
            assert info.answer_method in ("cut_off", "boxed", "final_answer")
            if info.answer_method == "cut_off":
                assert info.answer is None and info.correct is None
    # The same request again: nothing generated, the same traces reported.
    again = run_batch(tiny_lm, store, ITEMS, SAMPLED, samples=3)
    assert again.generated == 0 and again.skipped == 6
    assert again.trace_ids == summary.trace_ids
    # One more sample per prompt: only the new rows are made.
    more = run_batch(tiny_lm, store, ITEMS, SAMPLED, samples=4)
    assert more.generated == 2 and more.skipped == 6
    # Other parameters are other traces.
    longer = run_batch(tiny_lm, store, ITEMS[:1],
                       GenerationParams(max_new_tokens=9, temperature=1.0))
    assert longer.generated == 1


class _StopAfter(BatchProgress):
    def __init__(self, n: int):
        self.n = n
        self.seen = 0

    def tokens(self, n: int) -> None:
        self.seen += n
        if self.seen >= self.n:
            raise KeyboardInterrupt


def test_interrupt_keeps_tokens_and_rerun_finishes(tiny_lm, db_path):
    store = Store.open(db_path)
    params = GenerationParams(max_new_tokens=12, temperature=1.0)
    cut = run_batch(tiny_lm, store, ITEMS, params, samples=2, progress=_StopAfter(5))
    assert cut.interrupted
    stopped = [j for j in cut.jobs if j.trace_id is not None]
    assert len(stopped) == 2  # the first prompt's batch had started
    assert sum(store.trace(j.trace_id).n_tokens for j in stopped) == 5
    for j in stopped:
        info = store.trace(j.trace_id)
        assert info.status == "stopped" and info.stop_reason == "interrupted"
        assert len(store.tokens(info.id)) == info.n_tokens
    # A remake that fails leaves the stopped copies counted.
    with pytest.raises(RuntimeError, match="boom"):
        run_batch(tiny_lm, store, ITEMS, params, samples=2, progress=_Fail())
    failed = [t for t in store.list_traces() if t.status == "failed"]
    assert len(failed) == 2
    assert {store.trace(j.trace_id).status for j in stopped} == {"stopped"}
    done = run_batch(tiny_lm, store, ITEMS, params, samples=2)
    assert done.generated == 4 and done.skipped == 0 and not done.interrupted
    assert done.superseded == 2
    assert all(store.trace(t).status == "complete" for t in done.trace_ids)
    # The stopped traces are still there (nothing is deleted), marked superseded by
    # their remakes (stop_reason kept), and no longer listed.
    for j in stopped:
        info = store.trace(j.trace_id)
        assert (info.status, info.stop_reason) == ("superseded", "interrupted")
        remake = next(t for t in done.jobs if (t.prompt_id, t.sample) == (j.prompt_id,
                                                                           j.sample))
        assert store.superseded_by(j.trace_id) == remake.trace_id
    listed = {t.id for t in store.list_traces()}
    assert listed.isdisjoint(j.trace_id for j in stopped)
    assert run_batch(tiny_lm, store, ITEMS, params, samples=2).generated == 0
    # A stopped copy beside a complete twin (as an older forkview left them) is
    # superseded when the batch is run again and skips its key.
    for j in stopped:
        store.unsupersede(store.superseded_by(j.trace_id))
    again = run_batch(tiny_lm, store, ITEMS, params, samples=2)
    assert again.generated == 0 and again.superseded == 2
    assert {store.trace(j.trace_id).status for j in stopped} == {"superseded"}


class _Fail(BatchProgress):
    def tokens(self, n: int) -> None:
        raise RuntimeError("boom")


def test_rows_that_ended_stay_complete_when_interrupted(tiny_lm, tmp_path):
    """Lock-step rows end at different lengths; an interrupt after some have ended
    leaves those complete (a re-run does not redo them)."""
    params = GenerationParams(max_new_tokens=120, temperature=1.0)
    items = [PromptItem(id="a", prompt="Tom has 3 apples.", answer="3", set="toy")]
    full = run_batch(tiny_lm, Store.open(tmp_path / "full.db"), items, params, samples=6)
    lengths = sorted(j.n_tokens for j in full.jobs)
    k = next((n for n in lengths if n < lengths[-1]), None)
    if k is None:
        pytest.skip("every sample ran to the same length")
    cut_at = sum(min(n, k + 1) for n in lengths)  # one step after the shortest ended
    store = Store.open(tmp_path / "cut.db")
    cut = run_batch(tiny_lm, store, items, params, samples=6, progress=_StopAfter(cut_at))
    assert cut.interrupted
    full_len = {j.sample: j.n_tokens for j in full.jobs}
    ended = [j for j in cut.jobs if j.status == "complete"]
    assert ended and len(ended) < 6
    for j in cut.jobs:
        if j.status == "complete":  # ended by itself: the same as in the full run
            assert j.n_tokens == full_len[j.sample]
            assert store.trace(j.trace_id).stop_reason == "eos"
        else:
            assert j.status == "stopped" and j.n_tokens == k + 1 < full_len[j.sample]
    again = run_batch(tiny_lm, store, items, params, samples=6)
    assert again.skipped == len(ended) and again.generated == 6 - len(ended)


def test_cancel_event_stops_between_tokens(tiny_lm, db_path):
    import threading

    store = Store.open(db_path)
    cancel = threading.Event()

    class Cancel(BatchProgress):
        def tokens(self, n: int) -> None:
            cancel.set()

    summary = run_batch(tiny_lm, store, ITEMS, SAMPLED, samples=2, progress=Cancel(),
                        cancel=cancel)
    assert summary.interrupted
    started = [j for j in summary.jobs if j.trace_id is not None]
    assert len(started) == 2 and all(j.status == "stopped" for j in started)


def test_mi_runs_once(tiny_lm, db_path):
    from models.estimators import get_estimator

    store = Store.open(db_path)
    est = [get_estimator("hsic")]
    first = run_batch(tiny_lm, store, ITEMS[:1], SAMPLED, samples=2, estimators=est)
    assert first.mi_runs == 2 and first.mi_skipped == 0
    for tid in first.trace_ids:
        (run,) = store.mi_runs(tid)
        assert run.status == "complete" and run.estimator == "hsic"
        assert "model" not in run.params  # the trace's own model
    again = run_batch(tiny_lm, store, ITEMS[:1], SAMPLED, samples=2,
                      estimators=[get_estimator("hsic")])
    assert again.mi_runs == 0 and again.mi_skipped == 2


def test_with_set_renames():
    assert {i.set for i in with_set(ITEMS, "mine")} == {"mine"}
    assert with_set(ITEMS, None) == ITEMS


# ---------------------------------------------------------------- the command


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_cli_jsonl_with_samples(tiny_model_dir, db_path, tmp_path, capsys):
    f = _write(tmp_path, "probs.jsonl",
               '{"prompt": "Tom has 3 apples.", "answer": 3, "id": "a"}\n'
               '{"prompt": "Add 2 and 5."}\n')
    args = ["annotate", "--prompts", str(f), "--samples", "2", "--model", str(tiny_model_dir),
            "--db", str(db_path), "--max-new-tokens", "6", "--json"]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [
        ("a", 0), ("a", 1), ("probs-001", 0), ("probs-001", 1)]
    store = Store.open(db_path, readonly=True)
    for r in rows:
        info = store.trace(r["trace_id"])
        # Several samples without --temperature are drawn at T = 1.
        assert info.params.temperature == 1.0 and info.params.seed == r["seed"]
        assert info.source_set == "probs"
    assert store.trace(rows[0]["trace_id"]).reference_answer == "3"
    assert main(args) == 0  # resumed: nothing new
    assert all(json.loads(line)["skipped"] for line in capsys.readouterr().out.splitlines())


def test_cli_csv_set_name_and_greedy(tiny_model_dir, db_path, tmp_path, capsys):
    f = _write(tmp_path, "p.csv", 'id,prompt,answer\nx1,"Say hi, please",hi\n')
    assert main(["annotate", "--prompts", str(f), "--set", "demo", "--model",
                 str(tiny_model_dir), "--db", str(db_path), "--max-new-tokens", "4"]) == 0
    (tid,) = [int(x) for x in capsys.readouterr().out.split()]
    info = Store.open(db_path, readonly=True).trace(tid)
    assert (info.source_set, info.source_id, info.prompt) == ("demo", "x1", "Say hi, please")
    assert info.params.temperature == 0.0 and info.params.seed is None  # one sample: greedy


@pytest.mark.parametrize("extra, needle", [
    (["--prompts", "missing.jsonl"], "prompt file not found"),
    (["--prompts", "builtin:nope"], "unknown prompt set"),
    (["--prompts", "builtin:arith", "--samples", "3", "--temperature", "0"], "identical copies"),
    (["--prompts", "builtin:arith", "--answer", "3"], "--answer goes with --prompt"),
    (["--prompt", "hi", "--samples", "2"], "--samples goes with --prompts"),
    (["--prompt", "hi", "--set", "x"], "--set goes with --prompts"),
])
def test_cli_bad_batch_requests(extra, needle, db_path, capsys):
    assert main(["annotate", *extra, "--db", str(db_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not db_path.exists()  # refused before the database is touched


def test_cli_prompt_and_prompts_are_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["annotate", "--prompt", "x", "--prompts", "builtin:arith"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["annotate", "--max-new-tokens", "3"])  # neither


def test_read_prompt_file_formats(tmp_path):
    items = read_prompt_file(_write(tmp_path, "s.jsonl", '{"prompt": "a", "set": "S"}\n'))
    assert (items[0].id, items[0].set, items[0].answer) == ("S-000", "S", None)
    with pytest.raises(ValueError, match="unsupported"):
        read_prompt_file(_write(tmp_path, "s.txt", "x"))


def _ro_count(db: Path, query: str) -> int:
    import sqlite3
    import urllib.parse

    if not db.exists():
        return 0
    uri = "file:" + urllib.parse.quote(str(db.resolve())) + "?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True, timeout=1)
        try:
            return int(con.execute(query).fetchone()[0] or 0)
        finally:
            con.close()
    except sqlite3.Error:  # not created yet, or mid-creation
        return 0


def test_ctrl_c_then_resume_counts_each_trace_once(tiny_model_dir, tmp_path, capsys):
    """The real thing: `annotate --prompts --samples 2` is sent SIGINT once its first
    tokens are saved, then the same command runs to the end. Every (prompt, seed) has
    exactly one counted trace; the stopped copies are kept, marked superseded; the
    listing, export and report see only the counted ones unless asked."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from forkview.analysis.report import ReportSettings, build_report

    f = _write(tmp_path, "p.jsonl", "".join(
        json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i)})
        + "\n" for i in range(2)))
    db = tmp_path / "resume.db"
    # 96 tokens a row: these seeds reach no EOS before it, so the batch is still
    # growing when the signal lands.
    args = ["annotate", "--prompts", str(f), "--samples", "2", "--model", str(tiny_model_dir),
            "--db", str(db), "--max-new-tokens", "96", "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "forkview", *args],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 180
        while _ro_count(db, "SELECT COUNT(*) FROM tokens") == 0:
            assert proc.poll() is None and time.monotonic() < deadline, "nothing generated"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    first = Store.open(db, readonly=True)
    stopped = {t.id: t for t in first.list_traces() if t.status == "stopped"}
    assert stopped, [(t.id, t.status) for t in first.list_traces()]
    assert all(t.stop_reason == "interrupted" and t.n_tokens > 0 for t in stopped.values())
    first.close()

    assert main(args) == 0  # the same command again, to the end
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and all(r["status"] == "complete" for r in rows)
    store = Store.open(db, readonly=True)
    every = store.list_traces(superseded=True)
    counted = [t for t in every if t.status != "superseded"]
    keys = [(t.prompt, t.params.seed) for t in counted]
    assert len(keys) == len(set(keys)) == 4  # one counted trace per (prompt, seed)
    assert sorted(t.id for t in counted) == sorted(r["trace_id"] for r in rows)
    assert {t.status for t in counted} == {"complete"}
    for tid, old in stopped.items():  # kept, marked, pointing at their remake
        now = store.trace(tid)
        assert (now.status, now.stop_reason, now.n_tokens) == (
            "superseded", "interrupted", old.n_tokens)
        assert len(store.tokens(tid)) == old.n_tokens
        remake = store.trace(store.superseded_by(tid))
        assert (remake.prompt, remake.params) == (old.prompt, old.params)
        assert remake.status == "complete"
    assert len(every) == 4 + len(stopped)

    assert main(["traces", "--db", str(db), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(t["trace_id"] for t in listed) == sorted(t.id for t in counted)
    assert main(["traces", "--db", str(db), "--json", "--superseded"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(t["trace_id"] for t in listed) == sorted(t.id for t in every)
    assert {t["trace_id"]: t["superseded_by"] for t in listed if "superseded_by" in t} == {
        tid: store.superseded_by(tid) for tid in stopped}
    assert main(["traces", "--db", str(db)]) == 0
    assert "superseded" not in capsys.readouterr().out
    assert main(["export", "--db", str(db)]) == 0
    exported = {json.loads(line)["trace_id"] for line in capsys.readouterr().out.splitlines()}
    assert exported == {t.id for t in counted}
    assert main(["export", "--db", str(db), "--superseded"]) == 0
    exported = {json.loads(line)["trace_id"] for line in capsys.readouterr().out.splitlines()}
    assert exported == {t.id for t in every}

    report = build_report(store, ReportSettings(bootstrap=0, null=0))
    assert report.n_traces == 4
    assert sum(m.n_tokens for m in report.models) == sum(t.n_tokens for t in counted)


async def test_browser_hides_superseded_until_s(db_path):
    from textual.widgets import DataTable, Label

    from forkview.app import create_app
    from forkview.ui.browser import BrowserScreen
    from models.types import TokenStep

    store = Store.open(db_path)
    model = store.upsert_model(name="tiny", spec="tiny", kind="dir", dtype="float32",
                               device="cpu")
    prompt = store.add_prompt("What is 2 + 5?", source_set="toy", source_id="q2")
    old, new = (store.start_trace(model_id=model, prompt_id=prompt, prompt_token_ids=[1],
                                  params=SAMPLED) for _ in range(2))
    for tid, status in ((old, "stopped"), (new, "complete")):
        with store.writer(tid) as w:
            w.add(TokenStep(0, 5, " 7", -0.1, 1, 0.2, 0.0))
            w.finish(status, "interrupted" if status == "stopped" else "eos")
    assert store.supersede([old], by=new) == [old]
    store.close()
    app = create_app(db_path=db_path, browse_only=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, BrowserScreen)
        table = screen.query_one(DataTable)
        count = screen.query_one("#browser-count", Label)
        assert [t.id for t in screen.traces] == [new] and table.row_count == 1
        assert "s shows 1 superseded" in str(count.render())
        await pilot.press("s")
        await pilot.pause()
        assert [t.id for t in screen.traces] == [new, old] and table.row_count == 2
        assert str(table.get_cell(str(old), "status")) == "superseded"
        assert "s hides superseded" in str(count.render())
        await pilot.press("s")
        await pilot.pause()
        assert table.row_count == 1


def test_mi_skips_a_prompt_without_a_reference_and_goes_on(tiny_model_dir, db_path, tmp_path,
                                                           capsys):
    """`annotate --prompts --mi`: a prompt with no reference answer (and, from the tiny
    model, no answer in its text) is skipped with one line; the others get their runs."""
    f = _write(tmp_path, "mixed.jsonl",
               '{"prompt": "Add 2 and 5.", "id": "none"}\n'
               '{"prompt": "Tom has 3 apples.", "answer": 3, "id": "three"}\n')
    args = ["annotate", "--prompts", str(f), "--model", str(tiny_model_dir), "--db",
            str(db_path), "--max-new-tokens", "6", "--mi", "hsic"]
    assert main(args) == 0
    captured = capsys.readouterr()
    without, with_answer = (int(x) for x in captured.out.split())
    skipped = [line for line in captured.err.splitlines() if "skipped (" in line]
    assert skipped == [f"forkview: trace {without} hsic: skipped (no reference answer for "
                       "this prompt and no answer extractable from the trace's text)"]
    assert "MI runs: 1 computed, 0 already complete, 1 not run" in captured.err
    store = Store.open(db_path, readonly=True)
    assert store.mi_runs(without) == []  # nothing stored for it, not even a failed run
    assert [(r.estimator, r.status) for r in store.mi_runs(with_answer)] == [
        ("hsic", "complete")]
    store.close()
    assert main(args) == 0  # again: the done run is done, the other still skipped
    assert "MI runs: 0 computed, 1 already complete, 1 not run" in capsys.readouterr().err
