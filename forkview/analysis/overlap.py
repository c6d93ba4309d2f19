"""Do the high-entropy tokens coincide with the MI peaks? The statistics, in numpy.

Everything works on flat arrays, one element per token, sorted by (trace, position),
with `trace` a trace index 0..T-1 (see `trace_bounds`). A report of half a million
tokens is then a few dozen vectorised passes, never a Python loop over tokens.

Definitions (../shared/science.md §1, §2 and §5):

- E, the high-entropy set (`high_entropy_mask`): the top rho of tokens by entropy,
  over all tokens of the selection ("corpus", one threshold, as Wang et al. select per
  batch) or within each trace ("trace"); or every token at or above a fixed threshold
  (e.g. 0.672 nats, Wang et al.'s 80th percentile). "Top rho" keeps the
  ceil(rho * n)-th largest value and everything tied with it, like the explorer's
  high-entropy marks.
- P, the peak set (`peak_mask`): per trace, by the rules of forkview/analysis/peaks.py
  (Tukey's fence Q3 + tau * IQR, the top k, the top rho), vectorised; the tests check
  it against `find_peaks` position for position.
- Positions whose MI is missing (None / NaN / inf: not computed there, e.g. a
  stratified rollout) are left out of every statistic that involves MI; the number of
  positions used is reported beside them. E keeps its threshold from all tokens.
- Overlap of E and P over the positions used: precision |E∩P|/|P|, recall |E∩P|/|E|,
  Jaccard |E∩P|/|E∪P|, base rate |E|/n (the precision E would have by chance), lift
  precision / base rate, and the odds
  ratio of the 2x2 table (E x P), pooled over traces (sums of per-trace counts).
- Rank correlation: Spearman's rho of entropy and MI within each trace (average ranks
  for ties), averaged over traces.
- AUROC of entropy as a detector of P, pooled over tokens (Mann-Whitney; a tie between a
  peak and a non-peak counts one half).
- Lag profile: E at t against P at t + lag, lag in -3..+3, pairs within a trace only (no
  wrap-around) and both positions used. Positive lag: the peak comes after the token.
- Null (`shift_null`): MI circularly shifted within each trace by a random offset,
  the statistic recomputed; two-sided p = min(1, 2 min(p_upper, p_lower)) with
  p_upper = (1 + #{null >= observed}) / (1 + iterations), and the tail and the null's
  mean and spread beside it. A shift keeps each trace's sets and sizes but not where
  along the trace they fall: a trend both series share survives it only in part, so
  these raw statistics are secondary; the position-controlled ones and the primary
  endpoint are in forkview/analysis/inference.py.
- Intervals (`bootstrap_weights`, `percentile_interval`): 95% percentile intervals
  from resampling prompts (all samples of a prompt together; `cluster`), or traces
  when no prompt is given.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forkview.analysis.inference import cluster_weights, infer, token_class_codes
from forkview.analysis.inference import finite_or_none as _num
from forkview.analysis.peaks import PeakRule
from models.high_entropy import HIGH_ENTROPY_FRACTION, top_count

# Wang et al.'s 80th percentile of Qwen3-8B's token entropy (nats): "forking" above it.
WANG_THRESHOLD = 0.672
LOW_ENTROPY = 0.01  # "over half of all tokens have H < 0.01" (Wang et al.)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 0.99)
LAGS = tuple(range(-3, 4))
SCOPES = ("corpus", "trace", "threshold")
# Rounding slack when a null value computed by FFT meets the exact observed value:
# an offset of 0 must count as "at least as large" (see shift_null).
_TOL = 1e-9

FloatArray = np.ndarray
IntArray = np.ndarray
BoolArray = np.ndarray


# --------------------------------------------------------------------- traces
def trace_bounds(trace: IntArray, n_traces: int | None = None) -> tuple[IntArray, IntArray]:
    """(start, length) of each trace in a flat array sorted by trace index."""
    trace = np.asarray(trace, dtype=np.int64)
    n_traces = int(trace.max()) + 1 if n_traces is None and len(trace) else (n_traces or 0)
    lengths = np.bincount(trace, minlength=n_traces).astype(np.int64)
    starts = np.zeros(n_traces, dtype=np.int64)
    if n_traces > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    return starts, lengths


def compact(trace: IntArray) -> tuple[IntArray, IntArray]:
    """Trace indices renumbered 0..T'-1 after some tokens were dropped (order kept), and
    the original index of each new one."""
    kept, inverse = np.unique(trace, return_inverse=True)
    return inverse.astype(np.int64), kept


def _k_of(n: IntArray | int, rho: float) -> Any:
    # models.high_entropy.top_count (ceil(n * rho), at least one) of each count.
    counts = np.asarray(n, dtype=np.int64)
    return np.array([top_count(int(m), rho) for m in counts.ravel()],
                    dtype=np.int64).reshape(counts.shape)


def _finite(values: FloatArray) -> BoolArray:
    return np.isfinite(values)


# --------------------------------------------------------------------- the sets
@dataclass(frozen=True)
class EntropyRule:
    """How E is chosen: scope corpus | trace (top `rho`) or threshold (>= `threshold`)."""

    scope: str = "corpus"
    rho: float = HIGH_ENTROPY_FRACTION
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown entropy scope {self.scope!r} (use {', '.join(SCOPES)})")
        if self.scope == "threshold" and self.threshold is None:
            raise ValueError("the threshold scope needs a threshold")
        if not 0 < self.rho < 1:
            raise ValueError(f"rho must be in (0, 1), got {self.rho:g}")

    @property
    def label(self) -> str:
        if self.scope == "threshold":
            return f"H ≥ {self.threshold:g} nats"
        where = "all tokens of the selection" if self.scope == "corpus" else "each trace"
        return f"top {self.rho * 100:g}% by entropy over {where}"

    def to_json(self) -> dict[str, Any]:
        return {"scope": self.scope, "rho": self.rho, "threshold": self.threshold}


def top_fraction_mask(values: FloatArray, rho: float,
                      trace: IntArray | None = None) -> tuple[BoolArray, FloatArray]:
    """Values at or above the ceil(rho * n)-th largest (ties included), over all values
    (`trace` None) or within each trace. Non-finite values never count. Returns the mask
    and the threshold(s) used (one per trace when `trace` is given; NaN for a trace
    without values)."""
    values = np.asarray(values, dtype=np.float64)
    ok = _finite(values)
    if trace is None:
        data = values[ok]
        if not len(data):
            return np.zeros(len(values), dtype=bool), np.array(np.nan)
        k = int(_k_of(len(data), rho))
        thr = np.partition(data, len(data) - k)[len(data) - k]
        return ok & (values >= thr), np.array(thr)
    trace = np.asarray(trace, dtype=np.int64)
    order, _, starts, n = _sorted_within(values, trace, ok, descending=True)
    thr = np.full(len(n), np.nan)
    has = n > 0
    # Each trace's finite values in descending order: the k-th is its threshold.
    thr[has] = values[order[starts[has] + _k_of(n[has], rho) - 1]]
    mask = ok & (values >= np.where(np.isnan(thr), np.inf, thr)[trace])
    return mask, thr


def high_entropy_mask(entropy: FloatArray, trace: IntArray,
                      rule: EntropyRule) -> tuple[BoolArray, FloatArray]:
    """E under `rule`, with the threshold(s) it used."""
    entropy = np.asarray(entropy, dtype=np.float64)
    if rule.scope == "threshold":
        assert rule.threshold is not None
        # ">=" like the top-rho rule's tie handling; Wang et al. say "above" their 80th
        # percentile, which differs only for a token exactly at the threshold.
        return _finite(entropy) & (entropy >= rule.threshold), np.array(rule.threshold)
    return top_fraction_mask(entropy, rule.rho, None if rule.scope == "corpus" else trace)


def _sorted_within(values: FloatArray, trace: IntArray, ok: BoolArray,
                   descending: bool = False) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """The finite values sorted within each trace (equal values in array order): their
    indices, each one's 0-based rank within its trace, the trace starts in that order
    and the number of finite values per trace."""
    idx = np.flatnonzero(ok)
    sub, _ = _order_within(values[idx], trace[idx], descending=descending)
    order = idx[sub]
    n_traces = int(trace.max()) + 1 if len(trace) else 0
    n = np.bincount(trace[order], minlength=n_traces)
    starts = np.zeros(n_traces, dtype=np.int64)
    if n_traces > 1:
        np.cumsum(n[:-1], out=starts[1:])
    rank = np.arange(len(order)) - starts[trace[order]]
    return order, rank, starts, n


def peak_mask(mi: FloatArray, trace: IntArray, rule: PeakRule) -> BoolArray:
    """P: each trace's MI peaks under `rule`: peaks.py's find_peaks, vectorised, with the
    same quantile interpolation and, for top-k / top-rho, the same tie-break (the earlier
    position first: the arrays are in position order within each trace)."""
    mi = np.asarray(mi, dtype=np.float64)
    trace = np.asarray(trace, dtype=np.int64)
    ok = _finite(mi)
    mask = np.zeros(len(mi), dtype=bool)
    if not ok.any():
        return mask
    if rule.name == "tukey":
        order, _, starts, n = _sorted_within(mi, trace, ok)
        s = mi[order]

        def q(frac: float) -> FloatArray:
            # numpy's default ("linear") quantile, exactly as peaks.quantile computes it
            pos = (np.maximum(n, 1) - 1) * frac
            lo = np.floor(pos).astype(np.int64)
            hi = np.minimum(lo + 1, np.maximum(n, 1) - 1)
            a = s[np.minimum(starts + lo, len(s) - 1)]
            b = s[np.minimum(starts + hi, len(s) - 1)]
            return a + (b - a) * (pos - lo)

        q1, q3 = q(0.25), q(0.75)
        fence = q3 + rule.param * (q3 - q1)
        fence[n == 0] = np.inf
        return ok & (mi > fence[trace])
    if rule.name in ("topk", "topr"):
        order, rank, _, n = _sorted_within(mi, trace, ok, descending=True)
        if rule.name == "topk":
            k = np.full(len(n), max(0, int(rule.param)), dtype=np.int64)
        else:
            k = _k_of(n, rule.param)
        mask[order] = rank < k[trace[order]]
        return mask
    raise ValueError(f"unknown peak rule {rule.name!r}")


# --------------------------------------------------------------------- ranks
def _dense_codes(values: FloatArray) -> IntArray:
    """Each value's dense rank 0..u-1 among the distinct values (equal values, equal
    code). Any sort will do (equal values get one code whatever their order), so the
    fast unstable one."""
    order = np.argsort(values)
    v = values[order]
    new = np.ones(len(v), dtype=bool)
    new[1:] = v[1:] != v[:-1]
    codes = np.empty(len(v), dtype=np.int64)
    codes[order] = np.cumsum(new) - 1
    return codes


def _order_within(values: FloatArray, trace: IntArray | None,
                  descending: bool = False) -> tuple[IntArray, IntArray]:
    """Indices sorting by (trace, value) with equal values kept in array order, and the
    sort keys in that order (equal key = tie). One stable integer argsort of
    trace * (u + 1) + dense code: much faster than a lexsort on floats, and fast even
    though stable because the keys come in runs (the arrays are sorted by trace)."""
    codes = _dense_codes(values)
    if descending:
        codes = codes.max(initial=0) - codes
    key = codes if trace is None else trace * (int(codes.max(initial=0)) + 1) + codes
    order = np.argsort(key, kind="stable")
    return order, key[order]


def average_ranks(values: FloatArray, trace: IntArray | None = None) -> FloatArray:
    """Ranks 1..n (ties get their average rank, as scipy.stats.rankdata), over all values
    or within each trace. Values must be finite."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return np.zeros(0)
    trace = None if trace is None else np.asarray(trace, np.int64)
    order, key = _order_within(values, trace)
    new = np.ones(n, dtype=bool)
    new[1:] = key[1:] != key[:-1]
    group = np.cumsum(new) - 1
    if trace is None:
        rank_in_trace = np.arange(1, n + 1, dtype=np.float64)
    else:
        t = trace[order]
        first = np.ones(n, dtype=bool)
        first[1:] = t[1:] != t[:-1]
        start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        rank_in_trace = np.arange(n) - start + 1.0
    mean_rank = np.bincount(group, weights=rank_in_trace) / np.bincount(group)
    out = np.empty(n)
    out[order] = mean_rank[group]
    return out


@dataclass
class RankParts:
    """Per-trace pieces of Spearman's rho, kept for the null: centred within-trace ranks
    of x and y, the norms sqrt(sum cx^2 * sum cy^2) and which traces have a defined rho."""

    cx: FloatArray
    cy: FloatArray
    denom: FloatArray
    ok: BoolArray
    rho: FloatArray


def rank_parts(x: FloatArray, y: FloatArray, trace: IntArray, n_traces: int) -> RankParts:
    """Spearman's rho of x and y within each trace (Pearson's r of average ranks, as
    scipy.stats.spearmanr). Undefined (NaN, left out of means) for a trace with fewer than
    3 values or a constant series."""
    trace = np.asarray(trace, dtype=np.int64)
    cx = _centre(average_ranks(x, trace), trace, n_traces)
    cy = _centre(average_ranks(y, trace), trace, n_traces)
    sxy = np.bincount(trace, weights=cx * cy, minlength=n_traces)
    sxx = np.bincount(trace, weights=cx * cx, minlength=n_traces)
    syy = np.bincount(trace, weights=cy * cy, minlength=n_traces)
    n = np.bincount(trace, minlength=n_traces)
    denom = np.sqrt(sxx * syy)
    # Centred ranks of a constant series are 0 up to rounding: a relative floor.
    ok = (n >= 3) & (denom > 1e-9 * np.maximum(1, n) ** 3)
    rho = np.full(n_traces, np.nan)
    rho[ok] = np.clip(sxy[ok] / denom[ok], -1, 1)
    return RankParts(cx, cy, denom, ok, rho)


def spearman_per_trace(x: FloatArray, y: FloatArray, trace: IntArray,
                       n_traces: int) -> FloatArray:
    """Spearman's rho per trace (see `rank_parts`)."""
    return rank_parts(x, y, trace, n_traces).rho


def _centre(values: FloatArray, trace: IntArray, n_traces: int) -> FloatArray:
    n = np.bincount(trace, minlength=n_traces)
    mean = np.bincount(trace, weights=values, minlength=n_traces) / np.maximum(n, 1)
    return values - mean[trace]


def auroc(scores: FloatArray, labels: BoolArray) -> float:
    """Area under the ROC curve of `scores` detecting `labels` = the Mann-Whitney U of
    positives over negatives / (n_pos * n_neg), ties counting one half. NaN without a
    positive or a negative."""
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return _auc_from_rank_sum(float(ranks[labels].sum()), n_pos, n_neg)


def _auc_from_rank_sum(rank_sum: Any, n_pos: Any, n_neg: Any) -> Any:
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


# --------------------------------------------------------------------- overlap
def odds_ratio(a: Any, b: Any, c: Any, d: Any) -> Any:
    """(a d) / (b c) of the 2x2 table [[a, b], [c, d]] = [[E∩P, E∖P], [P∖E, neither]].
    Where a cell is 0, 0.5 is added to all four cells (Haldane-Anscombe) so the ratio
    stays finite; tables without a zero are left as they are. Undefined (NaN) when a
    whole row or column is empty (no peaks, say): there is nothing to compare then, and
    the correction alone would make up a ratio. Elementwise on arrays."""
    a, b, c, d = (np.asarray(v, dtype=np.float64) for v in (a, b, c, d))
    zero = (a == 0) | (b == 0) | (c == 0) | (d == 0)
    h = np.where(zero, 0.5, 0.0)
    empty = (a + b == 0) | (c + d == 0) | (a + c == 0) | (b + d == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(empty, np.nan, ((a + h) * (d + h)) / ((b + h) * (c + h)))
    return out if out.ndim else float(out)


def overlap_from_counts(n: Any, e: Any, p: Any, a: Any) -> dict[str, Any]:
    """The set statistics from the counts (elementwise on arrays, e.g. one per bootstrap
    draw): n positions, e = |E|, p = |P|, a = |E∩P|. NaN where undefined."""
    n, e, p, a = (np.asarray(v, dtype=np.float64) for v in (n, e, p, a))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(p > 0, a / p, np.nan)
        recall = np.where(e > 0, a / e, np.nan)
        union = e + p - a
        jaccard = np.where(union > 0, a / union, np.nan)
        base = np.where(n > 0, e / n, np.nan)
        lift = np.where(base > 0, precision / base, np.nan)
        odds = odds_ratio(a, e - a, p - a, n - e - p + a)
    out = {"precision": precision, "recall": recall, "jaccard": jaccard,
           "odds_ratio": odds, "base_rate": base, "lift": lift}
    return {k: (float(v) if np.ndim(v) == 0 else v) for k, v in out.items()}


def _cells(high: BoolArray, peak: BoolArray, trace: IntArray, n_traces: int) -> IntArray:
    """(T, 4) per-trace counts of the four cells, index = 2 * E + P: neither, P only,
    E only, both. One integer bincount instead of four weighted ones."""
    code = trace * 4 + high.astype(np.int64) * 2 + peak.astype(np.int64)
    return np.bincount(code, minlength=4 * n_traces).reshape(n_traces, 4)


def per_trace_counts(high: BoolArray, peak: BoolArray, trace: IntArray,
                     n_traces: int) -> IntArray:
    """(T, 4) counts per trace: n, |E|, |P|, |E∩P|."""
    c = _cells(np.asarray(high, bool), np.asarray(peak, bool),
               np.asarray(trace, np.int64), n_traces)
    return np.stack([c.sum(axis=1), c[:, 2] + c[:, 3], c[:, 1] + c[:, 3], c[:, 3]], axis=1)


def lag_counts(high: BoolArray, peak: BoolArray, trace: IntArray, position: IntArray,
               n_traces: int, lags: Sequence[int] = LAGS) -> IntArray:
    """(T, len(lags), 4) counts per trace and lag over the pairs (t, t + lag) that are
    both present in the same trace: pairs, |E_t and P_t+lag|, |P_t+lag|, |E_t or P_t+lag|.
    No wrap-around: a pair that would leave the trace doesn't exist."""
    trace = np.asarray(trace, dtype=np.int64)
    position = np.asarray(position, dtype=np.int64)
    high, peak = np.asarray(high, bool), np.asarray(peak, bool)
    n = len(trace)
    out = np.zeros((n_traces, len(lags), 4), dtype=np.int64)
    if n == 0:
        return out
    span = int(position.max()) + max(abs(x) for x in lags) + 1
    key = trace * span + position
    idx = np.arange(n)
    for li, lag in enumerate(lags):
        # Positions are mostly contiguous runs: try the element `lag` places away first
        # and binary-search (the keys are sorted) only where that isn't the partner.
        j = np.clip(idx + lag, 0, n - 1)
        found = key[j] == key + lag
        miss = np.flatnonzero(~found)
        if len(miss):
            target = key[miss] + lag
            k = np.minimum(np.searchsorted(key, target), n - 1)
            hit = key[k] == target
            j[miss[hit]] = k[hit]
            found[miss[hit]] = True
        src = np.flatnonzero(found)
        c = _cells(high[src], peak[j[src]], trace[src], n_traces)
        out[:, li] = np.stack([c.sum(axis=1), c[:, 3], c[:, 1] + c[:, 3],
                               c[:, 1] + c[:, 2] + c[:, 3]], axis=1)
    return out


def lag_stats(counts: Any) -> dict[str, Any]:
    """Precision |E_t∩P_t+lag| / |P_t+lag| and Jaccard from summed lag counts (..., 4)."""
    counts = np.asarray(counts, dtype=np.float64)
    both, peaks, union = counts[..., 1], counts[..., 2], counts[..., 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"precision": np.where(peaks > 0, both / peaks, np.nan),
                "jaccard": np.where(union > 0, both / union, np.nan)}


# --------------------------------------------------------------------- null
def circular_xcorr(xs: Sequence[FloatArray], y: FloatArray, trace: IntArray,
                   n_traces: int) -> list[FloatArray]:
    """For each x in `xs`: c[start_i + o] = sum_j x_j * y_(j + o mod n_i), for every
    trace i and offset o in 0..n_i-1: a statistic's ingredient under every circular
    shift of y at once.

    By FFT, traces grouped by padded length: x correlated with y written twice ([y, y])
    at lags 0..n-1 is the circular correlation, and an FFT of size >= 2n keeps those
    lags free of wrap-around. y's transform is shared by all the xs."""
    y = np.asarray(y, dtype=np.float64)
    trace = np.asarray(trace, dtype=np.int64)
    starts, lengths = trace_bounds(trace, n_traces)
    outs = [np.zeros(len(y)) for _ in xs]
    local = np.arange(len(y)) - starts[trace]
    size = np.zeros(n_traces, dtype=np.int64)
    has = lengths > 0
    size[has] = 1 << np.ceil(np.log2(2 * lengths[has])).astype(np.int64)
    for m in np.unique(size[has]):
        group = np.flatnonzero(size == m)
        row_of = np.full(n_traces, -1, dtype=np.int64)
        row_of[group] = np.arange(len(group))
        tok = np.flatnonzero(row_of[trace] >= 0)
        rows, cols = row_of[trace[tok]], local[tok]
        ys = np.zeros((len(group), m))
        ys[rows, cols] = y[tok]
        ys[rows, cols + lengths[trace[tok]]] = y[tok]
        fy = np.fft.rfft(ys, axis=1)
        for x, out in zip(xs, outs, strict=True):
            xm = np.zeros((len(group), m))
            xm[rows, cols] = np.asarray(x, dtype=np.float64)[tok]
            corr = np.fft.irfft(np.conj(np.fft.rfft(xm, axis=1)) * fy, n=m, axis=1)
            out[tok] = corr[rows, cols]
    return outs


def shift_offsets(lengths: IntArray, iterations: int,
                  rng: np.random.Generator) -> IntArray:
    """(iterations, T) random circular offsets, uniform on 0..n_i-1 per trace. Offset 0
    (the data as observed) is one of them, as in a permutation test: the p-value then
    never reaches 0 and stays valid."""
    u = rng.random((iterations, len(lengths)))
    return np.minimum((u * lengths).astype(np.int64), np.maximum(lengths - 1, 0))


def p_value(null: FloatArray, observed: float, tail: str = "two-sided") -> float:
    """Permutation p-value. "greater": (1 + #{null >= observed}) / (1 + iterations);
    "less": the same with <=; "two-sided" (default): twice the smaller of the two,
    capped at 1, so a depletion is as visible as an enrichment. Null values that are NaN
    count as not reaching the observed value (either way)."""
    null = np.asarray(null, dtype=np.float64)
    if not math.isfinite(observed):
        return float("nan")
    tol = _TOL * max(1.0, abs(observed))
    upper = float((1 + np.sum(null >= observed - tol)) / (1 + len(null)))
    lower = float((1 + np.sum(null <= observed + tol)) / (1 + len(null)))
    if tail == "greater":
        return upper
    if tail == "less":
        return lower
    return min(1.0, 2 * min(upper, lower))


def null_test(null: FloatArray, observed: float) -> tuple[float, str | None, float, float]:
    """Two-sided p, the tail the observed value is in ("upper" / "lower"), and the
    null's mean and standard deviation (NaN draws left out)."""
    null = np.asarray(null, dtype=np.float64)
    fin = null[np.isfinite(null)]
    mean = float(fin.mean()) if len(fin) else float("nan")
    sd = float(fin.std(ddof=1)) if len(fin) > 1 else float("nan")
    if not math.isfinite(observed):
        return float("nan"), None, mean, sd
    tail = "upper" if p_value(null, observed, "greater") <= p_value(null, observed, "less") \
        else "lower"
    return p_value(null, observed), tail, mean, sd


# --------------------------------------------------------------------- bootstrap
def bootstrap_weights(n_traces: int, iterations: int,
                      rng: np.random.Generator) -> FloatArray:
    """(iterations, T): how many times each trace is drawn in each resample of the T
    traces with replacement. A statistic of summed per-trace counts is then W @ counts."""
    if iterations <= 0 or n_traces == 0:
        return np.zeros((0, n_traces))
    draws = rng.integers(0, n_traces, size=(iterations, n_traces))
    flat = draws + (np.arange(iterations) * n_traces)[:, None]
    return np.bincount(flat.ravel(), minlength=iterations * n_traces).reshape(
        iterations, n_traces).astype(np.float64)


def percentile_interval(samples: Any, level: float = 0.95) -> tuple[float, float]:
    """The percentile-method interval of bootstrap samples (NaN draws left out)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def _binned_auc(pos: FloatArray, neg: FloatArray) -> FloatArray:
    """AUROC from (..., bins) weighted counts of positives and negatives per score bin,
    bins in increasing score; pairs within a bin count one half."""
    below = np.cumsum(neg, axis=-1) - neg
    num = np.sum(pos * (below + 0.5 * neg), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / (pos.sum(axis=-1) * neg.sum(axis=-1))


# --------------------------------------------------------------------- summaries
def entropy_summary(entropy: FloatArray, quantiles: Sequence[float] = QUANTILES,
                    low: float = LOW_ENTROPY) -> dict[str, Any]:
    """Quantiles (numpy's linear method), mean, median, the fraction below `low` nats and
    above Wang et al.'s 0.672, over all finite values."""
    data = np.asarray(entropy, dtype=np.float64)
    data = data[_finite(data)]
    if not len(data):
        return {"n": 0, "mean": None, "median": None, "quantiles": {},
                "fraction_below": None, "low": low, "fraction_above_wang": None}
    qs = np.quantile(data, list(quantiles))
    return {
        "n": len(data),
        "mean": float(data.mean()),
        "median": float(np.median(data)),
        "quantiles": {f"{q:g}": float(v) for q, v in zip(quantiles, qs, strict=True)},
        "low": low,
        "fraction_below": float(np.mean(data < low)),
        "fraction_above_wang": float(np.mean(data >= WANG_THRESHOLD)),
    }


def token_table(texts: Sequence[str], indices: Iterable[int],
                top: int = 15) -> list[tuple[str, int]]:
    """The `top` most frequent texts among `texts[i]` for i in `indices`, with counts
    (equal counts ordered by text, so the table is the same every run)."""
    counts = Counter(texts[i] for i in indices)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def set_agreement(a: BoolArray, b: BoolArray) -> dict[str, Any]:
    """Two sets over the same positions: Jaccard, |A∩B|/|A| (the share of A's positions
    also in B: the 80/20 paper's ">86%" of the base model's top-20% kept by the trained
    one), |A∩B|/|B|, and the sizes."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    na, nb, both = int(a.sum()), int(b.sum()), int((a & b).sum())
    union = na + nb - both
    return {"n_positions": len(a), "n_a": na, "n_b": nb, "n_both": both,
            "jaccard": both / union if union else float("nan"),
            "a_in_b": both / na if na else float("nan"),
            "b_in_a": both / nb if nb else float("nan")}


def roc_curve(scores: FloatArray, labels: BoolArray, points: int = 201) -> dict[str, Any]:
    """The pooled ROC curve of `scores` detecting `labels`: (false positive rate, true
    positive rate) at every distinct threshold, thinned to about `points` points (the
    curve behind the AUROC)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return {"fpr": [], "tpr": []}
    order = np.argsort(-scores, kind="stable")
    s, lab = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]  # the end of each run of equal scores
    tp = np.cumsum(lab)[last] / n_pos
    fp = np.cumsum(~lab)[last] / n_neg
    fpr, tpr = np.r_[0.0, fp], np.r_[0.0, tp]
    if len(fpr) > points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, points).astype(np.int64))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def density(x: FloatArray, y: FloatArray, bins: int = 24,
            clip: tuple[float, float] = (0.005, 0.995)) -> dict[str, Any]:
    """2-D histogram of (x, y), each axis over its `clip` quantiles (outliers piled into
    the edge bins), for a density plot."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = _finite(x) & _finite(y)
    x, y = x[ok], y[ok]
    if not len(x):
        return {"x_edges": [], "y_edges": [], "counts": []}

    def edges(v: FloatArray) -> FloatArray:
        lo, hi = np.quantile(v, clip)
        if hi <= lo:
            lo, hi = float(v.min()), float(v.max())
        if hi <= lo:
            hi = lo + 1.0
        return np.linspace(lo, hi, bins + 1)

    xe, ye = edges(x), edges(y)
    xi = np.clip(np.searchsorted(xe, x, side="right") - 1, 0, bins - 1)
    yi = np.clip(np.searchsorted(ye, y, side="right") - 1, 0, bins - 1)
    counts = np.bincount(xi * bins + yi, minlength=bins * bins).reshape(bins, bins)
    return {"x_edges": xe.tolist(), "y_edges": ye.tolist(), "counts": counts.tolist()}


def histogram(values: FloatArray, bins: int = 30,
              upper: float | None = None, lower: float | None = 0.0) -> dict[str, Any]:
    """Counts of finite values in `bins` equal bins on [lower, upper] (lower: 0, or the
    minimum when None; upper: the 99.5th percentile by default; values beyond it in the
    last bin)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[_finite(v)]
    if not len(v):
        return {"edges": [], "counts": []}
    lo = float(v.min()) if lower is None else min(lower, float(v.min()))
    hi = (float(np.quantile(v, 0.995)) if lower is not None else float(v.max())) \
        if upper is None else upper
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    idx = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, bins - 1)
    return {"edges": edges.tolist(), "counts": np.bincount(idx, minlength=bins).tolist()}


# --------------------------------------------------------------------- the analysis
@dataclass
class Estimate:
    """A statistic with its 95% bootstrap interval and its test against the circular-
    shift null (None: not computed for this statistic): two-sided p, the tail the
    observed value lies in, the null's mean and standard deviation, and the p adjusted
    for the report's many tests (set by the report)."""

    value: float
    lo: float | None = None
    hi: float | None = None
    p: float | None = None
    tail: str | None = None  # "upper" | "lower": which side of the null the value is on
    null_mean: float | None = None
    null_sd: float | None = None
    p_adj: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"value": _num(self.value), "lo": _num(self.lo), "hi": _num(self.hi),
                "p": _num(self.p), "p_two_sided": _num(self.p), "tail": self.tail,
                "null_mean": _num(self.null_mean), "null_sd": _num(self.null_sd),
                "adjusted_p": _num(self.p_adj)}


@dataclass
class OverlapResult:
    """E against P over the positions with an MI value, for one selection of traces."""

    n_traces: int  # traces with at least one position used
    n_positions: int  # positions used (MI present)
    n_high: int
    n_peaks: int
    n_both: int
    stats: dict[str, Estimate]
    lags: list[dict[str, Any]]
    trace_ids: list[int]  # caller's trace ids, in the order of the per-trace lists
    per_trace: dict[str, list[Any]]  # n, peaks, precision, jaccard, spearman per trace
    spearman_traces: int  # traces where Spearman is defined (>= 3 values, not constant)
    peak_rate: dict[str, float]  # mean, median of |P_i| / n_i over traces
    tokens: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    density: dict[str, Any] = field(default_factory=dict)
    auc_bins: int = 0  # score bins of the AUROC bootstrap (0: exact / none)
    # primary endpoint, chance levels, controls, position profile (inference.infer)
    inference: dict[str, Any] = field(default_factory=dict)
    # data behind the report's figures: ROC points, the shift null of the odds ratio
    figures: dict[str, Any] = field(default_factory=dict)
    n_clusters: int = 0  # prompts the bootstrap resamples

    @property
    def primary(self) -> dict[str, Any]:
        return self.inference.get("primary", {})

    @property
    def controls(self) -> dict[str, Any]:
        return self.inference.get("controls", {})

    @property
    def expected_both(self) -> float:
        """|E∩P| expected under independence within each trace: sum |E_i||P_i|/n_i."""
        v = self.inference.get("chance", {}).get("within_trace_expected_overlap")
        return float("nan") if v is None else float(v)

    def to_json(self) -> dict[str, Any]:
        return {
            "n_traces": self.n_traces, "n_positions": self.n_positions,
            "n_high": self.n_high, "n_peaks": self.n_peaks, "n_both": self.n_both,
            "stats": {k: v.to_json() for k, v in self.stats.items()},
            "lags": [{k: (_num(v) if isinstance(v, float) else v) for k, v in row.items()}
                     for row in self.lags],
            "spearman_traces": self.spearman_traces,
            "peak_rate": {k: _num(v) for k, v in self.peak_rate.items()},
            "tokens": {k: [[t, c] for t, c in v] for k, v in self.tokens.items()},
            "per_trace": {"trace_id": self.trace_ids,
                          **{k: [_num(x) if isinstance(x, float) else x for x in v]
                             for k, v in self.per_trace.items()}},
            "density": self.density,
            "auc_bootstrap_bins": self.auc_bins,
            "bootstrap_clusters": self.n_clusters,
            "figures": self.figures,
            **self.inference,
        }


STAT_NAMES = ("precision", "recall", "jaccard", "odds_ratio", "lift", "base_rate",
              "spearman", "auroc")
# Statistics with a null p-value (the base rate doesn't depend on where E falls).
NULL_STATS = ("precision", "recall", "jaccard", "odds_ratio", "lift", "spearman", "auroc")
# Upper bound on the (traces x bins) matrices of the AUROC bootstrap.
_AUC_CELLS = 4_000_000


def analyse(trace: IntArray, position: IntArray, entropy: FloatArray, mi: FloatArray,
            high: BoolArray, rule: PeakRule, *, trace_ids: Sequence[int] | None = None,
            texts: Sequence[str] | None = None, bootstrap: int = 1000,
            null: int = 1000, seed: int = 0, top_tokens: int = 15,
            lags: Sequence[int] = LAGS, with_density: bool = True,
            cluster: Sequence[int] | None = None, refit: bool = False) -> OverlapResult:
    """E (`high`, chosen by the caller over all tokens) against the MI peaks, over the
    positions where MI is present.

    Arrays are per token, sorted by (trace, position); `trace` indexes `trace_ids`.
    `cluster` gives each trace's prompt (same indexing as `trace`): the bootstrap
    resamples prompts, so samples of one prompt move together (default: every trace its
    own prompt). `refit`: E is a corpus-level top fraction, refitted in each resample of
    the primary endpoint (see inference.primary_draws).
    Bootstrap and null draw from independent streams of `seed` (numpy SeedSequence
    [seed, 1] and [seed, 2]), so each is reproducible and changing one's iteration count
    leaves the other's draws alone.
    """
    trace = np.asarray(trace, dtype=np.int64)
    position = np.asarray(position, dtype=np.int64)
    entropy = np.asarray(entropy, dtype=np.float64)
    mi = np.asarray(mi, dtype=np.float64)
    high = np.asarray(high, dtype=bool)
    idx = np.flatnonzero(_finite(mi) & _finite(entropy))
    t_local, kept = compact(trace[idx])
    ids = (np.asarray(trace_ids)[kept] if trace_ids is not None else kept).tolist()
    n_tr = len(kept)
    pos, ent, val, hi_ = position[idx], entropy[idx], mi[idx], high[idx]
    peak = peak_mask(val, t_local, rule)
    counts = per_trace_counts(hi_, peak, t_local, n_tr)
    tot = counts.sum(axis=0)
    point = overlap_from_counts(*tot)
    parts = rank_parts(ent, val, t_local, n_tr)
    point["spearman"] = float(parts.rho[parts.ok].mean()) if parts.ok.any() else float("nan")
    ranks = average_ranks(ent)  # over all positions used: the AUROC's pooled ranking
    n_p = int(tot[2])
    n_n = len(idx) - n_p
    point["auroc"] = (float(_auc_from_rank_sum(ranks[peak].sum(), n_p, n_n))
                      if n_p and n_n else float("nan"))
    lagc = lag_counts(hi_, peak, t_local, pos, n_tr, lags)
    lag_point = lag_stats(lagc.sum(axis=0))

    # ---- 95% intervals: resampling traces
    # Deviation (for speed, and stated in every report): a resample keeps E's threshold
    # and each trace's peaks as they are in the full sample, so the intervals are
    # conditional on the threshold; recomputing a corpus quantile per resample would
    # need every token re-sorted 1,000 times and moves it very little.
    clusters = (np.asarray(cluster, dtype=np.int64)[kept] if cluster is not None
                else np.arange(n_tr))
    clusters, _ = compact(clusters)  # 0..C-1 over the traces used
    W = cluster_weights(clusters, bootstrap, np.random.default_rng(
        np.random.SeedSequence([seed, 1])))
    intervals: dict[str, tuple[float, float]] = {}
    auc_bins = 0
    lag_ci = np.full((len(lags), 2, 2), np.nan)
    if len(W):
        bsum = W @ counts.astype(np.float64)
        boot = overlap_from_counts(bsum[:, 0], bsum[:, 1], bsum[:, 2], bsum[:, 3])
        with np.errstate(divide="ignore", invalid="ignore"):
            boot["spearman"] = (W @ np.where(parts.ok, parts.rho, 0.0)) / (W @ parts.ok)
        boot["auroc"], auc_bins = _bootstrap_auc(ranks, peak, t_local, n_tr, W,
                                                 point["auroc"])
        for name in STAT_NAMES:
            intervals[name] = percentile_interval(boot[name])
        lb = lag_stats((W @ lagc.reshape(n_tr, -1).astype(np.float64)).reshape(
            len(W), len(lags), 4))
        for li in range(len(lags)):
            lag_ci[li, 0] = percentile_interval(lb["precision"][:, li])
            lag_ci[li, 1] = percentile_interval(lb["jaccard"][:, li])

    # ---- null: MI (so P and the MI ranks) circularly shifted within each trace
    pvals = _shift_null(hi_, peak, ranks, parts, t_local, n_tr, tot, point, null,
                        np.random.default_rng(np.random.SeedSequence([seed, 2])))

    or_null = pvals.pop("_odds_ratio_null", {})
    stats = {}
    for name in STAT_NAMES:
        lo, hi = intervals.get(name, (None, None))
        null_p, tail, mean, sd = pvals.get(name, (None, None, None, None))
        stats[name] = Estimate(point[name], lo, hi, null_p, tail, mean, sd)
    lag_rows = []
    for li, lag in enumerate(lags):
        c = lagc[:, li].sum(axis=0)
        lag_rows.append({
            "lag": int(lag), "pairs": int(c[0]), "both": int(c[1]),
            "precision": float(lag_point["precision"][li]),
            "precision_lo": float(lag_ci[li, 0, 0]), "precision_hi": float(lag_ci[li, 0, 1]),
            "jaccard": float(lag_point["jaccard"][li]),
            "jaccard_lo": float(lag_ci[li, 1, 0]), "jaccard_hi": float(lag_ci[li, 1, 1]),
        })
    per = overlap_from_counts(counts[:, 0], counts[:, 1], counts[:, 2], counts[:, 3])
    rate = counts[:, 2] / np.maximum(counts[:, 0], 1)
    tables: dict[str, list[tuple[str, int]]] = {}
    if texts is not None:
        for name, mask in (("high", hi_), ("peak", peak), ("both", hi_ & peak),
                           ("peak_only", peak & ~hi_), ("high_only", hi_ & ~peak)):
            tables[name] = token_table(texts, idx[mask], top_tokens)
    return OverlapResult(
        n_traces=n_tr, n_positions=len(idx), n_high=int(tot[1]), n_peaks=int(tot[2]),
        n_both=int(tot[3]), stats=stats, lags=lag_rows, trace_ids=[int(i) for i in ids],
        per_trace={"n": counts[:, 0].tolist(), "high": counts[:, 1].tolist(),
                   "peaks": counts[:, 2].tolist(), "both": counts[:, 3].tolist(),
                   "precision": np.atleast_1d(per["precision"]).tolist(),
                   "jaccard": np.atleast_1d(per["jaccard"]).tolist(),
                   "spearman": parts.rho.tolist()},
        spearman_traces=int(parts.ok.sum()),
        peak_rate={"mean": float(rate.mean()) if n_tr else float("nan"),
                   "median": float(np.median(rate)) if n_tr else float("nan")},
        tokens=tables,
        density=density(ent, val) if with_density else {},
        auc_bins=auc_bins,
        figures={"roc": roc_curve(ent, peak),
                 "odds_ratio_null": {**or_null, "scale": "log",
                                     "observed": _num(math.log(point["odds_ratio"]))
                                     if point["odds_ratio"] and point["odds_ratio"] > 0
                                     and math.isfinite(point["odds_ratio"]) else None}},
        inference=infer(t_local, ent, val, hi_, peak, n_tr, W, clusters,
                        classes=(token_class_codes([texts[i] for i in idx])
                                 if texts is not None else None), refit=refit),
        n_clusters=int(clusters.max()) + 1 if len(clusters) else 0,
    )


def _bootstrap_auc(ranks: FloatArray, peak: BoolArray, trace: IntArray, n_traces: int,
                   W: FloatArray, exact: float) -> tuple[FloatArray, int]:
    """AUROC of each bootstrap resample.

    Deviation, for speed: a resample's AUROC is computed from per-trace counts of peaks
    and non-peaks in entropy bins of equal token count (W @ counts: one matrix product
    for all draws) instead of re-ranking every token per draw; pairs that share a bin
    count one half. That binning error is nearly the same in every draw, so the draws
    are shifted by (exact AUROC - binned AUROC of the full sample), which centres them
    on the exact value; with >= 256 bins the error before the shift is below ~0.4%.
    Bins come from the pooled ranks, so tied entropies always share a bin.
    """
    n = len(ranks)
    if not math.isfinite(exact) or not n:
        return np.full(len(W), np.nan), 0
    bins = int(max(16, min(256, _AUC_CELLS // max(1, n_traces), n)))
    b = np.minimum(((ranks - 0.5) * bins / n).astype(np.int64), bins - 1)
    pos = np.bincount(trace[peak] * bins + b[peak], minlength=n_traces * bins)
    neg = np.bincount(trace[~peak] * bins + b[~peak], minlength=n_traces * bins)
    pos = pos.reshape(n_traces, bins).astype(np.float64)
    neg = neg.reshape(n_traces, bins).astype(np.float64)
    full = float(_binned_auc(pos.sum(axis=0), neg.sum(axis=0)))
    return _binned_auc(W @ pos, W @ neg) + (exact - full), bins


def _shift_null(high: BoolArray, peak: BoolArray, ranks: FloatArray, parts: RankParts,
                trace: IntArray, n_traces: int, tot: IntArray, point: dict[str, Any],
                iterations: int, rng: np.random.Generator) -> dict[str, tuple[Any, ...]]:
    """p-values of the statistics under circular shifts of MI within each trace.

    A shift moves the peaks and the MI ranks together and keeps every trace's |E|, |P|
    and n, so |E∩P|, the sum of the pooled entropy ranks at the peaks (AUROC) and each
    trace's rank covariance (Spearman) are circular cross-correlations, computed for
    every offset at once (`circular_xcorr`); an iteration then only picks an offset per
    trace. The circle is the trace's positions that have an MI value, in order (a
    missing position is skipped, not kept as a gap).
    """
    if iterations <= 0 or n_traces == 0:
        return {}
    starts, lengths = trace_bounds(trace, n_traces)
    at = starts[None, :] + shift_offsets(lengths, iterations, rng)  # (iterations, T)
    both, rank_at_peaks = circular_xcorr([high.astype(np.float64), ranks],
                                         peak.astype(np.float64), trace, n_traces)
    (cov,) = circular_xcorr([parts.cx], parts.cy, trace, n_traces)
    n, e, p = (float(v) for v in tot[:3])
    a_null = np.rint(both)[at].sum(axis=1)
    null = overlap_from_counts(np.full(iterations, n), np.full(iterations, e),
                               np.full(iterations, p), a_null)
    n_p, n_n = int(p), int(n - p)
    null["auroc"] = (_auc_from_rank_sum(rank_at_peaks[at].sum(axis=1), n_p, n_n)
                     if n_p and n_n else np.full(iterations, np.nan))
    if parts.ok.any():
        rho = np.clip(cov[at[:, parts.ok]] / parts.denom[parts.ok], -1, 1)
        null["spearman"] = rho.mean(axis=1)
    else:
        null["spearman"] = np.full(iterations, np.nan)
    out: dict[str, Any] = {name: null_test(null[name], point[name]) for name in NULL_STATS}
    # the null distribution of the pooled odds ratio, for the report's figure
    out["_odds_ratio_null"] = histogram(np.log(np.where(null["odds_ratio"] > 0,
                                                        null["odds_ratio"], np.nan)),
                                        bins=30, upper=None, lower=None)
    return out


def agreement_by_trace(trace: IntArray, a: FloatArray, b: FloatArray, *,
                       kind: str, rule: EntropyRule | PeakRule) -> dict[str, Any]:
    """Two models' sets over the same positions: `kind` "entropy" puts each model's
    entropies through the same EntropyRule, "peaks" each model's MI through the same
    PeakRule; then `set_agreement`. Positions where either value is missing are left out."""
    trace = np.asarray(trace, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = _finite(a) & _finite(b)
    t, _ = compact(trace[ok])
    a, b = a[ok], b[ok]
    if kind == "entropy":
        assert isinstance(rule, EntropyRule)
        sa, _ = high_entropy_mask(a, t, rule)
        sb, _ = high_entropy_mask(b, t, rule)
    else:
        assert isinstance(rule, PeakRule)
        sa, sb = peak_mask(a, t, rule), peak_mask(b, t, rule)
    out = set_agreement(sa, sb)
    out["n_traces"] = int(t.max()) + 1 if len(t) else 0
    return out
