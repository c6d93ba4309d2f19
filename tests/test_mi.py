"""MI estimators wired to saved traces: registry, parameters, storage, resume, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from forkview.cli import main
from forkview.errors import ForkviewError, UsageError
from forkview.mi import resolve_positions, run_estimator, trace_data
from forkview.pipeline import annotate_prompt
from models.errors import ModelError
from models.estimators import REGISTRY, get_estimator, parse_params
from models.hsic import hsic_direct
from models.types import GenerationParams
from store import Store


@pytest.fixture
def saved_trace(tiny_lm, db_path):
    store = Store.open(db_path)
    result = annotate_prompt(tiny_lm, store, "What is 3 + 5?", GenerationParams(max_new_tokens=24),
                             answer="8", solution="3 + 5 = 8. The answer is 8.")
    return store, result.trace_id


def test_registry_and_parameters():
    assert {"hsic", "answer-gain"} <= set(REGISTRY)
    assert parse_params("hsic", ["bandwidth=median", "layer=0", "normalised=false"]) == {
        "bandwidth": "median", "layer": 0, "normalised": False}
    assert get_estimator("hsic", {"bandwidth": 10.0}).params["bandwidth"] == 10.0
    with pytest.raises(ModelError, match="unknown estimator 'nope'"):
        get_estimator("nope")
    with pytest.raises(ModelError, match="unknown parameter 'sigmaa' for hsic"):
        parse_params("hsic", ["sigmaa=3"])
    with pytest.raises(ModelError, match="bandwidth must be a positive number or 'median'"):
        get_estimator("hsic", parse_params("hsic", ["bandwidth=wide"]))
    with pytest.raises(ModelError, match="use key=value"):
        parse_params("hsic", ["bandwidth"])
    with pytest.raises(ModelError, match="stride must be at least 1"):
        get_estimator("answer-gain", {"stride": 0})


def test_positions():
    ent = [0.1, 2.0, 0.0, 3.0, 0.2]
    assert resolve_positions("all", "all", ent) == [0, 1, 2, 3, 4]
    assert resolve_positions("3,1,1", "all", ent) == [1, 3]
    assert resolve_positions(None, "all", ent) == [0, 1, 2, 3, 4]
    with pytest.raises(ForkviewError, match="position 5 is out of range"):
        resolve_positions("5", "all", ent)
    with pytest.raises(UsageError, match="bad positions"):
        resolve_positions("x,y", "all", ent)


def test_hsic_values_equal_the_published_formula(saved_trace, tiny_lm):
    """Stored values equal a direct transcription of MI-Peaks' estimator applied to the
    states a plain forward pass gives (last layer before the final norm, at the step
    that emits each token; h_y from one pass over the reference solution)."""
    store, tid = saved_trace
    est = get_estimator("hsic", {"bandwidth": 1.0})
    summary = run_estimator(tiny_lm, store, tid, est)
    assert summary.status == "complete"
    data = trace_data(store, tid)
    ids = data.prompt_ids + data.token_ids
    ref_ids = tiny_lm.tokenizer(data.reference_solution)["input_ids"]
    pre_norm = _last_layer_output(tiny_lm, ids)
    h_y = _last_layer_output(tiny_lm, ref_ids)[-1]
    p = len(data.prompt_ids)
    values = store.mi_values(summary.run_id)
    for t in range(len(data.token_ids)):
        expected = hsic_direct(pre_norm[p - 1 + t], h_y, sigma=1.0)
        assert values[t] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    (run,) = store.mi_runs(tid)
    assert run.params == est.params
    assert run.info["reference_kind"] == "solution" and run.info["self_reference"] is False
    assert run.info["sigma"] == 1.0 and run.info["eps"] == 1e-5


def _last_layer_output(lm, ids):
    import torch

    captured = []
    handle = lm.model.model.layers[-1].register_forward_hook(
        lambda _m, _i, o: captured.append((o[0] if isinstance(o, tuple) else o)[0]))
    try:
        with torch.inference_mode():
            lm.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return captured[0].double().numpy()


def test_rerun_resumes_and_other_params_keep_both(saved_trace, tiny_lm):
    store, tid = saved_trace
    first = run_estimator(tiny_lm, store, tid, get_estimator("hsic"), "0,1,2")
    assert first.computed == 3
    again = run_estimator(tiny_lm, store, tid, get_estimator("hsic"), "all")
    assert again.run_id == first.run_id
    assert again.computed == len(again.positions) - 3  # finished positions kept
    other = run_estimator(tiny_lm, store, tid, get_estimator("hsic", {"bandwidth": "median"}))
    assert other.run_id != first.run_id
    runs = store.mi_runs(tid)
    assert [r.params["bandwidth"] for r in runs] == [50.0, "median"]
    assert all(r.status == "complete" for r in runs)
    assert store.mi_details(other.run_id)[0]["sigma_x"] > 0  # the per-token sigma is kept


def test_self_reference_is_flagged_and_missing_answer_is_an_error(tiny_lm, db_path):
    store = Store.open(db_path)
    tid = annotate_prompt(tiny_lm, store, "hello", GenerationParams(max_new_tokens=6)).trace_id
    data = trace_data(store, tid)
    est = get_estimator("hsic", {"reference": "self"})
    if any(ch.isdigit() for ch in data.text):
        summary = run_estimator(tiny_lm, store, tid, est)
        assert store.mi_runs(tid)[-1].info["self_reference"] is True
        assert summary.status == "complete"
    else:
        with pytest.raises(ModelError, match="no answer extractable"):
            run_estimator(tiny_lm, store, tid, est)
        assert store.mi_runs(tid)[-1].status == "failed"


def test_answer_gain_runs_on_a_saved_trace(saved_trace, tiny_lm):
    store, tid = saved_trace
    summary = run_estimator(tiny_lm, store, tid, get_estimator("answer-gain"))
    values = store.mi_values(summary.run_id)
    assert len(values) == len(trace_data(store, tid).token_ids)
    # word boundaries (the default): a value at each word's or number's last token,
    # None inside it; every value there finite
    given = [v for v in values.values() if v is not None]
    assert given and all(np.isfinite(v) for v in given)
    (run,) = store.mi_runs(tid)
    assert run.params["boundary"] == "word"
    assert run.info["answer"] == "8" and run.info["self_reference"] is False


def test_hsic_without_hidden_states_is_a_clear_error(saved_trace, tiny_lm):
    from models.loading import wrap_model

    store, tid = saved_trace
    broken = wrap_model(tiny_lm.model, tiny_lm.tokenizer, name="opaque")
    layers = broken.model.model.layers
    broken.model.model.layers = None  # no decoder layers to read from
    try:
        with pytest.raises(ModelError, match="cannot find the decoder layers"):
            run_estimator(broken, store, tid, get_estimator("hsic"))
    finally:
        broken.model.model.layers = layers


def test_cli_mi_and_annotate_with_mi(tiny_model_dir, db_path, capsys):
    assert main(["annotate", "--prompt", "What is 2 + 2?", "--answer", "4",
                 "--model", str(tiny_model_dir), "--db", str(db_path),
                 "--max-new-tokens", "10", "--mi", "hsic,answer-gain", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(set(t["mi"]) == {"hsic", "answer-gain"} for t in out["tokens"])
    assert all(t["mi"]["hsic"] is not None for t in out["tokens"])
    tid = out["trace_id"]
    assert main(["mi", "--db", str(db_path), "--trace", str(tid), "--estimator", "hsic",
                 "--param", "bandwidth=median", "--positions", "0,2"]) == 0
    runs = Store.open(db_path).mi_runs(tid)
    assert [r.n_values for r in runs if r.params.get("bandwidth") == "median"] == [2]
    # Bad input: one line each, nothing saved lost.
    for argv, needle in [
        (["--estimator", "nope"], "unknown estimator 'nope'"),
        (["--estimator", "hsic", "--param", "sigmaa=1"], "unknown parameter 'sigmaa'"),
        (["--estimator", "hsic", "--positions", "999"], "position 999 is out of range"),
    ]:
        assert main(["mi", "--db", str(db_path), "--trace", str(tid), *argv]) == 1
        assert needle in capsys.readouterr().err
    assert main(["mi", "--db", str(db_path), "--trace", "77", "--estimator", "hsic"]) == 1
    assert "no trace with id 77" in capsys.readouterr().err
    assert len(Store.open(db_path).mi_runs(tid)) == len(runs)


def test_rollout_stores_values_details_and_continuations(saved_trace, tiny_lm):
    store, tid = saved_trace
    est = get_estimator("rollout", {"samples": 3, "max_new_tokens": 6, "min_prob": 0.2})
    assert est.default_positions == "stratified"
    summary = run_estimator(tiny_lm, store, tid, est, "0,3")
    assert summary.status == "complete" and summary.positions == [0, 3]
    values = store.mi_values(summary.run_id)
    assert set(values) == {0, 3}
    assert all(v is not None and v >= -1e-9 for v in values.values())
    details = store.mi_details(summary.run_id)
    alts = details[0]["alternatives"]
    assert any(a["emitted"] for a in alts)
    assert sum(a["weight"] for a in alts) == pytest.approx(1.0)
    children = [t for t in store.list_traces() if t.parent_trace_id == tid]
    assert len(children) == sum(len(d["alternatives"]) * 3 for d in details.values())
    assert {c.fork_position for c in children} == {0, 3}
    child = children[0]
    tokens = store.tokens(child.id)
    assert tokens[0].position == child.fork_position
    assert [t.id for t in store.list_traces(roots_only=True)] == [tid]
    # Re-running finds everything done and adds no continuations.
    again = run_estimator(tiny_lm, store, tid, est, "0,3")
    assert again.computed == 0
    assert len([t for t in store.list_traces() if t.parent_trace_id == tid]) == len(children)


def test_cancelled_rollout_keeps_finished_positions_and_resumes(saved_trace, tiny_lm):
    import threading

    store, tid = saved_trace
    params = {"samples": 2, "max_new_tokens": 4, "min_prob": 0.3}
    cancel = threading.Event()
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done >= 1:
            cancel.set()  # stop after the first finished position

    first = run_estimator(tiny_lm, store, tid, get_estimator("rollout", params), "1,2,5",
                          cancel=cancel, progress=progress)
    assert first.status == "stopped"
    kept = store.mi_values(first.run_id)
    assert len(kept) == 1
    second = run_estimator(tiny_lm, store, tid, get_estimator("rollout", params), "1,2,5")
    assert second.run_id == first.run_id and second.computed == 2
    assert second.status == "complete"
    final = store.mi_values(second.run_id)
    assert set(final) == {1, 2, 5}
    assert {k: final[k] for k in kept} == kept  # finished values untouched


def test_wrong_reference_control_is_a_run_of_its_own_that_the_report_compares(
        tiny_lm, tiny_model_dir, db_path, capsys):
    """`mi --control wrong-reference` scores a trace against another prompt's reference
    (a different answer), stores it beside the real run, and the report keeps it out of
    the overlap and compares it with the real run instead."""
    from forkview.analysis.report import ReportSettings, build_report

    store = Store.open(db_path)
    ids = [annotate_prompt(tiny_lm, store, f"What is {a} + {b}?",
                           GenerationParams(max_new_tokens=16), answer=str(a + b),
                           solution=f"{a} + {b} = {a + b}.", source_set="s").trace_id
           for a, b in ((3, 5), (2, 2), (1, 6))]
    store.close()
    db = ["--db", str(db_path), "--model", str(tiny_model_dir)]
    assert main(["mi", *db, "--all", "--estimator", "answer-gain"]) == 0
    assert main(["mi", *db, "--all", "--estimator", "answer-gain",
                 "--control", "wrong-reference"]) == 0
    assert main(["mi", *db, "--all", "--estimator", "rollout",
                 "--control", "wrong-reference"]) == 2
    assert "reference-based" in capsys.readouterr().err
    assert main(["mi", *db, "--all", "--estimator", "answer-gain",
                 "--control", "bandwidth"]) == 2
    assert "for hsic" in capsys.readouterr().err
    assert main(["mi", *db, "--all", "--estimator", "hsic"]) == 0
    assert main(["mi", *db, "--all", "--estimator", "hsic", "--control", "bandwidth"]) == 0
    store = Store.open(db_path, readonly=True)
    try:
        runs = store.mi_runs(ids[0])
        (ctl,) = [r for r in runs if r.params.get("control") == "wrong-reference"]
        # the next prompt of the same set with another answer: "2 + 2"'s
        assert ctl.params["reference_prompt_id"] == store.trace(ids[1]).prompt_id
        assert ctl.info["answer"] != "8"
        report = build_report(store, ReportSettings(bootstrap=20, null=20))
    finally:
        store.close()
    for row in (r for r in report.rows if r.group == "all"):
        assert all("control" not in p["params"] for p in row.params)
    assert [r.result.n_traces for r in report.rows if r.estimator == "hsic"] == [3]
    by = {(c["estimator"], c["control"]): c for c in report.reference_controls}
    assert set(by) == {("answer-gain", "wrong-reference"), ("hsic", "bandwidth")}
    assert by[("answer-gain", "wrong-reference")]["n_traces"] == 3
    assert isinstance(by[("answer-gain", "wrong-reference")]["not_reference_specific"], bool)
    assert isinstance(by[("hsic", "bandwidth")]["bandwidth_robust"], bool)


def test_other_reference_picks_the_next_prompt_with_another_answer(db_path):
    store = Store.open(db_path)
    m = store.upsert_model(name="m", spec="m", kind="dir", dtype="float32", device="cpu")
    prompts = [store.add_prompt(f"p{i}", reference_answer=a, source_set="s")
               for i, a in enumerate(["1", "1", "2"])]
    lone = store.add_prompt("q", reference_answer="9", source_set="other")
    tids = [store.start_trace(model_id=m, prompt_id=p, prompt_token_ids=[1],
                              params=GenerationParams()) for p in [*prompts, lone]]
    assert store.other_reference(tids[0])[0] == prompts[2]  # skips the same answer
    assert store.other_reference(tids[2])[0] == prompts[0]  # wraps around
    assert store.other_reference(tids[3]) is None  # alone in its set
    store.close()


def test_mi_with_nothing_left_returns_without_loading_a_model(saved_trace, tiny_lm,
                                                                tiny_model_dir):
    """A complete run with these parameters: `forkview mi` says so and never imports
    torch (no model is loaded for nothing)."""
    import subprocess
    import sys

    store, tid = saved_trace
    run_estimator(tiny_lm, store, tid, get_estimator("hsic"))
    path = store.path
    store.close()
    code = ("import sys; from forkview.cli import main; "
            f"rc = main(['mi', '--db', {str(path)!r}, '--trace', '{tid}', "
            "'--estimator', 'hsic']); print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["0", "False"], out.stderr
    assert "nothing left to compute" in out.stderr


def test_check_says_why_an_estimator_cannot_run():
    from models.estimators import TraceData

    def trace(text: str = "no number here", **refs: str) -> TraceData:
        return TraceData([1], [2, 3], [0.5, 0.1], text, **refs)

    hsic, gain, rollout = (get_estimator(n) for n in ("hsic", "answer-gain", "rollout"))
    missing = ("no reference answer for this prompt and no answer extractable from the "
               "trace's text")
    assert hsic.check(trace()) == missing and gain.check(trace()) == missing
    assert hsic.check(trace(reference_answer="8")) is None
    assert hsic.check(trace(reference_solution="3 + 5 = 8")) is None
    # answer-gain forces an answer: a worked solution alone is not one
    assert gain.check(trace(reference_solution="3 + 5 = 8")) == missing
    assert gain.check(trace("so the answer is 8")) is None  # extractable from the text
    assert get_estimator("hsic", {"reference": "solution"}).check(
        trace(reference_answer="8")) == "no reference solution for this prompt"
    assert get_estimator("hsic", {"reference": "self"}).check(
        trace(reference_answer="8")) == "no answer extractable from the trace's text"
    assert rollout.check(trace()) is None  # rollouts need no reference


def test_run_many_skips_with_a_reason_and_goes_on(tiny_lm, db_path):
    """One path for every caller: a trace an estimator cannot run on, a trace of another
    model (own_model) and a run that fails each get their outcome; the others run, and
    a second pass finds them done."""
    import sqlite3

    from forkview.mi import MIJob, cannot_run, jobs_for, run_many

    store = Store.open(db_path)
    params = GenerationParams(max_new_tokens=6)
    good = annotate_prompt(tiny_lm, store, "What is 3 + 5?", params, answer="8").trace_id
    bare = annotate_prompt(tiny_lm, store, "hello", params).trace_id
    other = annotate_prompt(tiny_lm, store, "What is 1 + 1?", params, answer="2").trace_id
    elsewhere = store.upsert_model(name="x", spec="x", kind="dir", dtype="float16",
                                   device="cpu")
    store.close()
    with sqlite3.connect(db_path) as con:
        con.execute("UPDATE traces SET model_id = ? WHERE id = ?", (elsewhere, other))
    store = Store.open(db_path)
    hsic = get_estimator("hsic")
    assert cannot_run(store, MIJob(bare, hsic)).startswith("no reference answer")
    assert cannot_run(store, MIJob(good, hsic)) is None
    seen = []
    jobs = [*jobs_for([good, bare, other], [hsic]),
            MIJob(good, get_estimator("hsic", {"layer": 99}))]
    runs = run_many(tiny_lm, store, jobs, own_model=True, on_outcome=seen.append)
    by = {(o.job.trace_id, o.job.estimator.params["layer"]): o for o in runs.outcomes}
    assert seen == runs.outcomes and not runs.interrupted
    assert by[good, -1].status == "complete"
    assert by[bare, -1].status == "skipped" and "no reference answer" in by[bare, -1].reason
    assert by[other, -1].status == "skipped" and by[other, -1].other_model
    assert by[good, 99].status == "failed" and "out of range" in by[good, 99].reason
    assert store.mi_runs(bare) == [] and store.mi_runs(other) == []
    assert by[bare, -1].line.startswith(f"trace {bare} hsic: skipped (no reference")
    # Without own_model the other model's trace runs, kept as a run of this model.
    again = run_many(tiny_lm, store, jobs_for([good, other], [hsic]))
    assert [o.status for o in again.outcomes] == ["done", "complete"]
    assert again.outcomes[0].label == "already complete"
    assert "model" in store.mi_runs(other)[0].params
    store.close()
