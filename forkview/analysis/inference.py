"""Inference for the overlap report: chance levels that fit the data, effect sizes
pooled only through strata, controls for position and token identity, two-sided tests,
multiplicity, and a verdict in words.

Why this module exists (../shared/science.md §6): on sample_db the raw statistics were
exact and still misleading. Entropy and MI both rise along a trace, greedy and sampled
traces have very different shares of high-entropy tokens, and token identity (a "\\n",
a digit) drives both. So:

- Chance: under independence of E and P *within each trace* the expected overlap is
  sum_i |E_i| |P_i| / n_i (not |E| |P| / n over the pooled tokens).
- Effect size: the Mantel-Haenszel odds ratio over strata, with the Robins-Breslow-
  Greenland interval and the Cochran-Mantel-Haenszel test (two-sided, no continuity
  correction); `mantel_haenszel` matches statsmodels' StratifiedTable (the tests check
  it), and is written out here because the bootstrap needs it vectorised over a
  thousand resamples at once.
- Strata: trace (within-trace independence), trace x relative-position bin (the
  position control: P permuted among the positions of the same trace and position
  bin), trace x position bin x token class (position and token identity).
- The primary endpoint: the MH odds ratio over trace x position-bin strata; its 95%
  interval from a bootstrap that resamples prompts (samples of one prompt are not
  independent) and refits E's threshold in every resample; its p-value from the CMH
  test of that stratification. The verdict needs both the Holm-adjusted p < 0.05 and
  an interval that excludes 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

POSITION_BINS = 10
TOKEN_CLASSES = ("word", "number", "punct", "newline", "space")
ALPHA = 0.05
# Fewer prompts than this give no bootstrap interval worth the name (the resamples can
# only recombine a handful of clusters): no verdict other than "no evidence" then.
MIN_CLUSTERS = 5
# Bins of the entropy ranks (per side of E's threshold, so the full sample's E is
# reproduced exactly) for refitting E's threshold in each resample.
_REFIT_BINS = 512
_CHUNK = 64  # resamples per vectorised block (bounds memory: chunk x strata floats)

_NUMBER = re.compile(r"^[+-]?\d[\d.,]*$")


def token_class(text: str) -> str:
    """A token's kind, for the token-identity control and matched controls: "newline"
    (only whitespace, with a line break), "space" (only whitespace), "number" (digits,
    with . , as separators), "word" (any letter), else "punct" (operators, brackets,
    punctuation)."""
    core = text.strip()
    if not core:
        return "newline" if "\n" in text else "space"
    if _NUMBER.match(core):
        return "number"
    if any(ch.isalpha() for ch in core):
        return "word"
    return "punct"


def token_class_codes(texts: Sequence[str]) -> np.ndarray:
    """`token_class` of each text as an index into TOKEN_CLASSES."""
    index = {c: i for i, c in enumerate(TOKEN_CLASSES)}
    cache: dict[str, int] = {}
    out = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        code = cache.get(t)
        if code is None:
            code = cache[t] = index[token_class(t)]
        out[i] = code
    return out


def position_bins(trace: np.ndarray, n_traces: int, bins: int = POSITION_BINS) -> np.ndarray:
    """Each token's relative-position bin within its trace: floor(k * bins / n_i) for the
    k-th of the trace's n_i positions used (0-based, in order)."""
    trace = np.asarray(trace, dtype=np.int64)
    n = np.bincount(trace, minlength=n_traces)
    starts = np.zeros(n_traces, dtype=np.int64)
    if n_traces > 1:
        np.cumsum(n[:-1], out=starts[1:])
    local = np.arange(len(trace)) - starts[trace]
    return np.minimum(local * bins // np.maximum(n[trace], 1), bins - 1)


def stratum_cells(high: np.ndarray, peak: np.ndarray, stratum: np.ndarray,
                  n_strata: int) -> np.ndarray:
    """(S, 4) float counts per stratum: a = |E∩P|, b = |E∖P|, c = |P∖E|, d = neither."""
    code = (np.asarray(stratum, np.int64) * 4 + np.asarray(high, bool) * 2
            + np.asarray(peak, bool))
    c = np.bincount(code, minlength=4 * n_strata).reshape(n_strata, 4).astype(np.float64)
    return np.stack([c[:, 3], c[:, 2], c[:, 1], c[:, 0]], axis=1)


# --------------------------------------------------------------------- MH / CMH
@dataclass
class Stratified:
    """The Mantel-Haenszel odds ratio over strata and the CMH test of OR = 1."""

    estimate: float
    ci: tuple[float, float]  # Robins-Breslow-Greenland, 95%
    p: float  # CMH chi-square (1 df), two-sided, no continuity correction
    observed: float  # sum of a: |E∩P|
    expected: float  # its mean under the null (hypergeometric within each stratum)
    null_sd: float  # its standard deviation under that null
    strata: int  # strata with at least 2 positions (the others carry no information)

    def to_json(self) -> dict[str, Any]:
        # estimate and interval as floats: 0 and inf are values (JSON writes inf as null)
        return {"estimate": self.estimate, "ci": [self.ci[0], self.ci[1]],
                "p_two_sided": finite_or_none(self.p), "observed": finite_or_none(self.observed),
                "expected": finite_or_none(self.expected), "null_sd": finite_or_none(self.null_sd),
                "strata": self.strata}


def mantel_haenszel(cells: np.ndarray, level: float = 0.95) -> Stratified:
    """MH odds ratio, its RGB interval and the CMH test over the strata of `cells`
    ((S, 4): a, b, c, d), as statsmodels.stats.contingency_tables.StratifiedTable
    (oddsratio_pooled, oddsratio_pooled_confint, test_null_odds(correction=False))."""
    cells = np.asarray(cells, dtype=np.float64)
    n = cells.sum(axis=1)
    cells = cells[n >= 2]
    n = n[n >= 2]
    a, b, c, d = cells.T
    observed = float(a.sum())
    if not len(n):
        return Stratified(math.nan, (math.nan, math.nan), math.nan, observed, math.nan,
                          math.nan, 0)
    expected_k = (a + b) * (a + c) / n
    var_k = (a + b) * (c + d) * (a + c) * (b + d) / (n * n * (n - 1))
    expected, var = float(expected_k.sum()), float(var_k.sum())
    p = math.erfc(abs(observed - expected) / math.sqrt(2 * var)) if var > 0 else math.nan
    ad, bc = a * d / n, b * c / n
    num, den = float(ad.sum()), float(bc.sum())
    est = num / den if den > 0 else (math.inf if num > 0 else math.nan)
    ci = (math.nan, math.nan)
    if num > 0 and den > 0:
        pr = (a + d) / n
        qs = (b + c) / n
        v = ((pr * ad).sum() / num ** 2 + (pr * bc + qs * ad).sum() / (num * den)
             + (qs * bc).sum() / den ** 2) / 2
        z = _z(level)
        lo, hi = math.log(est) - z * math.sqrt(v), math.log(est) + z * math.sqrt(v)
        ci = (math.exp(lo), math.exp(hi))
    return Stratified(est, ci, p, observed, expected, math.sqrt(var), len(n))


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def mh_parts(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-stratum numerator a d / n and denominator b c / n of the MH odds ratio."""
    cells = np.asarray(cells, dtype=np.float64)
    n = cells.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        num = np.where(n > 0, cells[..., 0] * cells[..., 3] / n, 0.0)
        den = np.where(n > 0, cells[..., 1] * cells[..., 2] / n, 0.0)
    return num, den


def ratio_draws(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den per resample: 0 when only the numerator is 0 (no position in E∩P),
    inf when only the denominator is (every peak in E, say), NaN when both are (no
    stratum with both kinds of discordant or concordant cells: undefined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / den, np.inf)
    return np.where((num > 0) | (den > 0), out, np.nan)


# --------------------------------------------------------------------- bootstrap
def cluster_weights(cluster: np.ndarray, iterations: int,
                    rng: np.random.Generator) -> np.ndarray:
    """(iterations, T) multiplicities of each trace when the clusters (prompts) are
    resampled with replacement: every trace of a drawn prompt comes along."""
    from forkview.analysis.overlap import bootstrap_weights

    cluster = np.asarray(cluster, dtype=np.int64)
    n_clusters = int(cluster.max()) + 1 if len(cluster) else 0
    return bootstrap_weights(n_clusters, iterations, rng)[:, cluster]


@dataclass
class Interval:
    """A bootstrap interval with the count of resamples where the statistic was
    undefined (left out of the percentiles, never silently)."""

    lo: float
    hi: float
    draws: int
    undefined: int

    def to_json(self) -> dict[str, Any]:
        return {"ci": [finite_or_none(self.lo), finite_or_none(self.hi)], "resamples": self.draws,
                "undefined": self.undefined}


def log_interval(draws: np.ndarray, level: float = 0.95) -> Interval:
    """Percentile interval of odds-ratio draws (0 and inf are values at the ends of the
    scale, kept); undefined (NaN) draws are counted and left out."""
    draws = np.asarray(draws, dtype=np.float64)
    ok = ~np.isnan(draws)
    if not ok.any():
        return Interval(math.nan, math.nan, len(draws), int((~ok).sum()))
    tail = (1 - level) / 2 * 100
    # on the ranks ("lower"/"higher"), so an interval end is a drawn value, inf included
    lo = np.percentile(draws[ok], tail, method="lower")
    hi = np.percentile(draws[ok], 100 - tail, method="higher")
    return Interval(float(lo), float(hi), len(draws), int((~ok).sum()))


def primary_draws(entropy: np.ndarray, high: np.ndarray, peak: np.ndarray,
                  stratum: np.ndarray, stratum_trace: np.ndarray, W: np.ndarray,
                  refit: bool) -> np.ndarray:
    """MH odds ratio over the strata in each resample (rows of W: trace multiplicities).

    With `refit`, E's threshold is fitted again in each resample: E is the same top
    fraction of the resampled positions as it is of the full sample's (so the full
    sample, all weights 1, gives back E exactly), found on rank bins of entropy split at
    E's threshold (one per rank up to 512 positions a side, exact; else 512 a side, so a
    resample's threshold falls within 1/512 of the positions of the exact one). Without
    `refit` (E per trace or a fixed threshold, which a resample does not move) E is
    held."""
    S = len(stratum_trace)
    stratum = np.asarray(stratum, dtype=np.int64)
    if not refit:
        num, den = mh_parts(stratum_cells(high, peak, stratum, S))
        T = W.shape[1]
        num_t = np.bincount(stratum_trace, weights=num, minlength=T)
        den_t = np.bincount(stratum_trace, weights=den, minlength=T)
        return ratio_draws(W @ num_t, W @ den_t)
    from forkview.analysis.overlap import average_ranks

    n = len(entropy)
    high = np.asarray(high, dtype=bool)
    n_e = int(high.sum())
    out = np.full(len(W), np.nan)
    if n == 0 or n_e == 0 or n_e == n:
        return out
    ranks = average_ranks(entropy)  # E's entropies all rank above the others'
    # one bin per rank when that is few (exact), else _REFIT_BINS per side
    nb = int(min(max(n_e, n - n_e), _REFIT_BINS))
    bins = np.where(high, nb + np.minimum(((ranks - (n - n_e) - 0.5) * nb / n_e)
                                          .astype(np.int64), nb - 1),
                    np.minimum(((ranks - 0.5) * nb / (n - n_e)).astype(np.int64), nb - 1))
    K = 2 * nb
    T = W.shape[1]
    # per trace x bin counts (for the resampled threshold) and per stratum x bin counts
    # of all positions and of peaks, summed from the top bin down
    tr_of = stratum_trace[stratum]
    per_trace = np.bincount(tr_of * K + bins, minlength=T * K).reshape(T, K).astype(float)
    # float32: counts stay exact below 2^24, and these are strata x bins large
    rc_all = _top_sums(np.bincount(stratum * K + bins, minlength=S * K).reshape(S, K)
                       ).astype(np.float32)
    rc_pk = _top_sums(np.bincount(stratum[peak] * K + bins[peak],
                                  minlength=S * K).reshape(S, K)).astype(np.float32)
    n_s = rc_all[:, 0].astype(np.float64)
    p_s = rc_pk[:, 0].astype(np.float64)
    share = n_e / n
    for lo in range(0, len(W), _CHUNK):
        w = W[lo:lo + _CHUNK]
        top = _top_sums(w @ per_trace)  # (B, K + 1): resampled positions in bins >= k
        target = share * top[:, 0]
        # the smallest top set holding at least the same share: the largest such k
        k_star = np.sum(top[:, :K] >= target[:, None] - 1e-9 * np.maximum(top[:, :1], 1),
                        axis=1) - 1
        k_star = np.clip(k_star, 0, K - 1)
        e = rc_all[:, k_star].T.astype(np.float64)  # (B, S)
        a = rc_pk[:, k_star].T.astype(np.float64)
        b, c = e - a, p_s - a
        d = n_s - e - p_s + a
        with np.errstate(divide="ignore", invalid="ignore"):
            num = np.where(n_s > 0, a * d / n_s, 0.0)
            den = np.where(n_s > 0, b * c / n_s, 0.0)
        ws = w[:, stratum_trace]
        out[lo:lo + _CHUNK] = ratio_draws((ws * num).sum(axis=1), (ws * den).sum(axis=1))
    return out


def _top_sums(counts: np.ndarray) -> np.ndarray:
    """(..., K) -> (..., K + 1): element k is the sum of bins k..K-1 (0 at K)."""
    counts = np.asarray(counts, dtype=np.float64)
    rev = np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1]
    return np.concatenate([rev, np.zeros((*counts.shape[:-1], 1))], axis=-1)


# --------------------------------------------------------------------- per-trace stats
def partial_spearman(entropy: np.ndarray, mi: np.ndarray, trace: np.ndarray,
                     n_traces: int) -> np.ndarray:
    """Per trace, Spearman's rho of entropy and MI with the position removed: the
    partial correlation of their ranks given the position's rank,
    (r_hm - r_hp r_mp) / sqrt((1 - r_hp^2)(1 - r_mp^2)). NaN where undefined."""
    from forkview.analysis.overlap import rank_parts

    trace = np.asarray(trace, dtype=np.int64)
    position = np.arange(len(trace), dtype=np.float64)  # in order within each trace
    hm = rank_parts(entropy, mi, trace, n_traces).rho
    hp = rank_parts(entropy, position, trace, n_traces).rho
    mp = rank_parts(mi, position, trace, n_traces).rho
    with np.errstate(divide="ignore", invalid="ignore"):
        den = np.sqrt((1 - hp ** 2) * (1 - mp ** 2))
        out = np.where(den > 1e-12, (hm - hp * mp) / den, np.nan)
    return np.clip(out, -1, 1)


def auroc_per_trace(entropy: np.ndarray, peak: np.ndarray, trace: np.ndarray,
                    n_traces: int) -> np.ndarray:
    """AUROC of entropy as a detector of P within each trace (ties one half); NaN for
    a trace without a peak or without a non-peak. Its chance value is 0.5 whatever the
    trace's entropy level, unlike the pooled AUROC's."""
    from forkview.analysis.overlap import average_ranks

    trace = np.asarray(trace, dtype=np.int64)
    peak = np.asarray(peak, dtype=bool)
    ranks = average_ranks(entropy, trace)
    n_p = np.bincount(trace[peak], minlength=n_traces).astype(np.float64)
    n = np.bincount(trace, minlength=n_traces).astype(np.float64)
    n_n = n - n_p
    rank_sum = np.bincount(trace[peak], weights=ranks[peak], minlength=n_traces)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (rank_sum - n_p * (n_p + 1) / 2) / (n_p * n_n)
    return np.where((n_p > 0) & (n_n > 0), out, np.nan)


def cluster_t_test(values: np.ndarray, cluster: np.ndarray, null: float) -> dict[str, Any]:
    """Mean of per-trace values (NaN left out) and a two-sided one-sample t-test of the
    per-prompt means against `null` (prompts are the independent units; scipy)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    cluster = np.asarray(cluster, dtype=np.int64)[ok]
    v = values[ok]
    if not len(v):
        return {"estimate": math.nan, "p": math.nan, "clusters": 0, "traces": 0}
    ids, inv = np.unique(cluster, return_inverse=True)
    means = np.bincount(inv, weights=v) / np.bincount(inv)
    p = math.nan
    if len(means) >= 3 and np.ptp(means) > 0:
        p = float(stats.ttest_1samp(means, null).pvalue)
    return {"estimate": float(v.mean()), "p": p, "clusters": len(ids), "traces": len(v)}


def mean_draws(values: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Mean of the per-trace values (NaN left out) in each resample."""
    ok = np.isfinite(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (W @ np.where(ok, values, 0.0)) / (W @ ok)


def interval(draws: np.ndarray, level: float = 0.95) -> Interval:
    """overlap.percentile_interval, with the undefined (non-finite) draws counted."""
    from forkview.analysis.overlap import percentile_interval

    draws = np.asarray(draws, dtype=np.float64)
    lo, hi = percentile_interval(draws, level)
    return Interval(lo, hi, len(draws), int((~np.isfinite(draws)).sum()))


def position_profile(position_bin: np.ndarray, entropy: np.ndarray, mi: np.ndarray,
                     bins: int = POSITION_BINS) -> dict[str, list[float | None]]:
    """Mean entropy and mean MI by relative-position bin: the trend that a position
    control removes."""
    n = np.bincount(position_bin, minlength=bins).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.bincount(position_bin, weights=entropy, minlength=bins) / n
        m = np.bincount(position_bin, weights=mi, minlength=bins) / n
    return {"bin_start": [i / bins for i in range(bins)], "n": n.astype(int).tolist(),
            "entropy": [finite_or_none(v) for v in h], "mi": [finite_or_none(v) for v in m]}


# --------------------------------------------------------------------- multiplicity
def adjust(pvalues: Sequence[float], method: str) -> list[float]:
    """Holm ("holm") or Benjamini-Hochberg ("fdr_bh") adjusted p-values (statsmodels'
    multipletests); NaN entries stay NaN and are not counted as tests."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(len(p), np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method=method)[1]
    return out.tolist()


# --------------------------------------------------------------------- verdict
@dataclass
class Verdict:
    word: str  # enriched | depleted | no evidence
    sentence: str
    caveats: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.word, "sentence": self.sentence, "caveats": self.caveats}


def detectable_odds_ratio(ci: tuple[float, float], level: float = 0.95,
                          power: float = 0.8) -> float:
    """The odds ratio (above 1; its inverse below) that a two-sided test at 5% would
    detect with `power`, given the standard error implied by the interval's width on
    the log scale."""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0:
        return math.nan
    se = (math.log(hi) - math.log(lo)) / (2 * _z(level))
    return math.exp((_z(level) + _z(2 * power - 1)) * se)


def verdict(estimate: float, ci: tuple[float, float], adjusted_p: float, *,
            label: str, caveats: Sequence[str] = (), clusters: int | None = None) -> Verdict:
    """"enriched" / "depleted" when the adjusted p is below 5% and the interval excludes
    1; otherwise "no evidence". The sentence always carries the number."""
    lo, hi = ci
    ptext = _fp(adjusted_p)
    defined = not (math.isnan(estimate) or math.isnan(lo) or math.isnan(hi))
    num = (f"OR {_f(estimate)} [95% CI {_f(lo)}, {_f(hi)}], adjusted p "
           + (ptext if ptext.startswith("<") else f"= {ptext}"))
    notes = list(caveats)
    if clusters is not None and clusters < MIN_CLUSTERS:
        return Verdict("no evidence", f"{label}: no evidence either way: {clusters} "
                       f"prompt(s), fewer than the {MIN_CLUSTERS} a prompt-level interval "
                       f"needs ({num}).", notes)
    if defined and math.isfinite(adjusted_p) and adjusted_p < ALPHA and (lo > 1 or hi < 1):
        word = "enriched" if lo > 1 else "depleted"
        what = ("more often than chance" if word == "enriched" else
                "less often than chance")
        sentence = (f"{label}: {word}: high-entropy tokens are MI peaks {what} within the "
                    f"same trace and position, {num}.")
    elif math.isnan(estimate):
        word = "no evidence"
        sentence = (f"{label}: no evidence either way: the odds ratio is undefined (no "
                    f"stratum holds positions in both E and P, or in neither), {num}.")
    else:
        word = "no evidence"
        sentence = (f"{label}: no evidence that high-entropy tokens and MI peaks coincide "
                    f"more or less than chance within the same trace and position: {num}.")
        det = detectable_odds_ratio(ci)
        if math.isfinite(det) and det > 1.5:
            notes.append(f"low power: only an odds ratio beyond {det:.2f} (or below "
                         f"{1 / det:.2f}) would be detected with 80% power")
    return Verdict(word, sentence, notes)


def _f(v: float) -> str:
    if v is None or math.isnan(v):
        return "—"
    return "∞" if math.isinf(v) else f"{v:.2f}"


def _fp(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "—"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def finite_or_none(v: float | None) -> float | None:
    """A number for JSON: None where it is missing, NaN or infinite (one definition for
    the report's modules; overlap.py uses it too)."""
    return None if v is None or not math.isfinite(v) else float(v)


# --------------------------------------------------------------------- one row
PRIMARY_STATISTIC = "cmh_odds_ratio_position"
PRIMARY_NULL = (f"P independent of E within each trace and relative-position bin "
                f"({POSITION_BINS} bins): Cochran-Mantel-Haenszel test over trace x "
                "position-bin strata, two-sided")
STRATIFICATIONS = {
    "trace": "within trace",
    "trace_position": f"within trace and position bin ({POSITION_BINS})",
    "trace_class": "within trace and token class",
    "trace_position_class": "within trace, position bin and token class",
}


def infer(trace: np.ndarray, entropy: np.ndarray, mi: np.ndarray, high: np.ndarray,
          peak: np.ndarray, n_traces: int, W: np.ndarray, cluster: np.ndarray, *,
          classes: np.ndarray | None, refit: bool) -> dict[str, Any]:
    """Chance levels, stratified odds ratios, the primary endpoint and the controlled
    statistics of one model x estimator row (arrays per position used, sorted by
    (trace, position); `W` the prompt-clustered bootstrap weights per trace, `cluster`
    each trace's prompt index)."""
    trace = np.asarray(trace, dtype=np.int64)
    pbin = position_bins(trace, n_traces)
    strata_of = {"trace": trace, "trace_position": trace * POSITION_BINS + pbin}
    if classes is not None:
        nc = len(TOKEN_CLASSES)
        strata_of["trace_class"] = trace * nc + classes
        strata_of["trace_position_class"] = (trace * POSITION_BINS + pbin) * nc + classes
    tables: dict[str, Stratified] = {}
    for name, s in strata_of.items():
        size = {"trace": n_traces, "trace_position": n_traces * POSITION_BINS,
                "trace_class": n_traces * len(TOKEN_CLASSES),
                "trace_position_class": n_traces * POSITION_BINS * len(TOKEN_CLASSES)}[name]
        tables[name] = mantel_haenszel(stratum_cells(high, peak, s, size))

    # the primary endpoint: MH over trace x position bin, prompt-clustered interval
    stratum_trace = np.repeat(np.arange(n_traces), POSITION_BINS)
    draws = (primary_draws(entropy, high, peak, strata_of["trace_position"], stratum_trace,
                           W, refit) if len(W) else np.zeros(0))
    boot = log_interval(draws)
    prim = tables["trace_position"]
    primary = {
        "statistic": PRIMARY_STATISTIC,
        "definition": "Mantel-Haenszel odds ratio of E x P over trace x relative-position "
                      f"bin strata ({POSITION_BINS} bins)",
        # raw floats: an odds ratio of 0 or inf is a value here (JSON writes inf as null)
        "estimate": prim.estimate,
        "ci": [boot.lo, boot.hi],
        "ci_method": "95% percentile bootstrap over prompts"
                     + (", E's threshold refitted in each resample" if refit else
                        ", E held (per-trace or fixed threshold)"),
        "resamples": boot.draws, "undefined_resamples": boot.undefined,
        "p_two_sided": finite_or_none(prim.p), "null": PRIMARY_NULL,
        "null_mean_overlap": finite_or_none(prim.expected),
        "null_sd_overlap": finite_or_none(prim.null_sd),
        "observed_overlap": finite_or_none(prim.observed),
        "adjusted_p": None,  # set across the report's primaries (Holm)
    }

    # controlled per-trace statistics beside the raw ones
    partial = partial_spearman(entropy, mi, trace, n_traces)
    auc_t = auroc_per_trace(entropy, peak, trace, n_traces)
    controls: dict[str, Any] = {}
    for key, values, null in (("spearman_partial_position", partial, 0.0),
                              ("auroc_within_trace", auc_t, 0.5)):
        t = cluster_t_test(values, cluster, null)
        iv = interval(mean_draws(values, W)) if len(W) else Interval(math.nan, math.nan, 0, 0)
        controls[key] = {"estimate": finite_or_none(t["estimate"]),
                         "ci": [finite_or_none(iv.lo), finite_or_none(iv.hi)],
                         "undefined_resamples": iv.undefined, "p_two_sided": finite_or_none(t["p"]),
                         "null": f"mean = {null:g}: t-test over prompt means "
                                 f"({t['clusters']} prompts, {t['traces']} traces)",
                         "adjusted_p": None}
    for name, tab in tables.items():
        controls[f"mh_{name}"] = {**tab.to_json(), "null": "P independent of E "
                                  + STRATIFICATIONS[name] + " (CMH, two-sided)",
                                  "adjusted_p": None}

    chance = {
        "within_trace_expected_overlap": finite_or_none(tables["trace"].expected),
        "within_trace_null_sd": finite_or_none(tables["trace"].null_sd),
        "position_expected_overlap": finite_or_none(prim.expected),
    }
    return {"primary": primary, "cmh_odds_ratio": {"estimate": prim.estimate,
                                                   "ci": [boot.lo, boot.hi]},
            "controls": controls, "chance": chance,
            "position_profile": position_profile(pbin, entropy, mi)}


def set_association(a: np.ndarray, b: np.ndarray, trace: np.ndarray,
                    n_traces: int) -> dict[str, Any]:
    """Two sets over the same positions (two estimators' peaks, or one estimator's peaks
    with the right and the wrong reference), against chance within each trace: the
    overlap, its expectation sum_i |A_i||B_i|/n_i, the share of A also in B against
    that expectation, and the MH odds ratio over traces with its CMH p."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    tab = mantel_haenszel(stratum_cells(a, b, trace, n_traces))
    na, nb, both = int(a.sum()), int(b.sum()), int((a & b).sum())
    union = na + nb - both
    return {"n_positions": len(a), "n_a": na, "n_b": nb, "n_both": both,
            "expected_both": finite_or_none(tab.expected) if tab.strata else None,
            "jaccard": both / union if union else None,
            "a_in_b": both / na if na else None,
            "a_in_b_chance": (tab.expected / na) if na and tab.strata else None,
            "odds_ratio": tab.estimate, "ci": [tab.ci[0], tab.ci[1]],
            "p_two_sided": finite_or_none(tab.p)}


def bootstrap_weights_for(n_clusters: int, iterations: int, seed: int,
                          stream: int = 3) -> np.ndarray:
    """(iterations, n_clusters) resampling multiplicities from the seed's own stream
    (numpy SeedSequence [seed, stream]); stream 1 is the overlap bootstrap, 2 the null."""
    from forkview.analysis.overlap import bootstrap_weights

    return bootstrap_weights(n_clusters, iterations,
                             np.random.default_rng(np.random.SeedSequence([seed, stream])))
