"""Position categories of one trace for the counterfactual test (issue 10): which tokens
to redraw. No torch, no Textual.

For one trace, from its per-position entropy and the MI series of a stored run of
another estimator (``peaks_run``: the latest complete run of that estimator on the
trace, control runs and runs with another model left out):

- E, the high-entropy set: ``high_entropy_mask`` with ``EntropyRule(scope="trace")``,
  the top rho (20%) of this trace's tokens by entropy, ties included. A corpus-level
  threshold (Wang et al.'s per-batch rule, the report's default) needs the whole
  selection, which one trace does not have: the draw says so (``entropy_rule``).
- P, the MI peaks: ``peak_mask`` under a ``PeakRule`` (default Tukey, tau = 1.5), on
  the positions that have a finite MI value; only those positions are classified
  (positions without one can be neither peak nor control), and relative-position bins
  count them as the report does (``position_bins``: the k-th of the n used positions).
- Categories: "e_only" (E and not P), "p_only" (P and not E), "both" (E and P), and
  "control": positions in neither set, matched to the selected ones.

Draw (seeded by ``numpy`` Generator(SeedSequence([seed, trace_id]))): up to K
positions of each of e_only, p_only and both, uniformly without replacement; then, for
each selected position in category order (e_only, p_only, both) and position order,
one control drawn (without replacement) from the unused neither-positions of the same
cell (relative-position bin x ``token_class``), else of the same bin, else of any bin;
none when no neither-position is left. Each control records its partner and how it was
matched ("cell", "bin", "any").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from forkview.analysis.inference import POSITION_BINS, position_bins, token_class
from forkview.analysis.overlap import EntropyRule, high_entropy_mask, peak_mask
from forkview.analysis.peaks import RULES, TUKEY, PeakRule

if TYPE_CHECKING:
    from store import Store
    from store.db import MIRunInfo

CATEGORIES = ("e_only", "p_only", "both", "control")
MATCHES = ("cell", "bin", "any")
TRACE_ENTROPY = EntropyRule(scope="trace")


def peak_rule(name: str = "tukey", param: float | None = None) -> PeakRule:
    """A PeakRule by name, with its default parameter (tukey 1.5, topk 20, topr 0.2)."""
    defaults = {r.name: r.param for r in RULES}
    if name not in defaults:
        raise ValueError(f"unknown peak rule {name!r} (use {', '.join(defaults)})")
    return PeakRule(name, defaults[name] if param is None else float(param))


@dataclass
class Match:
    partner: int  # the selected E / P position this control is matched to
    how: str  # cell (same bin and token class) | bin (same bin) | any


@dataclass
class CategoryDraw:
    """The positions to redraw in one trace, their categories and how they were drawn."""

    trace_id: int
    positions: list[int]  # every selected position, sorted
    categories: dict[int, str]  # position -> e_only | p_only | both | control
    matches: dict[int, Match]  # control position -> its partner and how it matched
    per_category: int
    seed: int
    peak_rule: PeakRule
    entropy_rule: EntropyRule
    peaks_from: str | None = None  # estimator whose MI gave P
    peaks_run_id: int | None = None  # the run it came from
    available: dict[str, int] = field(default_factory=dict)  # positions per category
    unmatched: list[int] = field(default_factory=list)  # selected, no control left

    def of(self, category: str) -> list[int]:
        return sorted(p for p, c in self.categories.items() if c == category)

    def params(self) -> dict[str, Any]:
        """The compact record stored in the run's params (a different draw is a
        different run): K, seed, source run, rules, and the positions of each category
        with controls as [position, partner, how]."""
        out: dict[str, Any] = {
            "k": self.per_category, "seed": self.seed,
            "peaks_from": self.peaks_from, "peaks_run": self.peaks_run_id,
            "peak_rule": self.peak_rule.name, "peak_param": self.peak_rule.param,
            "entropy": {"scope": self.entropy_rule.scope, "rho": self.entropy_rule.rho},
        }
        for cat in CATEGORIES[:3]:
            out[cat] = self.of(cat)
        out["control"] = [[p, self.matches[p].partner, self.matches[p].how]
                          for p in self.of("control")]
        return out


def _finite(v: float | None) -> bool:
    return v is not None and not (isinstance(v, float) and (math.isnan(v) or math.isinf(v)))


def draw_categories(
    entropies: Sequence[float],
    mi: Mapping[int, float | None],
    texts: Sequence[str],
    *,
    per_category: int,
    seed: int = 0,
    trace_id: int = 0,
    rule: PeakRule = TUKEY,
    entropy_rule: EntropyRule = TRACE_ENTROPY,
    peaks_from: str | None = None,
    peaks_run_id: int | None = None,
    bins: int = POSITION_BINS,
) -> CategoryDraw:
    """Classify the trace's positions and draw K of each category plus matched
    controls (module doc). ``mi``: position -> value of the peaks run; ``texts``: each
    position's token text (for ``token_class``)."""
    n = len(entropies)
    if len(texts) != n:
        raise ValueError(f"{len(texts)} token texts for {n} positions")
    if per_category < 1:
        raise ValueError(f"per_category must be at least 1, not {per_category}")
    ent = np.asarray(entropies, dtype=np.float64)
    zeros = np.zeros(n, dtype=np.int64)
    high, _ = high_entropy_mask(ent, zeros, entropy_rule)
    used = np.array([p for p in range(n) if _finite(mi.get(p))], dtype=np.int64)
    values = np.array([float(mi[int(p)]) for p in used], dtype=np.float64)  # type: ignore[arg-type]
    peak = np.zeros(n, dtype=bool)
    if len(used):
        peak[used] = peak_mask(values, np.zeros(len(used), dtype=np.int64), rule)
    pbin = np.full(n, -1, dtype=np.int64)
    if len(used):
        pbin[used] = position_bins(np.zeros(len(used), dtype=np.int64), 1, bins)
    cls = [token_class(t) for t in texts]
    pools: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    for p in used.tolist():
        e, k = bool(high[p]), bool(peak[p])
        cat = "both" if e and k else "e_only" if e else "p_only" if k else "control"
        pools[cat].append(p)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(trace_id)]))
    categories: dict[int, str] = {}
    for cat in CATEGORIES[:3]:
        pool = pools[cat]
        take = min(per_category, len(pool))
        if take:
            for p in rng.choice(pool, size=take, replace=False).tolist():
                categories[int(p)] = cat
    free = list(pools["control"])  # neither-positions not yet used as controls
    matches: dict[int, Match] = {}
    unmatched: list[int] = []
    for cat in CATEGORIES[:3]:
        for p in sorted(q for q, c in categories.items() if c == cat):
            chosen = None
            for how, ok in (("cell", lambda q, p=p: pbin[q] == pbin[p] and cls[q] == cls[p]),
                            ("bin", lambda q, p=p: pbin[q] == pbin[p]),
                            ("any", lambda q: True)):
                cands = [q for q in free if ok(q)]
                if cands:
                    chosen = (int(cands[int(rng.integers(len(cands)))]), how)
                    break
            if chosen is None:
                unmatched.append(p)
                continue
            q, how = chosen
            free.remove(q)
            matches[q] = Match(partner=p, how=how)
    for q in matches:
        categories[q] = "control"
    return CategoryDraw(
        trace_id=int(trace_id), positions=sorted(categories), categories=categories,
        matches=matches, per_category=int(per_category), seed=int(seed), peak_rule=rule,
        entropy_rule=entropy_rule, peaks_from=peaks_from, peaks_run_id=peaks_run_id,
        available={c: len(v) for c, v in pools.items()}, unmatched=unmatched,
    )


def peaks_run(store: Store, trace_id: int, estimator: str) -> MIRunInfo | None:
    """The run P comes from: the latest complete run of ``estimator`` on the trace
    whose params mark neither a control ("control") nor another model ("model"); None
    if there is none."""
    runs = [r for r in store.mi_runs(trace_id)
            if r.estimator == estimator and r.status == "complete"
            and "control" not in r.params and "model" not in r.params]
    return runs[-1] if runs else None


def draw_for_trace(store: Store, trace_id: int, peaks_from: str, *, per_category: int,
                   seed: int = 0, rule: PeakRule = TUKEY) -> CategoryDraw | None:
    """``draw_categories`` on a stored trace (a branch: its whole response), P from
    ``peaks_run``; None when the trace has no such run."""
    run = peaks_run(store, trace_id, peaks_from)
    if run is None:
        return None
    tokens = store.full_tokens(trace_id)
    return draw_categories(
        [t.entropy for t in tokens], store.mi_values(run.id), [t.text for t in tokens],
        per_category=per_category, seed=seed, trace_id=trace_id, rule=rule,
        peaks_from=peaks_from, peaks_run_id=run.id,
    )
