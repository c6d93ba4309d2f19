"""The overlap report: E against P per model x estimator, over a selection of traces.

`build_report(store, settings)` reads the columns it needs with plain SQL on the
store's engine (a read-only Store is enough), puts them in flat numpy arrays and hands
them to forkview/analysis/overlap.py; `render_markdown`, `render_html`, `render_json`
and `render_csv` write the result. Every format states the settings and the forkview
version. No torch, no Textual: `forkview report` and the explorer's report screen
both call this.

What is read:
- traces: root traces by default (`branches` adds forks, samples and rollout
  continuations, each with its own positions only), status complete or stopped,
  optionally of some prompt sets (prompts.source_set);
- a model's entropies: `tokens.entropy` of the traces it generated, and
  `token_scores.entropy` of the traces it rescored (`forkview rescore`);
- MI: per trace x estimator x model, the latest (highest id) complete run; a run's
  model is mi_runs.model_id, or the trace's model when that is empty;
- traces.correct for the split `by="correct"`.

E is chosen once per model over all its tokens in the selection (so a token is
high-entropy or not whichever estimator or split it is counted in); P per trace and
estimator. Between two models that scored the same tokens, the report compares their
E sets (same rule) and their peak sets (same estimator, same rule).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forkview.analysis import counterfactual as cf
from forkview.analysis import figures as figs
from forkview.analysis import inference as inf
from forkview.analysis import overlap as ov
from forkview.analysis.peaks import TUKEY, PeakRule
from forkview.text import counted
from models.types import forkview_version
from store.db import named_rows

GROUP_ORDER = ("all", "correct", "incorrect", "unknown")
# Which part of each response is analysed (traces.think_start / think_end / answer_start,
# models/thinking.py): every position, the thinking content, or the answer after it.
SPANS = ("all", "think", "answer")
SPAN_TEXT = {"think": "thinking part only: positions [think_start, think_end) of the "
                      "traces with a thinking part",
             "answer": "answer only: positions from answer_start on (the whole response "
                       "of a trace without a thinking part)"}
# Fetch everything and filter in numpy when the selection is at least this share of the
# rows: one sequential scan beats an index lookup per row.
_SCAN_SHARE = 0.5


class ReportError(Exception):
    """A report that cannot be made; `usage` marks a bad request (exit 2) rather than a
    database without what was asked for (exit 1)."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True)
class ReportSettings:
    """Everything that decides the numbers; each report carries a copy."""

    entropy: ov.EntropyRule = field(default_factory=ov.EntropyRule)
    peaks: PeakRule = TUKEY
    bootstrap: int = 1000
    null: int = 1000
    seed: int = 0
    models: tuple[str, ...] = ()  # row ids, or name/spec substrings; () = all
    sets: tuple[str, ...] = ()  # prompts.source_set values; () = all
    estimators: tuple[str, ...] = ()  # () = every estimator with runs
    branches: bool = False  # also forks, samples and rollout continuations
    by: str | None = None  # "correct": split by traces.correct
    top_tokens: int = 15
    span: str = "all"  # all | think | answer (SPANS)

    def to_json(self) -> dict[str, Any]:
        return {
            "entropy_set": {**self.entropy.to_json(), "definition": self.entropy.label},
            "peak_rule": {"name": self.peaks.name, "param": self.peaks.param,
                          "definition": f"{self.peaks.label}: {self.peaks.definition}, "
                                        "per trace"},
            "mi_run": "latest complete run per trace x estimator x model",
            "bootstrap": {"iterations": self.bootstrap, "seed": self.seed,
                          "stream": [self.seed, 1], "unit": "prompt",
                          "interval": "95% percentile"},
            "null": {"iterations": self.null, "seed": self.seed, "stream": [self.seed, 2],
                     "method": "circular shift of MI within each trace",
                     "p": "two-sided: min(1, 2 min(p_upper, p_lower)), p_upper = "
                          "(1 + #null >= observed) / (1 + iterations)"},
            "bootstrap_unit": "prompt",
            "position_bins": inf.POSITION_BINS,
            "token_classes": list(inf.TOKEN_CLASSES),
            "filters": {"models": list(self.models), "sets": list(self.sets),
                        "estimators": list(self.estimators),
                        "traces": "roots and branches" if self.branches else "roots only"},
            "by": self.by,
            "top_tokens": self.top_tokens,
            # only when restricted: a default report reads as it always did
            **({"span": {"name": self.span, "definition": SPAN_TEXT[self.span]}}
               if self.span != "all" else {}),
        }


@dataclass
class ModelSummary:
    id: int
    name: str
    spec: str
    n_traces: int
    n_tokens: int
    generated: int  # traces it generated
    rescored: int  # traces it rescored
    entropy: dict[str, Any]
    histogram: dict[str, Any]
    n_high: int
    threshold: float | None  # E's threshold (corpus / fixed); None per trace
    thresholds_median: float | None = None  # per-trace scope: the median threshold

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "spec": self.spec,
                "n_traces": self.n_traces, "n_tokens": self.n_tokens,
                "generated": self.generated, "rescored": self.rescored,
                "entropy": self.entropy, "histogram": self.histogram, "n_high": self.n_high,
                "threshold": self.threshold, "thresholds_median": self.thresholds_median}


@dataclass
class ReportRow:
    model_id: int
    model: str
    estimator: str
    group: str  # all | correct | incorrect | unknown | "setting: <sampling label>"
    params: list[dict[str, Any]]  # [{"params": {...}, "traces": n}]: the runs used
    result: ov.OverlapResult
    settings: list[str] = field(default_factory=list)  # sampling settings of its traces
    positions_total: int = 0  # the traces' positions, with or without an MI value
    verdict: inf.Verdict | None = None  # rows of group "all" only
    no_choice: int = 0  # rollout positions left out: one choice, I_t = 0 by construction

    def to_json(self) -> dict[str, Any]:
        out = {"model_id": self.model_id, "model": self.model, "estimator": self.estimator,
               "group": self.group, "runs": self.params, "sampling_settings": self.settings,
               "no_choice_positions": self.no_choice, **self.result.to_json()}
        if self.verdict is not None:
            out["verdict"] = self.verdict.to_json()
        return out


@dataclass
class Report:
    settings: ReportSettings
    version: str
    database: str  # the file name (not the path: reports get shared)
    n_traces: int  # traces selected
    models: list[ModelSummary]
    rows: list[ReportRow]
    comparisons: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    strata: list[ReportRow] = field(default_factory=list)  # per sampling setting
    between_estimators: list[dict[str, Any]] = field(default_factory=list)
    reference_controls: list[dict[str, Any]] = field(default_factory=list)
    counterfactual: list[cf.CounterfactualRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"forkview_version": self.version, "database": self.database,
                "settings": self.settings.to_json(), "n_traces": self.n_traces,
                "primary_endpoint": PRIMARY_ENDPOINT,
                "verdicts": [{"model": r.model, "model_id": r.model_id,
                              "estimator": r.estimator, **r.verdict.to_json()}
                             for r in self.rows if r.verdict is not None],
                "models": [m.to_json() for m in self.models],
                "rows": [r.to_json() for r in self.rows],
                "strata": [r.to_json() for r in self.strata],
                "between_estimators": self.between_estimators,
                "reference_controls": self.reference_controls,
                "counterfactual": [r.to_json() for r in self.counterfactual],
                "comparisons": self.comparisons, "notes": self.notes}

    @property
    def primary_rows(self) -> list[ReportRow]:
        return [r for r in self.rows if r.group == "all"]


# ====================================================================== reading
@dataclass
class _Selection:
    ids: np.ndarray  # trace ids, ascending
    model: np.ndarray  # generating model row per trace
    correct: list[bool | None]
    prompt: np.ndarray  # prompt row per trace: the bootstrap's cluster
    setting: list[str]  # sampling setting per trace (`sampling_label`)
    # per trace (think_start, think_end, answer_start, n_tokens) (None: no thinking part
    # or not stored) and whether it is a root
    think: list[tuple[Any, ...]] = field(default_factory=list)
    root: list[bool] = field(default_factory=list)


def sampling_label(temperature: float, top_p: float, top_k: int) -> str:
    """A trace's sampling regime as a stratum name: "greedy" or "T=1" (with top-p /
    top-k when set). Traces of different regimes have very different shares of
    high-entropy tokens, so they are compared only within their own stratum."""
    if not temperature:
        return "greedy"
    out = f"T={temperature:g}"
    if top_p < 1:
        out += f", top-p {top_p:g}"
    if top_k:
        out += f", top-k {top_k}"
    return out


@dataclass
class _Tokens:
    """One model's tokens in the selection, sorted by (trace, position)."""

    trace_id: np.ndarray
    position: np.ndarray
    entropy: np.ndarray
    text: list[str]


def _fetch(conn: Any, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    # The sqlite3 connection itself: plain tuples, without SQLAlchemy's Row per row
    # (which doubled the time of reading half a million tokens).
    return conn.execute(sql, args).fetchall()


class _snapshot:
    """The store's sqlite3 connection inside one read transaction, so every query of a
    report sees the same database even while another process writes to it."""

    def __init__(self, store: Any) -> None:
        self.sa = store.engine.connect()
        self.raw = self.sa.connection.dbapi_connection

    def __enter__(self) -> Any:
        self.raw.execute("BEGIN")
        return self.raw

    def __exit__(self, *exc: Any) -> None:
        try:
            self.raw.execute("ROLLBACK")
        finally:
            self.sa.close()


def _columns(rows: list[tuple[Any, ...]], n: int) -> list[tuple[Any, ...]]:
    return list(zip(*rows, strict=True)) if rows else [() for _ in range(n)]


def _select(conn: Any, settings: ReportSettings) -> _Selection:
    # a trace left "running" by a writer that is gone (killed: same host, dead pid) is
    # stopped in fact: decided here at read time, without writing (store.is_stale)
    where = ["(t.status IN ('complete', 'stopped') OR (t.status = 'running' AND "
             "forkview_stale(t.host, t.pid)))"]
    args: list[Any] = []
    if not settings.branches:
        where.append("t.parent_trace_id IS NULL")
    if settings.sets:
        where.append(f"p.source_set IN ({', '.join('?' * len(settings.sets))})")
        args += list(settings.sets)
    rows = _fetch(conn, "SELECT t.id, t.model_id, t.correct, t.prompt_id, t.temperature, "
                  "t.top_p, t.top_k, t.think_start, t.think_end, t.answer_start, "
                  "t.n_tokens, t.parent_trace_id IS NULL FROM traces t "
                  "JOIN prompts p ON p.id = t.prompt_id WHERE " + " AND ".join(where)
                  + " ORDER BY t.id", tuple(args))
    (ids, model, correct, prompt, temp, top_p, top_k, t_start, t_end, a_start, n_tok,
     root) = _columns(rows, 12)
    return _Selection(np.array(ids, dtype=np.int64), np.array(model, dtype=np.int64),
                      [None if c is None else bool(c) for c in correct],
                      np.array(prompt, dtype=np.int64),
                      [sampling_label(float(t or 0), float(p if p is not None else 1),
                                      int(k or 0)) for t, p, k in zip(temp, top_p, top_k,
                                                                      strict=True)],
                      list(zip(t_start, t_end, a_start, n_tok, strict=True)),
                      [bool(r) for r in root])


def _span_bounds(sel: _Selection, span: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per selected trace, the positions [lo, hi) of `span` (lo = -1: the trace is left
    out), and why traces were left out (for the report's notes)."""
    n = len(sel.ids)
    lo, hi = np.zeros(n, dtype=np.int64), np.full(n, np.iinfo(np.int64).max)
    why: Counter[str] = Counter()
    for i, ((start, end, answer, n_tokens), root) in enumerate(zip(sel.think, sel.root,
                                                                    strict=True)):
        out = None
        if not root:
            out = "not a root (spans are stored for root traces only)"
        elif span == "think":
            if start is None:
                out = "without a thinking part"
            elif end <= start:
                out = "with an empty thinking part"
            else:
                lo[i], hi[i] = start, end
        elif start is not None:  # answer, after a thinking part
            if answer is None:
                out = "cut off while thinking (no answer)"
            elif answer >= n_tokens:
                out = "with nothing after the thinking part"
            else:
                lo[i] = answer
        if out is not None:
            lo[i] = -1
            why[out] += 1
    notes = [f"{k} {reason}" for reason, k in sorted(why.items(), key=lambda kv: (-kv[1],
                                                                                    kv[0]))]
    return lo, hi, notes


def _restrict(sel: _Selection, keep: np.ndarray) -> _Selection:
    idx = np.flatnonzero(keep).tolist()
    return _Selection(sel.ids[keep], sel.model[keep], [sel.correct[i] for i in idx],
                      sel.prompt[keep], [sel.setting[i] for i in idx],
                      [sel.think[i] for i in idx], [sel.root[i] for i in idx])


def _ids_clause(column: str, ids: np.ndarray, total: int) -> tuple[str, tuple[Any, ...]]:
    """A WHERE clause keeping `column` in `ids`, or none (filtered in numpy afterwards)
    when the ids are most of the table's."""
    if total and len(ids) >= _SCAN_SHARE * total:
        return "", ()
    return (f" WHERE {column} IN (SELECT value FROM json_each(?))",
            (json.dumps([int(i) for i in ids]),))


def _match_models(models: dict[int, tuple[str, str]], specs: tuple[str, ...]) -> set[int]:
    chosen: set[int] = set()
    for spec in specs:
        low = spec.lower()
        if spec.isdigit() and int(spec) in models:
            hit = {int(spec)}  # a number is a row id (not a substring of names)
        else:
            hit = {mid for mid, (name, mspec) in models.items()
                   if low in name.lower() or low in mspec.lower()}
        if not hit:
            have = "; ".join(f"{mid}: {name}" for mid, (name, _) in sorted(models.items()))
            raise ReportError(f"no model matches {spec!r} (models: {have or 'none'})",
                              usage=True)
        chosen |= hit
    return chosen


def _key(trace_id: np.ndarray, position: np.ndarray, span: int) -> np.ndarray:
    return trace_id.astype(np.int64) * span + position.astype(np.int64)


def build_report(store: Any, settings: ReportSettings, *,
                 database: str | None = None) -> Report:
    """The report over `store` (read only). Raises ReportError when nothing matches."""
    with _snapshot(store) as conn:
        return _build(conn, settings, database or Path(str(store.path)).name)


def _build(conn: Any, settings: ReportSettings, database: str) -> Report:
    if settings.by not in (None, "correct"):
        raise ReportError(f"unknown split {settings.by!r} (use correct)", usage=True)
    if settings.span not in SPANS:
        raise ReportError(f"unknown span {settings.span!r} (use {', '.join(SPANS)})",
                          usage=True)
    models = {int(r["id"]): (r["name"], r["spec"])
              for r in named_rows(conn, "SELECT id, name, spec FROM models")}
    wanted = _match_models(models, settings.models) if settings.models else set(models)
    sel = _select(conn, settings)
    if not len(sel.ids):
        what = f" in set(s) {', '.join(settings.sets)}" if settings.sets else ""
        raise ReportError(f"no finished traces{what} in {database}")
    span_notes: list[str] = []
    if settings.span != "all":
        # Only the span's positions are read on: E's threshold, the peaks, every
        # statistic and control see nothing else. Traces without it are left out.
        lo, hi, why = _span_bounds(sel, settings.span)
        keep = lo >= 0
        if why:
            out = counted(int((~keep).sum()), "trace")
            span_notes.append(f"--span {settings.span}: {out} left out: {'; '.join(why)}")
        sel, lo, hi = _restrict(sel, keep), lo[keep], hi[keep]
        if not len(sel.ids):
            raise ReportError(f"no selected trace of {database} has a "
                              f"{'thinking part' if settings.span == 'think' else 'answer'} "
                              f"(--span {settings.span}; " + "; ".join(why) + ")")
    gen_of = dict(zip(sel.ids.tolist(), sel.model.tolist(), strict=True))
    correct_of = dict(zip(sel.ids.tolist(), sel.correct, strict=True))
    prompt_of = dict(zip(sel.ids.tolist(), sel.prompt.tolist(), strict=True))
    setting_of = dict(zip(sel.ids.tolist(), sel.setting, strict=True))

    # ---- tokens of every selected trace (one read), keyed by (trace, position)
    total_traces = int(named_rows(conn, "SELECT COUNT(*) AS n FROM traces").fetchone()["n"])
    clause, args = _ids_clause("trace_id", sel.ids, total_traces)
    rows = _fetch(conn, "SELECT trace_id, position, entropy, text FROM tokens" + clause, args)
    tid, pos, ent, text = _columns(rows, 4)
    tid = np.array(tid, dtype=np.int64)
    pos = np.array(pos, dtype=np.int64)
    ent = np.array(ent, dtype=np.float64)
    if not clause and len(tid):
        keep = np.isin(tid, sel.ids)
        if not keep.all():
            tid, pos, ent = tid[keep], pos[keep], ent[keep]
            text = [text[i] for i in np.flatnonzero(keep)]
    if settings.span != "all" and len(tid):
        at = np.searchsorted(sel.ids, tid)
        keep = (pos >= lo[at]) & (pos < hi[at])
        tid, pos, ent = tid[keep], pos[keep], ent[keep]
        text = [text[i] for i in np.flatnonzero(keep)]
    span = int(pos.max()) + 8 if len(pos) else 8
    key = _key(tid, pos, span)
    order = np.argsort(key, kind="stable")
    key, tid, pos, ent = key[order], tid[order], pos[order], ent[order]
    text = [text[i] for i in order]
    gen = sel.model[np.searchsorted(sel.ids, tid)]  # generating model per token

    # ---- rescored entropies (token_scores), aligned with the tokens rows
    scores: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # model -> (token index, entropy)
    has_scores = _fetch(conn, "SELECT 1 FROM token_scores LIMIT 1")
    if has_scores and len(key):
        clause, args = _ids_clause("trace_id", sel.ids, total_traces)
        srows = _fetch(conn, "SELECT trace_id, model_id, position, entropy FROM token_scores"
                       + clause, args)
        s_tid, s_mod, s_pos, s_ent = (np.array(c) for c in _columns(srows, 4))
        if len(s_tid):
            s_key = _key(s_tid, s_pos, span)
            at = np.minimum(np.searchsorted(key, s_key), len(key) - 1)
            ok = (key[at] == s_key) & (s_mod != gen[at])  # a model's own scores: skip
            for m in np.unique(s_mod[ok]).tolist():
                pick = ok & (s_mod == m)
                idx = at[pick]
                srt = np.argsort(idx, kind="stable")
                scores[int(m)] = (idx[srt], s_ent[pick][srt].astype(np.float64))

    # ---- MI: the latest complete run per trace x estimator x model
    run_rows = _fetch(conn, "SELECT id, trace_id, estimator, params, model_id FROM mi_runs "
                      "WHERE status = 'complete' ORDER BY id")
    total_runs = len(run_rows)
    latest: dict[tuple[int, str, int], tuple[int, str]] = {}
    controls: dict[tuple[int, str, int], tuple[int, str]] = {}  # wrong-reference runs
    for rid, trace_id, est, params, mid in run_rows:
        if trace_id in gen_of:
            scorer = int(mid) if mid is not None else gen_of[trace_id]
            # a validity control (forkview mi --control) is never the trace's MI: it
            # rides along under the slot "<estimator>|<control>"
            decoded = json.loads(params)
            if "categories" in decoded:
                continue  # positions drawn per category: the counterfactual section's
            control = decoded.get("control")
            if control:
                controls[(int(trace_id), f"{est}|{control}", scorer)] = (int(rid), params)
            else:
                latest[(int(trace_id), est, scorer)] = (int(rid), params)
    available = sorted({k[1] for k in latest})
    if settings.estimators:
        missing = [e for e in settings.estimators if e not in available]
        if missing:
            raise ReportError(
                f"no complete MI runs for estimator {', '.join(map(repr, missing))} in the "
                f"selected traces (found: {', '.join(available) or 'none'})", usage=True)
        estimators = [e for e in available if e in settings.estimators]
    else:
        estimators = available
    chosen = {k: v for k, v in latest.items() if k[1] in estimators}
    chosen.update({k: v for k, v in controls.items() if k[1].split("|")[0] in estimators})
    mi_by: dict[tuple[str, int], np.ndarray] = {}  # (estimator, model) -> values per token
    no_choice_by: dict[tuple[str, int], int] = {}  # rollout positions left out
    runs_used: dict[tuple[str, int], Counter[str]] = {}
    if chosen and len(key):
        run_ids = np.array(sorted(v[0] for v in chosen.values()), dtype=np.int64)
        clause, args = _ids_clause("run_id", run_ids, total_runs)
        vrows = _fetch(conn, "SELECT run_id, position, value FROM mi_values" + clause, args)
        v_run, v_pos, v_val = _columns(vrows, 3)
        v_run = np.array(v_run, dtype=np.int64)
        v_pos = np.array(v_pos, dtype=np.int64)
        v_val = np.array(v_val, dtype=np.float64)  # NULL -> NaN
        if not clause and len(v_run):
            keep = np.isin(v_run, run_ids)
            v_run, v_pos, v_val = v_run[keep], v_pos[keep], v_val[keep]
        # run -> (trace, slot): slot numbers each (estimator, model) pair
        slots = sorted({(k[1], k[2]) for k in chosen})
        slot_of = {s: i for i, s in enumerate(slots)}
        lut_trace = np.zeros(int(run_ids.max()) + 1, dtype=np.int64)
        lut_slot = np.full(int(run_ids.max()) + 1, -1, dtype=np.int64)
        for (trace_id, est, scorer), (rid, params) in chosen.items():
            lut_trace[rid] = trace_id
            lut_slot[rid] = slot_of[(est, scorer)]
            if "|" not in est:
                runs_used.setdefault((est, scorer), Counter())[params] += 1
        v_key = _key(lut_trace[v_run], v_pos, span)
        at = np.minimum(np.searchsorted(key, v_key), len(key) - 1)
        found = (key[at] == v_key) & (v_pos < span)
        # rollout positions where a single token passed min_prob: I_t = 0 by
        # construction, not a measurement (models/rollout.py, "No choice"): left out
        rollout_runs = [v[0] for k, v in chosen.items() if k[1] == "rollout"]
        no_choice = np.zeros(len(v_run), dtype=bool)
        if rollout_runs:
            nc = _fetch(conn, "SELECT run_id, position FROM mi_values WHERE run_id IN "
                        "(SELECT value FROM json_each(?)) AND "
                        "json_extract(detail, '$.no_choice') = 1",
                        (json.dumps(rollout_runs),))
            if nc:
                nc_key = {(int(r), int(p)) for r, p in nc}
                no_choice = np.array([(int(r), int(p)) in nc_key
                                      for r, p in zip(v_run, v_pos, strict=True)])
        for s, i in slot_of.items():
            pick = found & (lut_slot[v_run] == i)
            arr = np.full(len(key), np.nan)
            arr[at[pick]] = np.where(no_choice[pick], np.nan, v_val[pick])
            mi_by[s] = arr
            no_choice_by[s] = int((pick & no_choice).sum())

    # ---- per model
    scorer_ids = sorted(m for m in set(gen.tolist()) | set(scores) if m in wanted)
    if not scorer_ids:
        raise ReportError("no tokens of the selected model(s) in the selected traces")
    summaries: list[ModelSummary] = []
    rows_out: list[ReportRow] = []
    strata_out: list[ReportRow] = []  # one per sampling setting, where there are several
    views: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # model -> (token index, entropy)
    for m in scorer_ids:
        own = np.flatnonzero(gen == m)
        if m in scores:
            idx = np.concatenate([own, scores[m][0]])
            e = np.concatenate([ent[own], scores[m][1]])
            srt = np.argsort(idx, kind="stable")
            idx, e = idx[srt], e[srt]
        else:
            idx, e = own, ent[own]
        views[m] = (idx, e)
        t_ids = tid[idx]
        t_local, kept = ov.compact(t_ids)
        high, thr = ov.high_entropy_mask(e, t_local, settings.entropy)
        per_trace = settings.entropy.scope == "trace"
        name = models.get(m, (f"model {m}", ""))
        summaries.append(ModelSummary(
            id=m, name=name[0], spec=name[1], n_traces=len(kept), n_tokens=len(idx),
            generated=len(np.unique(tid[own])), rescored=len(kept) - len(np.unique(tid[own])),
            entropy=ov.entropy_summary(e), histogram=ov.histogram(e),
            n_high=int(high.sum()),
            threshold=None if per_trace or not np.isfinite(thr) else float(thr),
            thresholds_median=float(np.nanmedian(thr)) if per_trace and len(thr) else None,
        ))
        groups = {"all": np.ones(len(idx), dtype=bool)}
        if settings.by == "correct":
            labels = np.array([_group(correct_of[t]) for t in kept.tolist()])[t_local]
            for g in GROUP_ORDER[1:]:
                if (labels == g).any():
                    groups[g] = labels == g
        texts = [text[i] for i in idx]
        cluster_of_trace = np.array([prompt_of[t] for t in kept.tolist()], dtype=np.int64)
        setting_labels = np.array([setting_of[t] for t in kept.tolist()])[t_local]
        settings_here = sorted(set(setting_labels.tolist()))
        if len(settings_here) > 1:
            for label in settings_here:
                groups[f"setting: {label}"] = setting_labels == label
        for est in estimators:
            mi = mi_by.get((est, m))
            if mi is None:
                continue
            mi = mi[idx]
            for g, gmask in groups.items():
                sub = np.flatnonzero(gmask)
                gt, gk = ov.compact(t_local[sub])
                res = ov.analyse(
                    gt, pos[idx][sub], e[sub], mi[sub], high[sub], settings.peaks,
                    trace_ids=kept[gk].tolist() if len(gk) else [],
                    texts=[texts[i] for i in sub] if len(sub) < len(idx) else texts,
                    bootstrap=settings.bootstrap, null=settings.null, seed=settings.seed,
                    top_tokens=settings.top_tokens, cluster=cluster_of_trace[gk],
                    refit=settings.entropy.scope == "corpus")
                if not res.n_positions:
                    continue
                runs = [{"params": json.loads(p), "traces": n}
                        for p, n in sorted(runs_used[(est, m)].items(),
                                           key=lambda kv: (-kv[1], kv[0]))]
                # the row's traces: those with an MI value of this estimator
                with_mi = np.unique(gt[np.isfinite(mi[sub])])
                in_row = np.isin(gt, with_mi)
                row = ReportRow(m, name[0], est, g, runs, res)
                row.settings = sorted(set(setting_labels[sub][in_row].tolist()))
                row.positions_total = int(in_row.sum())
                row.no_choice = no_choice_by.get((est, m), 0) if g == "all" else 0
                (strata_out if g.startswith("setting: ") else rows_out).append(row)

    comparisons = _comparisons(scorer_ids, views, mi_by, estimators, tid, settings, models)
    between, ref_controls = _estimator_checks(scorer_ids, views, mi_by, estimators, tid,
                                              settings, models)
    notes = list(span_notes)
    if not estimators:
        notes.append("no complete MI runs on the selected traces: entropy only")
    cf_positions = cf.read_positions(conn, sel.ids.tolist(), prompt_of, gen_of)
    if settings.span != "all":
        bounds = {t: (a, b) for t, a, b in zip(sel.ids.tolist(), lo.tolist(), hi.tolist(),
                                                strict=True)}
        cf_positions = [c for c in cf_positions
                        if bounds[c.trace_id][0] <= c.position < bounds[c.trace_id][1]]
    report = Report(settings=settings, version=forkview_version(), database=database,
                    n_traces=len(sel.ids), models=summaries, rows=rows_out,
                    comparisons=comparisons, notes=notes, strata=strata_out,
                    between_estimators=between, reference_controls=ref_controls,
                    counterfactual=cf.analyse(
                        cf_positions, {m: v[0] for m, v in models.items()},
                        bootstrap=settings.bootstrap, seed=settings.seed))
    conclude(report)
    return report


PRIMARY_ENDPOINT = {
    "statistic": inf.PRIMARY_STATISTIC,
    "definition": "per model x estimator: the Mantel-Haenszel odds ratio of E x P over "
                  f"trace x relative-position-bin strata ({inf.POSITION_BINS} bins), over "
                  "all selected traces (sampling settings pooled only through these "
                  "per-trace strata)",
    "interval": "95% percentile bootstrap over prompts (E's corpus threshold refitted in "
                "each resample)",
    "null": inf.PRIMARY_NULL,
    "multiplicity": "Holm across the report's primary endpoints; every other p-value is "
                    "secondary, Benjamini-Hochberg across all of them",
    "verdict": "enriched / depleted when the Holm-adjusted p < 0.05 and the interval "
               "excludes 1; otherwise no evidence",
}
# A shift keeps |E|, |P| and n, so these share one p-value (counted as one test).
_SET_STATS = ("precision", "recall", "jaccard", "odds_ratio", "lift")


def conclude(report: Report) -> None:
    """Adjust for multiplicity and write the verdicts. Primary endpoints (group "all":
    one per model x estimator) are Holm-adjusted among themselves; every other p-value
    in the report (the raw statistics' shift nulls, the controls, the splits and the
    sampling strata) is secondary and Benjamini-Hochberg-adjusted as one family."""
    primaries = report.primary_rows
    held = inf.adjust([_pnum(r.result.primary.get("p_two_sided")) for r in primaries],
                      "holm")
    for r, p in zip(primaries, held, strict=True):
        r.result.primary["adjusted_p"] = inf.finite_or_none(p)
    # the secondary family: one test each, with the places its adjusted p goes to (a
    # dict's "adjusted_p" or an Estimate's p_adj)
    family: list[tuple[list[Any], float]] = []
    for r in report.rows + report.strata:
        res = r.result
        if r.group != "all":
            family.append(([res.primary], _pnum(res.primary.get("p_two_sided"))))
        # the set statistics share one shift-null test (_SET_STATS)
        family.append(([res.stats[k] for k in _SET_STATS], _pnum(res.stats["jaccard"].p)))
        family += [([res.stats[k]], _pnum(res.stats[k].p)) for k in ("spearman", "auroc")]
        family += [([c], _pnum(c.get("p_two_sided"))) for c in res.controls.values()]
    for crow in report.counterfactual:
        family += [([d], _pnum(d.get("p_two_sided"))) for d in crow.differences.values()]
    adjusted = inf.adjust([p for _, p in family], "fdr_bh")
    for (targets, _), v in zip(family, adjusted, strict=True):
        for target in targets:
            if isinstance(target, dict):
                target["adjusted_p"] = inf.finite_or_none(v)
            else:
                target.p_adj = inf.finite_or_none(v)
    for crow in report.counterfactual:  # its sentence quotes the adjusted p
        crow.sentence = cf.sentence(crow)
    n_settings = sorted({s for r in report.rows for s in r.settings})
    for r in primaries:
        r.verdict = inf.verdict(
            _pnum(r.result.primary.get("estimate")),
            (_pnum(r.result.primary["ci"][0]), _pnum(r.result.primary["ci"][1])),
            _pnum(r.result.primary.get("adjusted_p")),
            label=f"{r.model} · {r.estimator}", clusters=r.result.n_clusters,
            caveats=_caveats(r, n_settings, lambda row: [
                c for c in report.reference_controls
                if c["model_id"] == row.model_id and c["estimator"] == row.estimator]))


def _pnum(v: Any) -> float:
    return math.nan if v is None else float(v)


def _caveats(r: ReportRow, all_settings: list[str],
             report_controls: Callable[[ReportRow], list[dict[str, Any]]]) -> list[str]:
    res = r.result
    out = []
    if len(r.settings) > 1:
        out.append(f"sampling settings mixed ({', '.join(r.settings)}): pooled only through "
                   "per-trace strata; each setting is reported on its own under Strata")
    if r.positions_total and res.n_positions < r.positions_total:
        out.append(f"MI measured at {res.n_positions:,} of {r.positions_total:,} positions: "
                   "E and P are compared among those positions only, which were chosen by "
                   "the estimator's position rule, not at random")
    if r.no_choice:
        out.append(f"{r.no_choice:,} rollout positions left out as 'no choice' (a single "
                   "token passes min_prob, so I_t = 0 by construction, not by measurement)")
    raw = res.stats["odds_ratio"]
    prim_p = res.primary.get("adjusted_p")
    if (raw.p_adj is not None and raw.p_adj < inf.ALPHA
            and (prim_p is None or prim_p >= inf.ALPHA)):
        out.append(f"the raw pooled odds ratio ({raw.value:.2f}, shift-null p adjusted "
                   f"{raw.p_adj:.4f}) does not survive the per-trace position control")
    sp, part = res.stats["spearman"], res.controls.get("spearman_partial_position", {})
    if (sp.p_adj is not None and sp.p_adj < inf.ALPHA and part.get("adjusted_p") is not None
            and part["adjusted_p"] >= inf.ALPHA):
        est = part.get("estimate") or 0.0
        how = "shrinks to" if abs(est) < 0.5 * abs(sp.value) else "is"
        out.append(f"the raw Spearman ρ ({sp.value:.3f}) {how} {est:.3f} with position removed, "
                   f"not significant (adjusted p {part['adjusted_p']:.4f})")
    both = res.controls.get("mh_trace_position_class", {})
    if (r.verdict is None and prim_p is not None and prim_p < inf.ALPHA
            and both.get("adjusted_p") is not None and both["adjusted_p"] >= inf.ALPHA):
        top = ", ".join(token_repr(t) for t, _ in res.tokens.get("peak", [])[:4])
        out.append(f"it does not survive the token-class control as well (MH OR "
                   f"{both.get('estimate') or math.nan:.2f} within trace × position × token "
                   f"class, adjusted p {both['adjusted_p']:.4f}): it goes with which kinds of "
                   f"token are peaks" + (f" (most frequent P tokens: {top})" if top else ""))
    for c in report_controls(r):
        if c["not_reference_specific"]:
            out.append(f"not reference-specific: with another prompt's reference the series "
                       f"correlates {c['series_spearman']:.2f} with the real one and "
                       f"{c['a_in_b']:.0%} of its peaks stay (chance "
                       f"{(c['a_in_b_chance'] or 0):.0%}): it measures something other "
                       "than information about the answer")
    if inf.MIN_CLUSTERS <= res.n_clusters < 10:
        out.append(f"only {res.n_clusters} prompts: the bootstrap interval is rough")
    return out


def _group(correct: bool | None) -> str:
    return "unknown" if correct is None else ("correct" if correct else "incorrect")


def _comparisons(scorer_ids: list[int], views: dict[int, tuple[np.ndarray, np.ndarray]],
                 mi_by: dict[tuple[str, int], np.ndarray], estimators: list[str],
                 tid: np.ndarray, settings: ReportSettings,
                 models: dict[int, tuple[str, str]]) -> list[dict[str, Any]]:
    """Every pair of models that scored some of the same tokens."""
    out = []
    for i, a in enumerate(scorer_ids):
        for b in scorer_ids[i + 1:]:
            ia, ea = views[a]
            ib, eb = views[b]
            common, pa, pb = np.intersect1d(ia, ib, assume_unique=True, return_indices=True)
            if not len(common):
                continue
            t_local, _ = ov.compact(tid[common])
            base = {"model_a": models.get(a, (str(a),))[0], "model_b": models.get(b, (str(b),))[0],
                    "model_a_id": a, "model_b_id": b}
            agree = ov.agreement_by_trace(t_local, ea[pa], eb[pb], kind="entropy",
                                          rule=settings.entropy)
            out.append({**base, "what": "entropy", "rule": settings.entropy.label, **agree})
            for est in estimators:
                ma, mb = mi_by.get((est, a)), mi_by.get((est, b))
                if ma is None or mb is None:
                    continue
                agree = ov.agreement_by_trace(t_local, ma[common], mb[common], kind="peaks",
                                              rule=settings.peaks)
                if agree["n_positions"]:
                    out.append({**base, "what": f"peaks: {est}", "rule": settings.peaks.label,
                                **agree})
    return out


CONTROL_KINDS = ("wrong-reference", "bandwidth")  # forkview mi --control
# An estimator is flagged as not reference-specific when, with another prompt's
# reference, its series still correlates this much with the real one and this share of
# its peaks stays put (hsic on sample_db: 0.98-0.99, science.md §6).
REFERENCE_FLAG = {"spearman": 0.9, "peaks_kept": 0.5}


def _estimator_checks(scorer_ids: list[int], views: dict[int, tuple[np.ndarray, np.ndarray]],
                      mi_by: dict[tuple[str, int], np.ndarray], estimators: list[str],
                      tid: np.ndarray, settings: ReportSettings,
                      models: dict[int, tuple[str, str]]
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Agreement between estimators' peaks (same model, same tokens) and each
    estimator's wrong-reference control, both against chance within traces."""
    between, controls = [], []

    def sets(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> tuple[Any, ...] | None:
        ok = np.isfinite(x[idx]) & np.isfinite(y[idx])
        if not ok.any():
            return None
        t, _ = ov.compact(tid[idx][ok])
        n_tr = int(t.max()) + 1
        return (t, n_tr, x[idx][ok], y[idx][ok],
                ov.peak_mask(x[idx][ok], t, settings.peaks),
                ov.peak_mask(y[idx][ok], t, settings.peaks))

    for m in scorer_ids:
        idx = views[m][0]
        name = models.get(m, (f"model {m}",))[0]
        have = [e for e in estimators if (e, m) in mi_by]
        for i, a in enumerate(have):
            for b in have[i + 1:]:
                got = sets(mi_by[(a, m)], mi_by[(b, m)], idx)
                if got is None:
                    continue
                t, n_tr, _, _, pa, pb = got
                between.append({"model": name, "model_id": m, "a": a, "b": b,
                                "n_traces": n_tr, **inf.set_association(pa, pb, t, n_tr)})
            for control in CONTROL_KINDS:
                variant = mi_by.get((f"{a}|{control}", m))
                got = None if variant is None else sets(mi_by[(a, m)], variant, idx)
                if got is None:
                    continue
                t, n_tr, right_v, other_v, pa, pb = got
                rho = ov.spearman_per_trace(right_v, other_v, t, n_tr)
                assoc = inf.set_association(pa, pb, t, n_tr)
                mean_rho = float(np.nanmean(rho)) if np.isfinite(rho).any() else math.nan
                kept = assoc["a_in_b"]
                same = bool(math.isfinite(mean_rho) and mean_rho >= REFERENCE_FLAG["spearman"]
                            and kept is not None and kept >= REFERENCE_FLAG["peaks_kept"])
                controls.append({
                    "model": name, "model_id": m, "estimator": a, "control": control,
                    "n_traces": n_tr, "series_spearman": mean_rho, **assoc,
                    # wrong reference: the same series is a failure (not about the answer);
                    # bandwidth: it is robustness (peaks do not hang on sigma)
                    "not_reference_specific": same if control == "wrong-reference" else None,
                    "bandwidth_robust": same if control == "bandwidth" else None,
                    "rule": f"'same' when the series' mean per-trace Spearman ≥ "
                            f"{REFERENCE_FLAG['spearman']:g} and ≥ "
                            f"{REFERENCE_FLAG['peaks_kept']:.0%} of the peaks stay"})
    return between, controls


def report_options(store: Any) -> dict[str, list[Any]]:
    """What the filters can choose from: models [(id, name)], sets, estimators."""
    with _snapshot(store) as conn:
        models = [(int(r["id"]), r["name"])
                  for r in named_rows(conn, "SELECT id, name FROM models ORDER BY id")]
        sets = [r["source_set"] for r in named_rows(
            conn, "SELECT DISTINCT source_set FROM prompts WHERE source_set IS NOT NULL "
            "ORDER BY source_set")]
        ests = [r["estimator"] for r in named_rows(
            conn, "SELECT DISTINCT estimator FROM mi_runs WHERE status = 'complete' "
            "ORDER BY estimator")]
    return {"models": models, "sets": sets, "estimators": ests}


# ====================================================================== formatting
STAT_LABELS = {
    "precision": "precision |E∩P|/|P|",
    "recall": "recall |E∩P|/|E|",
    "jaccard": "Jaccard |E∩P|/|E∪P|",
    "odds_ratio": "odds ratio (E × P)",
    "lift": "lift (precision / base rate)",
    "base_rate": "base rate |E|/n",
    "spearman": "Spearman ρ(H, MI), mean per trace",
    "auroc": "AUROC of H for P",
}
SHARED_P = ("Precision, recall, Jaccard, odds ratio and lift share one p-value (one test): "
            "a shift keeps |E|, |P| and n, so each is a function of |E∩P| alone. p-values "
            "are two-sided; tail: the side of the null the observed value lies on.")
PRIMARY_TEXT = (
    "Stated before any number: per model × estimator, the Mantel-Haenszel odds ratio of E "
    f"× P over trace × relative-position-bin strata ({inf.POSITION_BINS} bins), so a "
    "token is compared only with tokens of the same trace at a similar place in it; "
    "greedy and sampled traces are never pooled except through these strata. 95% "
    "interval: percentile bootstrap over prompts, E's threshold refitted in each resample. "
    "p: Cochran-Mantel-Haenszel test (null: P independent of E within each stratum), "
    "two-sided, Holm-adjusted across the primary endpoints. Verdict: enriched or depleted "
    "only when the adjusted p < 0.05 and the interval excludes 1. Everything else in the "
    "report is secondary (Benjamini-Hochberg across all secondary tests).")
TABLE_NAMES = {"high": "E", "peak": "P", "both": "E∩P", "peak_only": "P only",
               "high_only": "E only"}


def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, (float, np.floating)) and math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{v:.{digits}f}"


def fmt_ci(est: ov.Estimate, digits: int = 3) -> str:
    if est.lo is None or est.hi is None or not (math.isfinite(est.lo)
                                                and math.isfinite(est.hi)):
        return "—"
    return f"[{est.lo:.{digits}f}, {est.hi:.{digits}f}]"


def _digits(name: str) -> int:
    return 2 if name in ("odds_ratio", "lift") else 3


ENTROPY_HEADERS = ["model", "traces", "tokens", "mean", "median", "q0.8", "q0.9", "q0.99",
                   "< 0.01 nats", "≥ 0.672", "E threshold", "|E|"]
LAG_HEADERS = ["lag", "pairs", "precision", "95% CI", "Jaccard", "95% CI"]


def _entropy_rows(report: Any, escape: Callable[[str], str]) -> list[list[str]]:
    """One row per model of the entropy table (model names escaped for the format)."""
    rows = []
    for m in report.models:
        q = m.entropy.get("quantiles", {})
        thr = m.threshold if m.threshold is not None else m.thresholds_median
        rows.append([escape(m.name), fmt(m.n_traces), fmt(m.n_tokens), fmt(m.entropy["mean"]),
                     *(fmt(q.get(k)) for k in ("0.5", "0.8", "0.9", "0.99")),
                     fmt(m.entropy["fraction_below"]), fmt(m.entropy["fraction_above_wang"]),
                     fmt(thr), fmt(m.n_high)])
    return rows


def fmt_p2(p: float | None) -> str:
    """A p-value: 4 decimals, "< 0.0001" below that."""
    if p is None or not math.isfinite(p):
        return "—"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def fmt_interval(ci: Any, digits: int = 2) -> str:
    """[lo, hi]; an odds ratio's end may be 0 or ∞ (every resample without, or with
    only, concordant pairs)."""
    lo, hi = (ci or [None, None])[:2]
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return "—"
    return f"[{fmt(float(lo), digits)}, {fmt(float(hi), digits)}]"


PRIMARY_HEADERS = ["model", "estimator", "traces", "prompts", "positions", "|E∩P|",
                   "expected (trace)", "expected (trace × position)", "OR (MH)", "95% CI",
                   "p (two-sided)", "p (Holm)", "verdict"]


def _primary_table(report: Report, escape: Callable[[str], str]) -> list[list[str]]:
    rows = []
    for r in report.primary_rows:
        res, prim = r.result, r.result.primary
        ch = res.inference.get("chance", {})
        rows.append([escape(r.model), escape(r.estimator), fmt(res.n_traces),
                     fmt(res.n_clusters), fmt(res.n_positions), fmt(res.n_both),
                     _expected(ch.get("within_trace_expected_overlap"),
                               ch.get("within_trace_null_sd")),
                     _expected(prim.get("null_mean_overlap"), prim.get("null_sd_overlap")),
                     fmt(prim.get("estimate"), 2), fmt_interval(prim.get("ci")),
                     fmt_p2(prim.get("p_two_sided")), fmt_p2(prim.get("adjusted_p")),
                     escape(r.verdict.word if r.verdict else "—")])
    return rows


def _expected(mean: float | None, sd: float | None) -> str:
    if mean is None or not math.isfinite(mean):
        return "—"
    return f"{mean:.1f} ± {sd:.1f}" if sd is not None and math.isfinite(sd) else f"{mean:.1f}"


CONTROL_HEADERS = ["statistic", "control", "estimate", "95% CI", "|E∩P| expected under null",
                   "p (two-sided)", "tail", "p (adjusted)", "null"]
_CONTROL_LABELS = {
    "mh_trace": ("odds ratio (MH)", "within trace"),
    "mh_trace_position": ("odds ratio (MH)", "within trace × position bin (primary)"),
    "mh_trace_class": ("odds ratio (MH)", "within trace × token class"),
    "mh_trace_position_class": ("odds ratio (MH)", "within trace × position × token class"),
    "spearman_partial_position": ("Spearman ρ(H, MI)", "position removed (partial, per trace)"),
    "auroc_within_trace": ("AUROC of H for P", "within trace (mean over traces)"),
}


def control_rows(res: ov.OverlapResult) -> list[list[str]]:
    """Raw statistics and their controlled versions side by side: what each control
    removes is the difference between consecutive rows."""
    st, ctl = res.stats, res.controls
    shift = "circular shift of MI within each trace"
    pooled = res.n_high * res.n_peaks / res.n_positions if res.n_positions else math.nan
    rows = [["odds ratio (pooled 2×2)", "none (raw)", fmt(st["odds_ratio"].value, 2),
             fmt_ci(st["odds_ratio"], 2), _expected(pooled, None),
             fmt_p2(st["odds_ratio"].p), st["odds_ratio"].tail or "—",
             fmt_p2(st["odds_ratio"].p_adj), shift]]
    for key in ("mh_trace", "mh_trace_position", "mh_trace_class", "mh_trace_position_class"):
        c = ctl.get(key)
        if not c:
            continue
        tail = "—"
        if c.get("observed") is not None and c.get("expected") is not None:
            tail = "upper" if c["observed"] >= c["expected"] else "lower"
        rows.append([*_CONTROL_LABELS[key], fmt(c.get("estimate"), 2), fmt_interval(c.get("ci")),
                     _expected(c.get("expected"), c.get("null_sd")),
                     fmt_p2(c.get("p_two_sided")), tail, fmt_p2(c.get("adjusted_p")),
                     c["null"]])
    for raw, key in (("spearman", "spearman_partial_position"),
                     ("auroc", "auroc_within_trace")):
        e = st[raw]
        rows.append([STAT_LABELS[raw], "none (raw)" if raw == "spearman" else
                     "none (pooled over traces)", fmt(e.value), fmt_ci(e), "—",
                     fmt_p2(e.p), e.tail or "—", fmt_p2(e.p_adj), shift])
        c = ctl.get(key, {})
        rows.append([*_CONTROL_LABELS[key], fmt(c.get("estimate")),
                     fmt_interval(c.get("ci"), 3), "—", fmt_p2(c.get("p_two_sided")), "—",
                     fmt_p2(c.get("adjusted_p")), c.get("null", "—")])
    return rows


STRATA_HEADERS = ["model", "estimator", "sampling", "traces", "positions", "|E|", "|P|",
                  "|E∩P|", "expected (trace × position)", "OR (MH)", "95% CI",
                  "p (two-sided)", "p (BH)"]


def _strata_rows(report: Report, escape: Callable[[str], str]) -> list[list[str]]:
    rows = []
    for r in report.strata:
        res, prim = r.result, r.result.primary
        rows.append([escape(r.model), escape(r.estimator),
                     escape(r.group.removeprefix("setting: ")), fmt(res.n_traces),
                     fmt(res.n_positions), fmt(res.n_high), fmt(res.n_peaks), fmt(res.n_both),
                     _expected(prim.get("null_mean_overlap"), prim.get("null_sd_overlap")),
                     fmt(prim.get("estimate"), 2), fmt_interval(prim.get("ci")),
                     fmt_p2(prim.get("p_two_sided")), fmt_p2(prim.get("adjusted_p"))])
    return rows


BETWEEN_HEADERS = ["model", "peaks A", "peaks B", "traces", "positions", "|A|", "|B|",
                   "|A∩B|", "expected", "A in B", "chance", "OR (MH)", "95% CI",
                   "p (two-sided)"]
REFERENCE_HEADERS = ["model", "estimator", "control", "traces", "series ρ (real vs control)",
                     "peaks kept", "chance", "OR (MH)", "p (two-sided)", "reading"]


def _between_rows(report: Report, escape: Callable[[str], str]) -> list[list[str]]:
    return [[escape(c["model"]), escape(c["a"]), escape(c["b"]), fmt(c["n_traces"]),
             fmt(c["n_positions"]), fmt(c["n_a"]), fmt(c["n_b"]), fmt(c["n_both"]),
             fmt(c["expected_both"], 1), fmt(c["a_in_b"]), fmt(c["a_in_b_chance"]),
             fmt(c["odds_ratio"], 2), fmt_interval(c["ci"]), fmt_p2(c["p_two_sided"])]
            for c in report.between_estimators]


def _reference_rows(report: Report, escape: Callable[[str], str]) -> list[list[str]]:
    return [[escape(c["model"]), escape(c["estimator"]), escape(c["control"]),
             fmt(c["n_traces"]), fmt(c["series_spearman"]), fmt(c["a_in_b"]),
             fmt(c["a_in_b_chance"]), fmt(c["odds_ratio"], 2), fmt_p2(c["p_two_sided"]),
             _reading(c)] for c in report.reference_controls]


def _reading(c: dict[str, Any]) -> str:
    if c["control"] == "wrong-reference":
        return ("not reference-specific (flagged)" if c["not_reference_specific"]
                else "depends on the reference")
    return "robust to σ" if c["bandwidth_robust"] else "sensitive to σ"


BETWEEN_TEXT = ("Peaks of two estimators over the positions both scored: A in B is the "
                "share of A's peaks that are also B's, chance the share expected if the two "
                "were independent within each trace (secondary, not adjusted).")
REFERENCE_TEXT = ("Each estimator scored again with one thing changed (`forkview mi "
                  "--control`): wrong-reference, another prompt's reference (an estimator "
                  "of information about the answer must change when the answer does); "
                  "bandwidth (hsic), the other bandwidth rule (σ = 50 or the median "
                  "heuristic). Series ρ: mean per-trace Spearman between the real and the "
                  "control series; peaks kept: share of the real run's peaks that are also "
                  "the control's, beside its chance level. 'Same' (flagged for the wrong "
                  f"reference, robust for σ) when ρ ≥ {REFERENCE_FLAG['spearman']:g} and ≥ "
                  f"{REFERENCE_FLAG['peaks_kept']:.0%} of the peaks stay.")


CF_HEADERS = ["category", "positions", "importance", "95% CI", "P(answer changes)",
              "95% CI", "TV", "accuracy change"]
CF_DIFF_HEADERS = ["comparison", "importance difference", "95% CI", "p (two-sided)",
                   "p (BH)", "detectable (80%)", "P(change) ratio", "95% CI"]
CF_TEXT = ("At positions drawn per category (`forkview mi --estimator rollout --positions "
           "categories`): importance = P(answer after redrawing the token differs from the "
           "answer after keeping it) minus the same for two continuations after the kept "
           "token; TV: total variation between the two outcome distributions. Means over "
           "positions, 95% bootstrap over prompts; differences against the matched controls "
           "(same relative-position bin and token class), two-sided bootstrap p, "
           "Benjamini-Hochberg with the report's other secondary tests.")


def _cf_rows(row: cf.CounterfactualRow) -> list[list[str]]:
    out = []
    for c in cf.CATEGORIES:
        d = row.categories.get(c, {})

        def m(key: str, d: dict[str, Any] = d) -> dict[str, Any]:
            return d.get(key) or {}

        out.append([cf.CATEGORY_LABELS[c], fmt(d.get("n_positions", 0)),
                    fmt(m("importance").get("mean")), fmt_interval(m("importance").get("ci"), 3),
                    fmt(m("p_change").get("mean")), fmt_interval(m("p_change").get("ci"), 3),
                    fmt(m("tv").get("mean")), fmt(m("accuracy_change").get("mean"))])
    return out


def _cf_diff_rows(row: cf.CounterfactualRow) -> list[list[str]]:
    return [[f"{cf.CATEGORY_LABELS[c]} − control", fmt(d.get("estimate")),
             fmt_interval(d.get("ci"), 3), fmt_p2(d.get("p_two_sided")),
             fmt_p2(d.get("adjusted_p")), fmt(d.get("detectable_80")),
             fmt(d.get("p_change_ratio"), 2), fmt_interval(d.get("p_change_ratio_ci"))]
            for c, d in row.differences.items()]


def _chance_line(res: ov.OverlapResult) -> str:
    """The observed overlap beside what independence within traces would give."""
    exp = res.expected_both
    if not math.isfinite(exp) or not res.n_peaks:
        return ""
    ch = res.inference.get("chance", {})
    sd = ch.get("within_trace_null_sd")
    lift = res.n_both / exp if exp > 0 else math.nan
    return (f"|E∩P| = {res.n_both:,} against {_expected(exp, sd)} expected if E and P "
            f"were independent within each trace (chance precision "
            f"{exp / res.n_peaks:.3f}, lift over it {fmt(lift, 2)}); the pooled base rate "
            f"|E|/n = {fmt(res.stats['base_rate'].value)} is no chance level when traces' "
            "E rates differ.")


def _lag_rows(res: Any) -> list[list[str]]:
    return [[f"{row['lag']:+d}", fmt(row["pairs"]), fmt(row["precision"]),
             _ci(row["precision_lo"], row["precision_hi"]), fmt(row["jaccard"]),
             _ci(row["jaccard_lo"], row["jaccard_hi"])] for row in res.lags]


def _token_rows(res: Any, cell: Callable[[str, int], str]) -> list[list[str]]:
    """The token tables side by side: row i holds the i-th most frequent token of each
    set (E, P, E∩P, P only, E only), blank where a set has fewer."""
    names = list(TABLE_NAMES)
    depth = max((len(res.tokens.get(n, [])) for n in names), default=0)
    return [[cell(*res.tokens[n][i]) if i < len(res.tokens.get(n, [])) else ""
             for n in names] for i in range(depth)]


def token_repr(text: str) -> str:
    """A token as a JSON string literal: quotes show spaces, "\\n" shows newlines (the
    form MI-Peaks' lists use)."""
    return json.dumps(text, ensure_ascii=False)


def span_words(report: Report) -> str:
    """The header's note of a restricted span ("" for the whole response)."""
    s = report.settings.span
    if s == "all":
        return ""
    return f", {'thinking part' if s == 'think' else 'answer'} only (--span {s})"


def settings_lines(report: Report) -> list[tuple[str, str]]:
    s = report.settings
    e = s.entropy
    e_text = e.label + (f" (scope {e.scope}, ρ = {e.rho:g})" if e.scope != "threshold"
                        else " (fixed threshold)")
    f = s.to_json()["filters"]
    return [
        ("forkview version", report.version),
        ("database", report.database),
        ("traces", f"{f['traces']}, finished (complete or stopped); "
                   f"sets: {', '.join(s.sets) or 'all'}; models: {', '.join(s.models) or 'all'}"),
        *([("span", f"{s.span}: {SPAN_TEXT[s.span]}; E's threshold and the peaks are "
                    "fitted over these positions")] if s.span != "all" else []),
        ("high-entropy set E", e_text),
        ("peak set P", f"{s.peaks.label}: {s.peaks.definition}, per trace"),
        ("MI", "latest complete run per trace × estimator × model; positions without an MI "
               "value left out of MI statistics"),
        ("95% intervals", f"bootstrap over prompts (a prompt's traces together), "
                          f"{s.bootstrap} resamples, seed {s.seed}, percentile method; the "
                          "primary endpoint refits E's threshold in each resample, the "
                          "secondary statistics hold it and the peaks as in the full sample; "
                          "resamples where a statistic is undefined are counted and left "
                          "out"),
        ("null (raw statistics)", f"MI circularly shifted within each trace, {s.null} shifts, "
                                  f"seed {s.seed}; p two-sided = min(1, 2 × the smaller of "
                                  "(1 + #null ≥ observed) / (1 + shifts) and its ≤ twin)"),
        ("null (controls)", "P independent of E within strata (trace; trace × position bin; "
                            "× token class): Cochran-Mantel-Haenszel, two-sided; partial "
                            "Spearman and within-trace AUROC: t-test over prompt means"),
        ("multiplicity", "Holm across primary endpoints; Benjamini-Hochberg across all "
                         "secondary p-values of the report"),
        ("split", "by answer correctness" if s.by == "correct" else "none"),
    ]


# ---------------------------------------------------------------------- markdown
def _md(text: str) -> str:
    """Plain text safe inside a Markdown table cell: pipes and backslashes escaped, and
    "<" written as an entity so no tag (e.g. a `<script>` in a model's name) survives a
    Markdown-to-HTML renderer."""
    return (str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
            .replace("`", "\\`").replace("<", "&lt;"))


def _md_code(text: str) -> str:
    """Text as a code span in a table cell: literal inside (no escapes, no HTML), so only
    the cell's pipes need escaping, and the fence must be longer than any run of
    backticks inside."""
    fence = "`" * (max((len(r) for r in re.findall("`+", text)), default=0) + 1)
    body = text.replace("|", "\\|").replace("\n", " ")
    pad = " " if body.startswith("`") or body.endswith("`") else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def _md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
           "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render_markdown(report: Report) -> str:
    L: list[str] = ["# forkview overlap report", ""]
    L += [f"High-entropy tokens (E) against MI peaks (P), per model × estimator, over "
          f"{counted(report.n_traces, 'trace')} of `{_md(report.database)}`"
          f"{span_words(report)}. forkview {report.version}.", ""]
    if report.primary_rows:
        L += ["## Verdict", ""]
        for r in report.primary_rows:
            assert r.verdict is not None
            L += [f"- **{_md(r.verdict.word)}**: {_md(r.verdict.sentence)}"]
            L += [f"  - caveat: {_md(c)}" for c in r.verdict.caveats]
        L += ["", "## Primary endpoint", "", _md(PRIMARY_TEXT), ""]
        L += _md_table(PRIMARY_HEADERS, _primary_table(report, _md), "ll" + "r" * 10 + "l")
        L += [""]
    L += ["## Settings", ""]
    L += _md_table(["setting", "value"], [[k, _md(v)] for k, v in settings_lines(report)], "ll")
    for note in report.notes:
        L += ["", f"Note: {_md(note)}"]
    L += ["", "## Entropy", ""]
    L += _md_table(ENTROPY_HEADERS, _entropy_rows(report, _md))
    L += ["", "Entropies in nats (full vocabulary, T = 1). Quantiles: linear interpolation. "
          "\"< 0.01 nats\" and \"≥ 0.672\": fractions of tokens (Wang et al.: over half, "
          "and 20%). E threshold: the entropy at which E starts"
          + (" (median over traces)." if report.settings.entropy.scope == "trace" else ".")]
    if report.rows:
        L += ["", "## Overlap summary", ""]
        rows = []
        for r in report.rows:
            s = r.result.stats
            rows.append([_md(r.model), _md(r.estimator), r.group, fmt(r.result.n_traces),
                         fmt(r.result.n_positions), fmt(r.result.peak_rate["mean"]),
                         *(fmt(s[k].value, _digits(k)) for k in
                           ("precision", "recall", "jaccard", "odds_ratio", "base_rate",
                            "spearman", "auroc"))])
        L += _md_table(["model", "estimator", "group", "traces", "positions", "peak rate",
                        "precision", "recall", "Jaccard", "odds ratio", "base rate",
                        "Spearman", "AUROC"], rows, "lll" + "r" * 10)
        L += ["", "positions: tokens with an MI value (the only ones MI statistics use); "
              "peak rate: mean over traces of |P|/n."]
    if report.strata:
        L += ["", "## Strata: sampling settings", "",
              "Each sampling setting on its own (secondary; Benjamini-Hochberg adjusted)."]
        L += ["", *_md_table(STRATA_HEADERS, _strata_rows(report, _md), "lll" + "r" * 10)]
    if report.reference_controls:
        L += ["", "## Estimator validity: reference and bandwidth controls", "",
              _md(REFERENCE_TEXT), ""]
        L += _md_table(REFERENCE_HEADERS, _reference_rows(report, _md), "lll" + "r" * 6 + "l")
    if report.counterfactual:
        L += ["", "## Counterfactual: does the answer move when a token is redrawn?", "",
              _md(CF_TEXT)]
        for crow in report.counterfactual:
            L += ["", f"**{_md(crow.model)} · peaks from {_md(crow.peaks_from)}** "
                  f"({counted(crow.n_traces, 'trace')}, {counted(crow.n_prompts, 'prompt')}). "
                  f"{_md(crow.sentence)}", ""]
            L += _md_table(CF_HEADERS, _cf_rows(crow))
            L += ["", *_md_table(CF_DIFF_HEADERS, _cf_diff_rows(crow))]
    if report.between_estimators:
        L += ["", "## Between estimators (same model, same tokens)", "", _md(BETWEEN_TEXT), ""]
        L += _md_table(BETWEEN_HEADERS, _between_rows(report, _md), "lll" + "r" * 11)
    for r in report.rows:
        L += _md_row(r)
    if report.comparisons:
        L += ["", "## Between models (same tokens)", ""]
        rows = [[_md(c["model_a"]), _md(c["model_b"]), _md(c["what"]), fmt(c["n_traces"]),
                 fmt(c["n_positions"]), fmt(c["n_a"]), fmt(c["n_b"]), fmt(c["jaccard"]),
                 fmt(c["a_in_b"]), fmt(c["b_in_a"])] for c in report.comparisons]
        L += _md_table(["model A", "model B", "sets", "traces", "positions", "|A|", "|B|",
                        "Jaccard", "A in B", "B in A"], rows, "lll" + "r" * 7)
        L += ["", "A in B: the share of A's positions that are also in B's (the 80/20 paper "
              "reports > 86% for its base and RL-trained models' top-20% entropy positions)."]
    return "\n".join(L) + "\n"


def _md_row(r: ReportRow) -> list[str]:
    res = r.result
    L = ["", f"## {_md(r.model)} · {_md(r.estimator)} · {r.group}", ""]
    runs = "; ".join(f"{_md(json.dumps(p['params'], sort_keys=True))} ({p['traces']} traces)"
                     for p in r.params)
    L += [f"{counted(res.n_traces, 'trace')}, {res.n_positions:,} positions with MI, |E| = "
          f"{res.n_high:,}, |P| = {res.n_peaks:,}, |E∩P| = {res.n_both:,}; Spearman over "
          f"{res.spearman_traces:,} traces; runs: {runs or '—'}.", ""]
    chance = _chance_line(res)
    if chance:
        L += [_md(chance), ""]
    L += ["Controls (raw and controlled side by side):", ""]
    L += _md_table(CONTROL_HEADERS, [[_md(c) for c in row] for row in control_rows(res)],
                   "ll" + "r" * 6 + "l")
    L += ["", "Raw statistics (secondary):", ""]
    L += _md_table(STAT_HEADERS, [[_md(c) for c in row] for row in _stat_rows(res)])
    L += ["", SHARED_P]
    L += ["", "Lag profile (E at t, P at t + lag):", ""]
    L += _md_table(LAG_HEADERS, _lag_rows(res))
    if res.tokens:
        L += ["", "Most frequent tokens:", ""]
        rows = _token_rows(res, lambda text, n: f"{_md_code(token_repr(text))} {n}")
        L += _md_table(list(TABLE_NAMES.values()), rows, "lllll")
    return L


STAT_HEADERS = ["statistic", "value", "95% CI", "null mean ± sd", "p (two-sided)", "tail",
                "p (BH)"]


def _stat_rows(res: ov.OverlapResult) -> list[list[str]]:
    rows = []
    for name in ov.STAT_NAMES:
        est = res.stats[name]
        d = _digits(name)
        rows.append([STAT_LABELS[name], fmt(est.value, d), fmt_ci(est, d),
                     _null_text(est, d), fmt_p2(est.p), est.tail or "—", fmt_p2(est.p_adj)])
    return rows


def _null_text(est: ov.Estimate, digits: int) -> str:
    if est.null_mean is None or not math.isfinite(est.null_mean):
        return "—"
    sd = est.null_sd if est.null_sd is not None and math.isfinite(est.null_sd) else math.nan
    return f"{est.null_mean:.{digits}f} ± {sd:.{digits}f}"


def _ci(lo: float, hi: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "—"
    return f"[{lo:.3f}, {hi:.3f}]"


# ---------------------------------------------------------------------- JSON and CSV
def render_json(report: Report) -> str:
    return json.dumps(_clean(report.to_json()), ensure_ascii=False, indent=1) + "\n"


def _clean(obj: Any) -> Any:
    """NaN / inf -> null and numpy scalars -> Python: strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


CSV_SETTINGS = ("entropy_scope", "rho", "entropy_threshold", "peak_rule", "peak_param",
                "bootstrap", "null", "seed", "traces", "sets", "forkview_version", "database")
CSV_SPAN = "span"  # a column only when the report is restricted (--span think|answer)


def render_csv(report: Report) -> str:
    """One row per model × estimator (× group), every statistic with its interval and
    p-value, the lag profile, and the settings repeated on each row."""
    s = report.settings
    fields = ["model", "model_id", "estimator", "group", "n_traces", "n_positions", "n_high",
              "n_peaks", "n_both", "spearman_traces", "peak_rate_mean"]
    for name in ov.STAT_NAMES:
        fields += [name, f"{name}_lo", f"{name}_hi", f"{name}_p", f"{name}_p_adjusted"]
    for lag in ov.LAGS:
        fields += [f"lag{lag:+d}_precision", f"lag{lag:+d}_jaccard"]
    fields += list(CSV_PRIMARY) + list(CSV_SETTINGS)
    if s.span != "all":
        fields.append(CSV_SPAN)
    settings = {"entropy_scope": s.entropy.scope, "rho": s.entropy.rho,
                "entropy_threshold": s.entropy.threshold, "peak_rule": s.peaks.name,
                "peak_param": s.peaks.param, "bootstrap": s.bootstrap, "null": s.null,
                "seed": s.seed, "traces": "roots and branches" if s.branches else "roots",
                "sets": ";".join(s.sets), "forkview_version": report.version,
                "database": report.database}
    if s.span != "all":
        settings[CSV_SPAN] = s.span
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in report.rows + report.strata:
        res = r.result
        row: dict[str, Any] = {
            "model": r.model, "model_id": r.model_id, "estimator": r.estimator,
            "group": r.group, "n_traces": res.n_traces, "n_positions": res.n_positions,
            "n_high": res.n_high, "n_peaks": res.n_peaks, "n_both": res.n_both,
            "spearman_traces": res.spearman_traces,
            "peak_rate_mean": _csv_num(res.peak_rate["mean"])}
        for name in ov.STAT_NAMES:
            est = res.stats[name]
            row.update({name: _csv_num(est.value), f"{name}_lo": _csv_num(est.lo),
                        f"{name}_hi": _csv_num(est.hi), f"{name}_p": _csv_num(est.p)})
            row[f"{name}_p_adjusted"] = _csv_num(est.p_adj)
        for lag in res.lags:
            row[f"lag{lag['lag']:+d}_precision"] = _csv_num(lag["precision"])
            row[f"lag{lag['lag']:+d}_jaccard"] = _csv_num(lag["jaccard"])
        prim, ctl = res.primary, res.controls
        row.update({
            "expected_both_within_trace": _csv_num(res.expected_both),
            "primary_statistic": prim.get("statistic", ""),
            "primary_estimate": _csv_num(prim.get("estimate")),
            "primary_lo": _csv_num((prim.get("ci") or [None])[0]),
            "primary_hi": _csv_num((prim.get("ci") or [None, None])[1]),
            "primary_p_two_sided": _csv_num(prim.get("p_two_sided")),
            "primary_p_adjusted": _csv_num(prim.get("adjusted_p")),
            "verdict": r.verdict.word if r.verdict else "",
            **{f"{k}_estimate": _csv_num(ctl.get(k, {}).get("estimate")) for k in CONTROL_KEYS},
            **{f"{k}_p_two_sided": _csv_num(ctl.get(k, {}).get("p_two_sided"))
               for k in CONTROL_KEYS},
        })
        row.update(settings)
        w.writerow(row)
    return buf.getvalue()


CONTROL_KEYS = ("mh_trace", "mh_trace_position", "mh_trace_class", "mh_trace_position_class",
                "spearman_partial_position", "auroc_within_trace")
CSV_PRIMARY = ("expected_both_within_trace", "primary_statistic", "primary_estimate",
               "primary_lo", "primary_hi", "primary_p_two_sided", "primary_p_adjusted",
               "verdict", *(f"{k}_estimate" for k in CONTROL_KEYS),
               *(f"{k}_p_two_sided" for k in CONTROL_KEYS))


def _csv_num(v: float | None) -> Any:
    return "" if v is None or not math.isfinite(v) else repr(float(v))


# ---------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l,th.l{text-align:left}
code{background:#f4f4f4;padding:0 .2em;white-space:pre}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0}
figcaption{font-size:.8em;color:#555;max-width:420px}
.note{color:#555;font-size:.9em}
.plots svg{max-width:100%;height:auto}
"""


def _e(text: Any) -> str:
    """Escaped for HTML text and attribute values alike."""
    return html.escape(str(text), quote=True)


def _html_table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    def cell(tag: str, i: int, v: str) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{v}</{tag}>"

    out = ["<table><tr>" + "".join(cell("th", i, _e(h)) for i, h in enumerate(header))
           + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_html(report: Report) -> str:
    """A self-contained page: inline CSS and SVG, no script, every text escaped."""
    P: list[str] = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                    f"<title>forkview overlap report: {_e(report.database)}</title>",
                    f"<style>{CSS}</style></head><body>",
                    "<h1>forkview overlap report</h1>",
                    f"<p>High-entropy tokens (E) against MI peaks (P), per model × estimator, "
                    f"over {counted(report.n_traces, 'trace')} of "
                    f"<code>{_e(report.database)}</code>{_e(span_words(report))}. "
                    f"forkview {_e(report.version)}.</p>",
                    ]
    if report.primary_rows:
        P.append("<h2>Verdict</h2><ul>")
        for r in report.primary_rows:
            assert r.verdict is not None
            cav = "".join(f"<li>caveat: {_e(c)}</li>" for c in r.verdict.caveats)
            P.append(f"<li><strong>{_e(r.verdict.word)}</strong>: {_e(r.verdict.sentence)}"
                     + (f"<ul>{cav}</ul>" if cav else "") + "</li>")
        P.append("</ul><h2>Primary endpoint</h2>")
        P.append(f"<p>{_e(PRIMARY_TEXT)}</p>")
        P.append(_html_table(PRIMARY_HEADERS, [[_e(c) if i < 2 or i == 12 else c
                                                for i, c in enumerate(row)]
                                               for row in _primary_table(report, str)],
                             left=2))
    P.append("<h2>Settings</h2>")
    P.append(_html_table(["setting", "value"], [[_e(k), _e(v)] for k, v in
                                                settings_lines(report)], left=2))
    for note in report.notes:
        P.append(f'<p class="note">Note: {_e(note)}</p>')
    P.append("<h2>Entropy</h2>")
    P.append(_html_table(ENTROPY_HEADERS, _entropy_rows(report, _e)))
    P.append('<div class="plots">')
    for m in report.models:
        P.append("<figure>" + figs.inline_svg(figs.entropy_histogram(m))
                 + f"<figcaption>Entropy of {_e(m.name)}'s tokens ({m.n_tokens:,}); the last "
                   "bin holds everything above the 99.5th percentile.</figcaption></figure>")
    if report.primary_rows:
        P.append("<figure>" + figs.inline_svg(figs.forest(report))
                 + "<figcaption>The primary endpoints: odds ratio of E × P within trace × "
                   "position bin with 95% bootstrap intervals over prompts (log scale; "
                   "dashed: no association).</figcaption></figure>")
    P.append("</div>")
    if report.rows:
        P.append("<h2>Overlap summary</h2>")
        rows = []
        for r in report.rows:
            s = r.result.stats
            rows.append([_e(r.model), _e(r.estimator), _e(r.group), fmt(r.result.n_traces),
                         fmt(r.result.n_positions), fmt(r.result.peak_rate["mean"]),
                         *(fmt(s[k].value, _digits(k)) for k in
                           ("precision", "recall", "jaccard", "odds_ratio", "base_rate",
                            "spearman", "auroc"))])
        P.append(_html_table(["model", "estimator", "group", "traces", "positions",
                              "peak rate", "precision", "recall", "Jaccard", "odds ratio",
                              "base rate", "Spearman", "AUROC"], rows, left=3))
    if report.strata:
        P.append("<h2>Strata: sampling settings</h2>")
        P.append('<p class="note">Each sampling setting on its own (secondary; '
                 "Benjamini-Hochberg adjusted).</p>")
        P.append(_html_table(STRATA_HEADERS, [[_e(c) for c in row] for row in
                                              _strata_rows(report, str)], left=3))
    if report.reference_controls:
        P.append("<h2>Estimator validity: reference and bandwidth controls</h2>")
        P.append(f'<p class="note">{_e(REFERENCE_TEXT)}</p>')
        P.append(_html_table(REFERENCE_HEADERS, [[_e(c) for c in row] for row in
                                                 _reference_rows(report, str)], left=3))
    if report.counterfactual:
        P.append("<h2>Counterfactual: does the answer move when a token is redrawn?</h2>")
        P.append(f'<p class="note">{_e(CF_TEXT)}</p>')
        for crow in report.counterfactual:
            P.append(f"<h3>{_e(crow.model)} · peaks from {_e(crow.peaks_from)}</h3>"
                     f"<p>{counted(crow.n_traces, 'trace')}, "
                     f"{counted(crow.n_prompts, 'prompt')}. "
                     f"{_e(crow.sentence)}</p>")
            P.append(_html_table(CF_HEADERS, [[_e(c) for c in r] for r in _cf_rows(crow)]))
            P.append(_html_table(CF_DIFF_HEADERS, [[_e(c) for c in r]
                                                   for r in _cf_diff_rows(crow)]))
            P.append("<figure>" + figs.inline_svg(figs.counterfactual(crow))
                     + "<figcaption>Mean importance per category with 95% bootstrap "
                       "intervals over prompts.</figcaption></figure>")
    if report.between_estimators:
        P.append("<h2>Between estimators (same model, same tokens)</h2>")
        P.append(f'<p class="note">{_e(BETWEEN_TEXT)}</p>')
        P.append(_html_table(BETWEEN_HEADERS, [[_e(c) for c in row] for row in
                                               _between_rows(report, str)], left=3))
    for r in report.rows:
        P += _html_row(r)
    if report.comparisons:
        P.append("<h2>Between models (same tokens)</h2>")
        rows = [[_e(c["model_a"]), _e(c["model_b"]), _e(c["what"]), fmt(c["n_traces"]),
                 fmt(c["n_positions"]), fmt(c["n_a"]), fmt(c["n_b"]), fmt(c["jaccard"]),
                 fmt(c["a_in_b"]), fmt(c["b_in_a"])] for c in report.comparisons]
        P.append(_html_table(["model A", "model B", "sets", "traces", "positions", "|A|",
                              "|B|", "Jaccard", "A in B", "B in A"], rows, left=3))
        P.append('<p class="note">A in B: the share of A\'s positions also in B\'s (the 80/20 '
                 "paper reports &gt; 86% for its base and RL-trained models' top-20% "
                 "entropy positions).</p>")
    P.append("</body></html>")
    return "\n".join(P) + "\n"


def _html_row(r: ReportRow) -> list[str]:
    res = r.result
    runs = "; ".join(f"<code>{_e(json.dumps(p['params'], sort_keys=True))}</code> "
                     f"({p['traces']} traces)" for p in r.params)
    P = [f"<h2>{_e(r.model)} · {_e(r.estimator)} · {_e(r.group)}</h2>",
         f"<p>{counted(res.n_traces, 'trace')}, {res.n_positions:,} positions with MI, |E| = "
         f"{res.n_high:,}, |P| = {res.n_peaks:,}, |E∩P| = {res.n_both:,}; Spearman over "
         f"{res.spearman_traces:,} traces; runs: {runs or '—'}.</p>"]
    chance = _chance_line(res)
    if chance:
        P.append(f"<p>{_e(chance)}</p>")
    P.append("<h3>Controls (raw and controlled side by side)</h3>")
    P.append(_html_table(CONTROL_HEADERS, [[_e(c) for c in row] for row in control_rows(res)],
                         left=2))
    P.append("<h3>Raw statistics (secondary)</h3>")
    P.append(_html_table(STAT_HEADERS, [[_e(c) for c in row] for row in _stat_rows(res)]))
    P.append(f'<p class="note">{_e(SHARED_P)}</p>')
    P.append('<div class="plots">')
    for make, caption in (
            (figs.density, "Tokens by entropy and MI (count per cell, log colour scale; axes "
                           "span the 0.5–99.5th percentiles, outliers in the edge cells)."),
            (figs.position_profile, "Mean entropy (blue, left axis) and mean MI (orange, "
                                    "right axis) by relative position in the trace: a trend "
                                    "both share makes them correlate without any link at the "
                                    "same token; the position control compares tokens only "
                                    "within the same bin."),
            (figs.lag_profile, "Overlap of E at t with P at t + lag, 95% bootstrap "
                               "intervals; dashed: the base rate |E|/n."),
            (figs.roc, "ROC of entropy as a detector of P, pooled over tokens (its chance "
                       "level is not the diagonal when traces' E rates differ: see the "
                       "within-trace AUROC among the controls)."),
            (figs.null_distribution, "The pooled odds ratio under circular shifts of MI "
                                     "within each trace, with the observed value."),
            (figs.jaccard_histogram, "Per-trace Jaccard of E and P.")):
        P.append("<figure>" + figs.inline_svg(make(r)) + f"<figcaption>{_e(caption)}"
                 "</figcaption></figure>")
    P.append("</div>")
    P.append("<h3>Lag profile</h3>")
    P.append(_html_table(LAG_HEADERS, _lag_rows(res)))
    if res.tokens:
        P.append("<h3>Most frequent tokens</h3>")
        rows = _token_rows(res, lambda text, n: f"<code>{_e(token_repr(text))}</code> {n}")
        P.append(_html_table(list(TABLE_NAMES.values()), rows, left=5))
    return P


# ---------------------------------------------------------------------- LaTeX
def _tex(text: Any) -> str:
    """Plain text safe in LaTeX (special characters escaped, unicode symbols in math)."""
    out = str(text)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"),
                 ("#", r"\#"), ("_", r"\_"), ("{", r"\{"), ("}", r"\}"),
                 ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")):
        out = out.replace(a, b)
    for a, b in (("∩", r"$\cap$"), ("×", r"$\times$"), ("±", r"$\pm$"), ("≥", r"$\geq$"),
                 ("−", "--"), ("—", "---"), ("ρ", r"$\rho$"), ("σ", r"$\sigma$"),
                 ("∞", r"$\infty$"), ("<", r"$<$"), ("★", r"$\star$"), ("|", r"$|$")):
        out = out.replace(a, b)
    return out


def _tex_table(header: list[str], rows: list[list[str]], caption: str, label: str,
               align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    return [r"\begin{table}[t]", r"\centering", r"\small",
            rf"\caption{{{_tex(caption)}}}", rf"\label{{tab:{label}}}",
            rf"\begin{{tabular}}{{{align}}}", r"\toprule",
            " & ".join(_tex(h) for h in header) + r" \\", r"\midrule",
            *[" & ".join(_tex(c) for c in r) + r" \\" for r in rows],
            r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]


def render_latex(report: Report) -> str:
    """booktabs tables (\\usepackage{booktabs}) to paste into a paper: the primary
    endpoints, each row's controls, the sampling strata and the counterfactual test;
    the settings as a comment block."""
    L = [f"% forkview {report.version} overlap report of {report.database}: "
         f"{counted(report.n_traces, 'trace')}{span_words(report)}",
         "% needs \\usepackage{booktabs}"]
    L += [f"% {k}: {v}" for k, v in settings_lines(report)]
    L += [""]
    if report.primary_rows:
        L += _tex_table(PRIMARY_HEADERS, _primary_table(report, str),
                        "Primary endpoints: Mantel-Haenszel odds ratio of high-entropy tokens "
                        "(E) and MI peaks (P) within trace and relative-position bin; 95% "
                        "bootstrap interval over prompts; two-sided CMH p, Holm-adjusted.",
                        "primary", "ll" + "r" * 10 + "l")
    for r in report.primary_rows:
        L += _tex_table(CONTROL_HEADERS[:-1], [row[:-1] for row in control_rows(r.result)],
                        f"{r.model}, {r.estimator}: raw and controlled statistics.",
                        f"controls-{re.sub('[^a-z0-9]+', '-', r.estimator.lower())}",
                        "ll" + "r" * 6)
    if report.strata:
        L += _tex_table(STRATA_HEADERS, _strata_rows(report, str),
                        "Each sampling setting on its own (secondary).", "strata",
                        "lll" + "r" * 10)
    for c in report.counterfactual:
        L += _tex_table(CF_HEADERS, _cf_rows(c), f"Counterfactual test, {c.model}, peaks "
                        f"from {c.peaks_from}. {c.sentence}",
                        f"counterfactual-{re.sub('[^a-z0-9]+', '-', c.peaks_from.lower())}")
    return "\n".join(L) + "\n"


RENDERERS = {"md": render_markdown, "html": render_html, "json": render_json,
             "csv": render_csv, "latex": render_latex}
