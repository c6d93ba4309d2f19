"""The counterfactual section of the report: does the answer move when a token is drawn
again, and more so at forking tokens (E) or at MI peaks (P) than at matched controls?

Input: rollout runs made with `forkview mi --estimator rollout --positions categories
--peaks-from NAME` (forkview/analysis/categories.py draws K positions per category and
trace: e_only, p_only, both, and a control matched to each by relative-position bin
and token class). Each such position's details carry `category` and `counterfactual`
(models/rollout.py): `p_change` (probability that the answer after redrawing the token
differs from the answer after keeping it), `p_change_baseline` (two continuations after
the kept token already disagree this often), `importance` = p_change - baseline, `tv`
(total variation between the keep and redraw outcome distributions) and
`accuracy_change`.

Statistics, with the overlap report's conventions (inference.py): per model × peak
source × category, the mean over positions with a 95% percentile bootstrap over
prompts; the differences e_only − control, p_only − control, both − control with a
bootstrap interval and a two-sided bootstrap p (twice the smaller share of resampled
differences on either side of 0, floored at 1 / (resamples + 1)); the ratio of mean
p_change to the controls' (the sentence's "X times as often"); the difference detectable
with 80% power from the bootstrap standard error. p-values join the report's secondary
family (Benjamini-Hochberg). Positions come from complete and from stopped runs (a
budget-stopped run's finished positions are final).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forkview.analysis import inference as inf

CATEGORIES = ("e_only", "p_only", "both", "control")
CATEGORY_LABELS = {"e_only": "E only", "p_only": "P only", "both": "E∩P",
                   "control": "matched control"}
METRICS = ("importance", "p_change", "tv", "accuracy_change")


@dataclass
class CounterfactualPosition:
    trace_id: int
    position: int
    prompt: int
    model_id: int
    peaks_from: str
    category: str
    values: dict[str, float | None]


def read_positions(conn: Any, trace_ids: Sequence[int],
                   prompt_of: dict[int, int], model_of: dict[int, int]
                   ) -> list[CounterfactualPosition]:
    """Every categorised rollout position of the selected traces: the latest run per
    trace × model × peak source (status complete or stopped)."""
    rows = conn.execute(
        "SELECT id, trace_id, params, model_id FROM mi_runs WHERE estimator = 'rollout' "
        "AND status IN ('complete', 'stopped') AND json_extract(params, '$.categories') "
        "IS NOT NULL ORDER BY id").fetchall()
    wanted = set(int(t) for t in trace_ids)
    latest: dict[tuple[int, int, str], int] = {}
    source: dict[int, tuple[int, int, str]] = {}
    for rid, tid, params, mid in rows:
        if int(tid) not in wanted:
            continue
        p = json.loads(params)
        if p.get("control"):
            continue
        model = int(mid) if mid is not None else model_of[int(tid)]
        key = (int(tid), model, str(p["categories"].get("peaks_from", "?")))
        latest[key] = int(rid)
    for key, rid in latest.items():
        source[rid] = key
    if not source:
        return []
    vals = conn.execute(
        "SELECT run_id, position, detail FROM mi_values WHERE run_id IN "
        "(SELECT value FROM json_each(?)) ORDER BY run_id, position",
        (json.dumps(sorted(source)),)).fetchall()
    out = []
    for rid, pos, detail in vals:
        if not detail:
            continue
        d = json.loads(detail)
        cat, cf = d.get("category"), d.get("counterfactual")
        if cat not in CATEGORIES or not isinstance(cf, dict):
            continue
        tid, model, peaks_from = source[int(rid)]
        out.append(CounterfactualPosition(
            tid, int(pos), prompt_of[tid], model, peaks_from, cat,
            {m: (None if cf.get(m) is None else float(cf[m])) for m in METRICS}))
    return out


@dataclass
class CounterfactualRow:
    """One model × peak source: per category and metric, the mean and its interval;
    the differences against the matched controls."""

    model_id: int
    model: str
    peaks_from: str
    n_traces: int
    n_prompts: int
    categories: dict[str, dict[str, Any]] = field(default_factory=dict)
    differences: dict[str, dict[str, Any]] = field(default_factory=dict)
    sentence: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model": self.model, "peaks_from": self.peaks_from,
                "n_traces": self.n_traces, "n_prompts": self.n_prompts,
                "categories": self.categories, "differences": self.differences,
                "sentence": self.sentence}


def analyse(positions: list[CounterfactualPosition], model_names: dict[int, str], *,
            bootstrap: int, seed: int) -> list[CounterfactualRow]:
    """Per model × peak source: means per category; intervals, tests and power only
    with at least inference.MIN_CLUSTERS prompts (a bootstrap over fewer is no
    interval)."""
    rows = []
    groups: dict[tuple[int, str], list[CounterfactualPosition]] = {}
    for p in positions:
        groups.setdefault((p.model_id, p.peaks_from), []).append(p)
    for (model, peaks_from), ps in sorted(groups.items()):
        prompts, cluster = np.unique([p.prompt for p in ps], return_inverse=True)
        enough = len(prompts) >= inf.MIN_CLUSTERS
        W = inf.bootstrap_weights_for(len(prompts), bootstrap if enough else 0, seed)
        cat = np.array([p.category for p in ps])
        row = CounterfactualRow(model, model_names.get(model, f"model {model}"), peaks_from,
                                n_traces=len({p.trace_id for p in ps}),
                                n_prompts=len(prompts))
        draws: dict[tuple[str, str], np.ndarray] = {}
        for metric in METRICS:
            v = np.array([np.nan if p.values[metric] is None else p.values[metric]
                          for p in ps])
            for c in CATEGORIES:
                sel = (cat == c) & np.isfinite(v)
                s = np.bincount(cluster[sel], weights=v[sel], minlength=len(prompts))
                n = np.bincount(cluster[sel], minlength=len(prompts)).astype(float)
                with np.errstate(divide="ignore", invalid="ignore"):
                    d = (W @ s) / (W @ n) if len(W) else np.zeros(0)
                draws[(metric, c)] = d
                iv = inf.interval(d)
                row.categories.setdefault(c, {"n_positions": int((cat == c).sum())})[
                    metric] = {"mean": float(v[sel].mean()) if sel.any() else None,
                               "ci": [inf.finite_or_none(iv.lo), inf.finite_or_none(iv.hi)],
                               "n": int(sel.sum()), "undefined_resamples": iv.undefined}
        for c in ("e_only", "p_only", "both"):
            d = draws[("importance", c)] - draws[("importance", "control")]
            est_c = row.categories[c]["importance"]["mean"]
            est_0 = row.categories["control"]["importance"]["mean"]
            est = None if est_c is None or est_0 is None else est_c - est_0
            iv = inf.interval(d)
            fin = d[np.isfinite(d)]
            p = (min(1.0, max(2 * min(np.mean(fin <= 0), np.mean(fin >= 0)),
                              1 / (len(d) + 1))) if len(fin) and est is not None else None)
            se = float(fin.std(ddof=1)) if len(fin) > 1 else math.nan
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio_d = draws[("p_change", c)] / draws[("p_change", "control")]
            pc_c = row.categories[c]["p_change"]["mean"]
            pc_0 = row.categories["control"]["p_change"]["mean"]
            ratio = pc_c / pc_0 if pc_c is not None and pc_0 else None
            riv = inf.interval(np.where(np.isfinite(ratio_d), ratio_d, np.nan))
            row.differences[c] = {
                "metric": "importance", "estimate": est,
                "ci": [inf.finite_or_none(iv.lo), inf.finite_or_none(iv.hi)], "p_two_sided": p,
                "null": "difference 0: two-sided percentile bootstrap over prompts",
                "adjusted_p": None,
                "detectable_80": (_z(0.975) + _z(0.8)) * se if math.isfinite(se) else None,
                "p_change_ratio": ratio, "p_change_ratio_ci": [inf.finite_or_none(riv.lo),
                                                                inf.finite_or_none(riv.hi)]}
        row.sentence = _sentence(row)
        rows.append(row)
    return rows


def _z(q: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


def sentence(row: CounterfactualRow) -> str:
    """The quotable sentence, from the row's numbers (re-made once p is adjusted)."""
    return _sentence(row)


def _sentence(row: CounterfactualRow) -> str:
    d = row.differences.get("e_only", {})
    r, ci = d.get("p_change_ratio"), d.get("p_change_ratio_ci") or [None, None]
    n_e = row.categories.get("e_only", {}).get("n_positions", 0)
    n_c = row.categories.get("control", {}).get("n_positions", 0)
    if r is None:
        return (f"{row.model} · peaks from {row.peaks_from}: too few E-only or control "
                "positions with an answer to compare.")
    if row.n_prompts < inf.MIN_CLUSTERS:
        return (f"{row.model} · peaks from {row.peaks_from}: redrawing an E-only token "
                f"changed the answer {r:.2f} times as often as redrawing a matched control, "
                f"but over only {row.n_prompts} prompt(s): no interval or test (at least "
                f"{inf.MIN_CLUSTERS} prompts are needed); a description, not a finding.")
    ci_text = ("" if ci[0] is None or ci[1] is None
               else f" [95% CI {ci[0]:.2f}, {ci[1]:.2f}]")
    det = d.get("detectable_80")
    power = (f" With {n_e} E-only and {n_c} control positions, a difference in importance "
             f"of {det:.2f} would be detected with 80% power." if det is not None else "")
    dci = d.get("ci") or [None, None]
    diff_ci = ("" if dci[0] is None or dci[1] is None
               else f" [95% CI {dci[0]:.3f}, {dci[1]:.3f}]")
    adj = d.get("adjusted_p")
    p_text = f"two-sided p {_fmt(d.get('p_two_sided'), 4)}" + (
        f", BH-adjusted {_fmt(adj, 4)}" if adj is not None else "")
    return (f"{row.model} · peaks from {row.peaks_from}: redrawing an E-only token changes "
            f"the answer {r:.2f} times as often as redrawing a matched control{ci_text}. "
            "Corrected for how often two continuations after the kept token already "
            f"disagree, the importance of E-only minus control is "
            f"{_fmt(d.get('estimate'))}{diff_ci} ({p_text}).{power}")


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"
