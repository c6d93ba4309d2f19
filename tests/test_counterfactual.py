"""The counterfactual test (issue 10): position categories with matched controls
(forkview/analysis/categories.py), keep-vs-redraw importance per position
(models/rollout.py ``counterfactual``), `forkview mi --positions categories` and the
token budget."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from forkview.analysis.categories import (
    CATEGORIES,
    TRACE_ENTROPY,
    draw_categories,
    draw_for_trace,
    peak_rule,
    peaks_run,
)
from forkview.analysis.inference import POSITION_BINS, token_class
from forkview.analysis.overlap import high_entropy_mask
from forkview.analysis.peaks import PeakRule, find_peaks
from forkview.cli import main
from forkview.mi import run_estimator, trace_data
from forkview.pipeline import annotate_prompt
from models.estimators import get_estimator
from models.rollout import TokenBudget, counterfactual
from models.types import GenerationParams
from store import Store

T_STAR = 5  # the position whose token decides the scripted answer


def _synthetic(n: int = 240, seed: int = 3):
    rng = np.random.default_rng(seed)
    ent = rng.gamma(0.6, 1.0, n).tolist()
    mi = {p: float(v) for p, v in enumerate(rng.standard_t(3, n))}
    mi[7] = None  # a position without a value is never classified
    words = ["the", " 12", ",", "\n", " ", "x", " so", "3", "+"]
    texts = [words[i] for i in rng.integers(len(words), size=n)]
    return ent, mi, texts


def _check_draw(draw, ent, mi, texts):
    used = [p for p in range(len(ent)) if mi.get(p) is not None]
    high_all, _ = high_entropy_mask(np.array(ent), np.zeros(len(ent), dtype=np.int64),
                                    TRACE_ENTROPY)
    high = {p for p in range(len(ent)) if high_all[p]}
    peaks = set(find_peaks(mi, draw.peak_rule))
    rel_bin = {p: k * POSITION_BINS // len(used) for k, p in enumerate(used)}
    assert draw.positions == sorted(draw.categories)
    assert 7 not in draw.categories
    for p, cat in draw.categories.items():
        e, k = p in high, p in peaks
        assert cat == {(True, False): "e_only", (False, True): "p_only",
                       (True, True): "both", (False, False): "control"}[(e, k)]
    counts = {c: len(draw.of(c)) for c in CATEGORIES}
    for c in CATEGORIES[:3]:
        assert counts[c] == min(draw.per_category, draw.available[c])
    partners = [m.partner for m in draw.matches.values()]
    assert len(partners) == len(set(partners))  # one control per selected position
    assert set(partners) | set(draw.unmatched) == {
        p for p, c in draw.categories.items() if c != "control"}
    assert set(draw.matches) == set(draw.of("control"))
    for q, m in draw.matches.items():
        assert m.how in ("cell", "bin", "any")
        if m.how in ("cell", "bin"):
            assert rel_bin[q] == rel_bin[m.partner]
        if m.how == "cell":
            assert token_class(texts[q]) == token_class(texts[m.partner])
    return counts


@pytest.mark.parametrize("rule", [PeakRule("tukey", 1.5), PeakRule("topr", 0.2),
                                  PeakRule("topk", 20)])
def test_categories_are_what_they_claim_and_controls_match(rule):
    ent, mi, texts = _synthetic()
    draw = draw_categories(ent, mi, texts, per_category=6, seed=1, trace_id=9, rule=rule)
    counts = _check_draw(draw, ent, mi, texts)
    assert counts["e_only"] == 6 and counts["control"] >= 6
    hows = [m.how for m in draw.matches.values()]
    assert hows.count("cell") >= len(hows) // 2  # 240 positions: most find a cell
    # Seeded: the same seed (and trace) draws the same, another seed (usually) not.
    same = draw_categories(ent, mi, texts, per_category=6, seed=1, trace_id=9, rule=rule)
    assert same.categories == draw.categories and same.matches == draw.matches
    assert same.params() == draw.params()
    others = [draw_categories(ent, mi, texts, per_category=6, seed=s, trace_id=9,
                              rule=rule).positions for s in (2, 3, 4)]
    assert any(o != draw.positions for o in others)
    other_trace = draw_categories(ent, mi, texts, per_category=6, seed=1, trace_id=10,
                                  rule=rule)
    assert other_trace.positions != draw.positions


def test_controls_fall_back_to_bin_then_any():
    # Six positions in two bins (0-2, 3-5). E: the top 20% (ceil 1.2 = 2) by entropy,
    # 4 and 5; P: position 0 (topk 1). Neither: 1, 2 (punctuation), 3 (a word).
    ent = [0.0, 0.0, 0.0, 0.1, 2.0, 2.1]
    mi = {0: 9.0, 1: 0.1, 2: 0.2, 3: 0.3, 4: 0.0, 5: 0.05}
    texts = ["7", ",", ",", "x", "a", "b"]
    draw = draw_categories(ent, mi, texts, per_category=3, seed=0,
                           rule=PeakRule("topk", 1), bins=2)
    assert draw.of("e_only") == [4, 5] and draw.of("p_only") == [0] and draw.of("both") == []
    assert draw.available == {"e_only": 2, "p_only": 1, "both": 0, "control": 3}
    by_partner = {m.partner: (q, m.how) for q, m in draw.matches.items()}
    assert by_partner[4] == (3, "cell")  # same bin, both words
    assert by_partner[5][1] == "any"  # bin 1 has no neither-position left
    assert by_partner[0][1] == "bin"  # bin 0, but no number among 1, 2
    assert {by_partner[5][0], by_partner[0][0]} == {1, 2} and draw.unmatched == []
    params = draw.params()
    assert params["e_only"] == [4, 5] and [3, 4, "cell"] in params["control"]
    assert params["entropy"] == {"scope": "trace", "rho": 0.2}
    # Too few neither-positions: the rest stay unmatched.
    short = draw_categories([2.0, 2.0, 0.1, 0.0], {0: 0.0, 1: 0.1, 2: 0.2, 3: 5.0},
                            ["a", "b", "7", ","], per_category=3, seed=0,
                            rule=PeakRule("topk", 1), bins=2)
    assert short.of("control") == [2] and short.matches[2].partner == 0
    assert short.matches[2].how == "any" and sorted(short.unmatched) == [1, 3]
    with pytest.raises(ValueError):
        peak_rule("median")
    assert peak_rule("topk").param == 20 and peak_rule("tukey", 3).param == 3.0


# ---------------------------------------------------------------- stored traces


@pytest.fixture
def trace40(tiny_lm, db_path):
    store = Store.open(db_path)
    res = annotate_prompt(tiny_lm, store, "What is 3 + 5?",
                          GenerationParams(max_new_tokens=40, temperature=1.0, seed=1),
                          answer="8")
    return store, res.trace_id


def _fake_run(store, tid, estimator="hsic", params=None, seed=0, status="complete"):
    rng = np.random.default_rng(seed)
    n = len(store.full_tokens(tid))
    run_id, _ = store.open_mi_run(tid, estimator, params or {"bandwidth": 50.0})
    store.add_mi_values(run_id, [(p, float(v), None)
                                 for p, v in enumerate(rng.standard_t(3, n))])
    store.finish_mi_run(run_id, status)
    return run_id


def test_peaks_come_from_the_latest_complete_real_run(trace40):
    store, tid = trace40
    assert peaks_run(store, tid, "hsic") is None
    assert draw_for_trace(store, tid, "hsic", per_category=2) is None
    real = _fake_run(store, tid, seed=1)
    _fake_run(store, tid, params={"bandwidth": 50.0, "control": "wrong-reference"}, seed=2)
    _fake_run(store, tid, params={"bandwidth": 7.0}, seed=3, status="stopped")
    assert peaks_run(store, tid, "hsic").id == real
    draw = draw_for_trace(store, tid, "hsic", per_category=2, seed=5)
    assert draw.peaks_run_id == real and draw.peaks_from == "hsic"
    tokens = store.full_tokens(tid)
    _check_draw(draw, [t.entropy for t in tokens], store.mi_values(real),
                [t.text for t in tokens])


# ---------------------------------------------------------------- importance


def test_counterfactual_by_hand():
    # keep: 3 of class 0, 1 of class 1; the other alternative: 4 of class 1.
    cf = counterfactual([[3, 1], [0, 4]], [0.5, 0.5], keep=0, correct=[3, 0])
    same_keep = (3 * 2 + 0) / (4 * 3)  # distinct pairs: 0.5 (plug-in would say 0.625)
    agree = 0.5 * same_keep + 0.5 * (0.75 * 0 + 0.25 * 1)
    assert cf["p_change_baseline"] == pytest.approx(1 - same_keep)
    assert cf["p_change"] == pytest.approx(1 - agree)
    assert cf["importance"] == pytest.approx(agree * 0 + same_keep - agree)
    assert cf["tv"] == pytest.approx(0.5 * (abs(0.75 - 0.375) + abs(0.25 - 0.625)))
    assert cf["accuracy_keep"] == 0.75 and cf["accuracy_redraw"] == pytest.approx(0.375)
    assert cf["accuracy_change"] == pytest.approx(-0.375)
    assert cf["n_keep"] == 4 and cf["n_redraw"] == 8 and cf["unbiased"] is True
    # One choice: nothing to redraw, everything 0 (and the baseline is what it is).
    one = counterfactual([[2, 2]], [1.0], keep=0)
    assert one["importance"] == 0.0 and one["tv"] == 0.0 and one["accuracy_keep"] is None
    assert one["p_change"] == one["p_change_baseline"] == pytest.approx(1 - 2 * 2 / 12)
    # A single sample: the plug-in square (flagged).
    assert counterfactual([[1, 0], [0, 1]], [0.5, 0.5], keep=0)["unbiased"] is False


def test_forced_outcome_importance_is_one_minus_p_at_the_token_and_zero_elsewhere(trace40,
                                                                               tiny_lm):
    """The scripted answer is the id of the token at T_STAR of the full response: at
    T_STAR keeping the token fixes the answer and redrawing it changes the answer
    whenever another token is drawn (importance = p_change = tv = 1 - p~(emitted));
    after T_STAR the token is in the prefix (answer fixed: exactly 0); well before it
    the short continuations never reach it (always "no answer": exactly 0)."""
    store, tid = trace40
    data = trace_data(store, tid)
    data.reference_answer = str(data.token_ids[T_STAR])

    def token_at_t_star(ids):
        return str(ids[T_STAR]) if len(ids) > T_STAR else None

    est = get_estimator("rollout", {"samples": 3, "max_new_tokens": 2, "min_prob": 0.05,
                                    "cut_off_answers": "any", "keep_tokens": False})
    est.hooks = {"answer_ids": token_at_t_star}
    positions = [0, 1, T_STAR, T_STAR + 1, T_STAR + 4, T_STAR + 7]
    details = {p: d for c in est.run(tiny_lm, data, positions) for p, d in c.details.items()}
    star = details[T_STAR]
    cf = star["counterfactual"]
    emitted = next(a for a in star["alternatives"] if a["emitted"])
    assert len(star["alternatives"]) >= 3  # a real fork
    assert cf["p_change_baseline"] == 0.0
    assert cf["importance"] == pytest.approx(1 - emitted["weight"])
    assert cf["p_change"] == pytest.approx(1 - emitted["weight"])
    assert cf["tv"] == pytest.approx(1 - emitted["weight"])
    assert cf["accuracy_keep"] == 1.0
    assert cf["accuracy_redraw"] == pytest.approx(emitted["weight"])
    assert cf["accuracy_change"] == pytest.approx(emitted["weight"] - 1)
    assert cf["n_keep"] == 3 and cf["n_redraw"] == 3 * len(star["alternatives"])
    for p in positions:
        if p == T_STAR:
            continue
        c = details[p]["counterfactual"]
        for key in ("importance", "tv", "p_change", "p_change_baseline"):
            assert c[key] == pytest.approx(0.0, abs=1e-12)
        assert c["n_redraw"] == 3 * len(details[p]["alternatives"])
        # After T_STAR every continuation answers right; before it none answers.
        right = 1.0 if p > T_STAR else 0.0
        assert c["accuracy_keep"] == right
        assert c["accuracy_redraw"] == pytest.approx(right)
    # Weighted by p~, redrawing the token at T_STAR is also the fraction of the
    # redraw mass that changes the answer: the alternatives' weights sum to 1.
    assert math.isclose(sum(a["weight"] for a in star["alternatives"]), 1.0)


# ---------------------------------------------------------------- budget and CLI


def _annotate(tiny_model_dir, db_path, capsys, seed):
    assert main(["annotate", "--prompt", "What is 3 + 5?", "--answer", "8",
                 "--model", str(tiny_model_dir), "--db", str(db_path),
                 "--max-new-tokens", "40", "--temperature", "1", "--seed", str(seed)]) == 0
    return int(capsys.readouterr().out.split()[0])


def test_budget_stops_cleanly_and_a_rerun_resumes(trace40, tiny_lm):
    store, tid = trace40
    params = {"samples": 2, "max_new_tokens": 4, "min_prob": 0.1, "keep_tokens": False}
    positions = [3, 9, 12, 24, 36]
    # n_alternatives per position does not depend on the seed: a cheap probe gives
    # each position's worst case.
    probe = run_estimator(tiny_lm, store, tid, get_estimator(
        "rollout", {**params, "samples": 1, "max_new_tokens": 1, "seed": 99}), positions)
    alts = {p: len(d["alternatives"]) for p, d in store.mi_details(probe.run_id).items()}
    worst = {p: alts[p] * 2 * 4 for p in positions}
    first = max(positions)  # positions run in descending order
    budget = TokenBudget(worst[first])
    est = get_estimator("rollout", params)
    summary = run_estimator(tiny_lm, store, tid, est, positions, budget=budget)
    assert budget.exhausted and summary.status == "stopped"
    kept = store.mi_values(summary.run_id)
    assert first in kept and 1 <= len(kept) < len(positions) == len(summary.positions)
    assert budget.positions == len(kept) and 0 < budget.spent <= budget.limit
    (run,) = [r for r in store.mi_runs(tid) if r.id == summary.run_id]
    assert run.status == "stopped"
    details = store.mi_details(summary.run_id)
    assert all("counterfactual" in d for d in details.values())
    again = run_estimator(tiny_lm, store, tid, get_estimator("rollout", params), positions,
                          budget=TokenBudget(10**9))
    assert again.run_id == summary.run_id and again.status == "complete"
    assert again.computed == len(positions) - len(kept)
    final = store.mi_values(summary.run_id)
    assert set(final) == set(positions) and {p: final[p] for p in kept} == kept
    with pytest.raises(Exception, match="budget is for the rollout"):
        run_estimator(tiny_lm, store, tid, get_estimator("answer-gain"), [0],
                      budget=TokenBudget(5))


def test_cli_categories_budget_and_errors(tiny_model_dir, db_path, capsys):
    with_hsic = _annotate(tiny_model_dir, db_path, capsys, seed=1)
    without = _annotate(tiny_model_dir, db_path, capsys, seed=2)
    store = Store.open(db_path)
    hsic_run = _fake_run(store, with_hsic, seed=4)
    store.close()
    db = ["--db", str(db_path)]
    base = ["mi", *db, "--estimator", "rollout", "--samples", "2",
            "--param", "max_new_tokens=3", "--param", "keep_tokens=false",
            "--positions", "categories", "--per-category", "2", "--peaks-from", "hsic",
            "--seed", "4"]
    # Errors: one line, exit 2, nothing written.
    for argv, needle in [
        (["mi", *db, "--trace", str(with_hsic), "--estimator", "rollout",
          "--per-category", "2"], "--per-category is only for --positions categories"),
        (["mi", *db, "--trace", str(with_hsic), "--estimator", "rollout",
          "--positions", "categories"], "needs --peaks-from"),
        ([*base, "--trace", str(with_hsic), "--peak-rule", "topk", "--peak-param", "0.5"],
         "topk's k"),
        ([*base[:-6], "--peaks-from", "nope", "--trace", str(with_hsic)],
         "unknown estimator 'nope'"),
        (["mi", *db, "--trace", str(with_hsic), "--estimator", "hsic",
          "--budget-tokens", "10"], "--budget-tokens is for the rollout"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
    assert all(not Store.open(db_path).mi_runs(t) or t == with_hsic
               for t in (with_hsic, without))
    # Only the trace without an hsic run: skipped with one line, exit 1.
    assert main([*base, "--trace", str(without)]) == 1
    assert "no complete hsic run" in capsys.readouterr().err
    # A budget of one token: nothing fits; both traces given, one skipped.
    assert main([*base, "--trace", str(without), "--trace", str(with_hsic),
                 "--budget-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert f"trace {without}: no complete hsic run" in err
    assert "token budget reached: 0 positions done, 0 of 1 continuation tokens" in err
    (run,) = [r for r in Store.open(db_path).mi_runs(with_hsic) if r.estimator == "rollout"]
    assert run.status == "stopped" and run.n_values == 0
    # Without a budget the same command resumes the same run to completion.
    assert main([*base, "--trace", str(with_hsic)]) == 0
    store = Store.open(db_path)
    (run,) = [r for r in store.mi_runs(with_hsic) if r.estimator == "rollout"]
    assert run.status == "complete"
    cats = run.params["categories"]
    assert cats["peaks_from"] == "hsic" and cats["peaks_run"] == hsic_run
    assert cats["k"] == 2 and cats["seed"] == 4
    assert cats["peak_rule"] == "tukey" and cats["peak_param"] == 1.5
    draw = draw_for_trace(store, with_hsic, "hsic", per_category=2, seed=4)
    assert draw.params() == cats
    details = store.mi_details(run.id)
    assert set(details) == set(draw.positions) == set(store.mi_values(run.id))
    for p, d in details.items():
        assert d["category"] == draw.categories[p]
        assert set(d["counterfactual"]) >= {
            "p_change", "p_change_baseline", "importance", "tv", "accuracy_keep",
            "accuracy_redraw", "accuracy_change", "n_keep", "n_redraw"}
        assert d["counterfactual"]["accuracy_keep"] is not None  # the reference is "8"
    for c in cats["control"]:
        assert details[c[0]]["category"] == "control" and c[2] in ("cell", "bin", "any")
    # Another seed is another draw: a run of its own.
    assert main([*base[:-1], "5", "--trace", str(with_hsic), "--budget-tokens", "1"]) == 0
    capsys.readouterr()
    assert len([r for r in Store.open(db_path).mi_runs(with_hsic)
                if r.estimator == "rollout"]) == 2


# ---------------------------------------------------------------- the report section
def test_counterfactual_statistics_on_known_values():
    from forkview.analysis import counterfactual as cf

    rng = np.random.default_rng(0)
    positions = []
    for prompt in range(12):
        for k in range(4):
            for cat, imp in (("e_only", 0.6), ("p_only", 0.1), ("both", 0.6),
                             ("control", 0.1)):
                v = float(np.clip(imp + rng.normal(0, 0.05), 0, 1))
                positions.append(cf.CounterfactualPosition(
                    trace_id=prompt * 10 + k, position=k, prompt=prompt, model_id=1,
                    peaks_from="hsic", category=cat,
                    values={"importance": v, "p_change": v + 0.2, "tv": v,
                            "accuracy_change": None}))
    (row,) = cf.analyse(positions, {1: "m"}, bootstrap=300, seed=0)
    assert row.n_prompts == 12 and row.categories["e_only"]["n_positions"] == 48
    e = row.differences["e_only"]
    assert e["estimate"] == pytest.approx(0.5, abs=0.03)
    assert e["ci"][0] > 0.4 and e["p_two_sided"] < 0.01
    p = row.differences["p_only"]
    assert p["ci"][0] < 0 < p["ci"][1] and p["p_two_sided"] > 0.05
    assert e["p_change_ratio"] == pytest.approx(0.8 / 0.3, rel=0.1)
    assert "times as often as redrawing a matched control" in row.sentence
    assert row.categories["e_only"]["accuracy_change"]["mean"] is None


def test_report_has_a_counterfactual_section(tiny_model_dir, db_path, capsys):
    from forkview.analysis.report import (
        ReportSettings,
        build_report,
        render_html,
        render_json,
        render_markdown,
    )

    tids = [_annotate(tiny_model_dir, db_path, capsys, seed=s) for s in (1, 2)]
    store = Store.open(db_path)
    for t in tids:
        _fake_run(store, t, seed=t)
    store.close()
    assert main(["mi", "--db", str(db_path), "--estimator", "rollout", "--samples", "2",
                 "--param", "max_new_tokens=3", "--param", "keep_tokens=false",
                 "--positions", "categories", "--per-category", "2", "--peaks-from", "hsic",
                 *[a for t in tids for a in ("--trace", str(t))]]) == 0
    store = Store.open(db_path, readonly=True)
    try:
        report = build_report(store, ReportSettings(bootstrap=50, null=50))
    finally:
        store.close()
    (row,) = report.counterfactual
    assert row.peaks_from == "hsic" and row.n_traces == 2
    assert set(row.categories) == {"e_only", "p_only", "both", "control"}
    assert set(row.differences) == {"e_only", "p_only", "both"}
    md = render_markdown(report)
    assert "## Counterfactual" in md and row.sentence.split(":")[0] in md
    assert json.loads(render_json(report))["counterfactual"][0]["peaks_from"] == "hsic"
    assert "Counterfactual: does the answer move" in render_html(report)
    # the categories run is not the trace's rollout MI in the overlap rows: it is its
    # own estimator run, shown there like any rollout run
