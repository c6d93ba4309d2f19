"""The overlap statistics: known answers on synthetic data, and scipy / sklearn where
they compute the same thing. Slow reference implementations here are written for
clarity (loops over traces); the module's vectorised ones must agree with them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu, rankdata, spearmanr
from sklearn.metrics import roc_auc_score

from forkview.analysis import overlap as ov
from forkview.analysis.peaks import RULES, TUKEY, PeakRule, find_peaks


def flat(traces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trace index, position, values) of a list of per-trace arrays."""
    trace = np.concatenate([np.full(len(t), i) for i, t in enumerate(traces)])
    pos = np.concatenate([np.arange(len(t)) for t in traces])
    return trace.astype(np.int64), pos.astype(np.int64), np.concatenate(traces)


def random_traces(rng: np.random.Generator, n: int = 30, lo: int = 1, hi: int = 60,
                  ties: bool = True) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        v = rng.normal(size=int(rng.integers(lo, hi)))
        if ties:
            v = np.round(v, 1)  # plenty of ties
        out.append(v)
    return out


# ------------------------------------------------------------------ the sets
def test_top_fraction_corpus_known_answer():
    v = np.arange(10.0)
    mask, thr = ov.top_fraction_mask(v, 0.2)
    assert mask.tolist() == [False] * 8 + [True, True] and float(thr) == 8
    # ties at the threshold are all in (the explorer's rule)
    mask, thr = ov.top_fraction_mask(np.array([1.0, 1.0, 1.0, 0.0]), 0.25)
    assert mask.tolist() == [True, True, True, False]
    # ceil(15 * 0.2) is 3, not 4 (15 * 0.2 = 3.0000000000000004 in floats)
    mask, _ = ov.top_fraction_mask(np.arange(15.0), 0.2)
    assert mask.sum() == 3
    # non-finite values never count and don't count towards n
    mask, _ = ov.top_fraction_mask(np.array([np.nan, 5.0, np.inf, 1.0, 2.0, 3.0, 4.0]), 0.2)
    assert np.flatnonzero(mask).tolist() == [1]


def test_top_fraction_per_trace_matches_a_loop():
    rng = np.random.default_rng(1)
    traces = random_traces(rng)
    trace, _, v = flat(traces)
    mask, thr = ov.top_fraction_mask(v, 0.2, trace)
    for i, t in enumerate(traces):
        k = max(1, math.ceil(len(t) * 0.2 - 1e-9))
        kth = sorted(t, reverse=True)[k - 1]
        assert thr[i] == kth
        assert mask[trace == i].tolist() == (t >= kth).tolist()


def test_high_entropy_scopes():
    trace = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    h = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 1.0, 2.0, 3.0, 4.0, 5.0])
    corpus, thr = ov.high_entropy_mask(h, trace, ov.EntropyRule("corpus", 0.2))
    assert np.flatnonzero(corpus).tolist() == [8, 9] and float(thr) == 4.0
    per, thr = ov.high_entropy_mask(h, trace, ov.EntropyRule("trace", 0.2))
    assert np.flatnonzero(per).tolist() == [4, 9] and thr.tolist() == [0.4, 5.0]
    fixed, _ = ov.high_entropy_mask(h, trace, ov.EntropyRule("threshold", threshold=0.672))
    assert np.flatnonzero(fixed).tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError):
        ov.EntropyRule("corpus", 1.0)
    with pytest.raises(ValueError):
        ov.EntropyRule("threshold")


@pytest.mark.parametrize("rule", [*RULES, PeakRule("tukey", 0.0), PeakRule("topk", 3),
                                  PeakRule("topr", 0.5)], ids=lambda r: r.label)
def test_peak_mask_is_find_peaks(rule):
    rng = np.random.default_rng(2)
    traces = random_traces(rng, n=60, lo=1, hi=80)
    for t in traces[::5]:
        t[rng.random(len(t)) < 0.2] = np.nan  # missing MI
    trace, _, v = flat(traces)
    mask = ov.peak_mask(v, trace, rule)
    for i, t in enumerate(traces):
        expected = find_peaks(dict(enumerate(t.tolist())), rule)
        assert np.flatnonzero(mask[trace == i]).tolist() == expected, (i, t)


def test_peak_mask_known_answer():
    # Q1 = 1, Q3 = 3, IQR = 2: the fence is 3 + 1.5 * 2 = 6
    v = np.array([1.0, 1, 1, 2, 3, 3, 3, 6, 7])
    assert np.flatnonzero(ov.peak_mask(v, np.zeros(9, int), PeakRule("tukey", 1.5))) \
        .tolist() == [8]
    assert np.flatnonzero(ov.peak_mask(v, np.zeros(9, int), PeakRule("topk", 2))) \
        .tolist() == [7, 8]


# ------------------------------------------------------------------ ranks, Spearman, AUROC
def test_average_ranks_match_scipy():
    rng = np.random.default_rng(3)
    traces = random_traces(rng)
    trace, _, v = flat(traces)
    assert np.allclose(ov.average_ranks(v), rankdata(v))
    within = ov.average_ranks(v, trace)
    for i, t in enumerate(traces):
        assert np.allclose(within[trace == i], rankdata(t))


def test_spearman_per_trace_matches_scipy():
    rng = np.random.default_rng(4)
    xs = random_traces(rng, n=40, lo=3, hi=50)
    ys = [np.round(x + rng.normal(size=len(x)), 1) for x in xs]
    xs.append(np.ones(5))  # constant: undefined
    ys.append(np.arange(5.0))
    xs.append(np.array([1.0, 2.0]))  # too short
    ys.append(np.array([2.0, 1.0]))
    trace, _, x = flat(xs)
    _, _, y = flat(ys)
    rho = ov.spearman_per_trace(x, y, trace, len(xs))
    for i in range(40):
        expected = spearmanr(xs[i], ys[i]).statistic
        if np.isnan(expected):
            assert np.isnan(rho[i])
        else:
            assert rho[i] == pytest.approx(expected, abs=1e-12)
    assert np.isnan(rho[40]) and np.isnan(rho[41])


def test_auroc_matches_sklearn_and_mann_whitney():
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=500), 1)  # ties between classes
    labels = rng.random(500) < 0.3 + 0.2 * (scores > 0)
    got = ov.auroc(scores, labels)
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    u = mannwhitneyu(scores[labels], scores[~labels]).statistic
    assert got == pytest.approx(u / (labels.sum() * (~labels).sum()), abs=1e-12)
    assert ov.auroc(np.array([1.0, 2.0, 3.0]), np.array([False, True, True])) == 1.0
    assert ov.auroc(np.array([1.0, 1.0]), np.array([False, True])) == 0.5
    assert math.isnan(ov.auroc(np.array([1.0, 2.0]), np.array([True, True])))


# ------------------------------------------------------------------ set statistics
def test_odds_ratio_and_haldane():
    assert ov.odds_ratio(10, 20, 5, 65) == pytest.approx(10 * 65 / (20 * 5))
    # a zero cell: 0.5 added to every cell
    assert ov.odds_ratio(0, 5, 5, 10) == pytest.approx(0.5 * 10.5 / (5.5 * 5.5))
    assert ov.odds_ratio(3, 0, 2, 4) == pytest.approx(3.5 * 4.5 / (0.5 * 2.5))
    arr = ov.odds_ratio(np.array([10, 0]), np.array([20, 5]), np.array([5, 5]),
                        np.array([65, 10]))
    assert arr.tolist() == pytest.approx([6.5, 0.5 * 10.5 / (5.5 * 5.5)])


def test_overlap_known_answer():
    #            E: 0 1 2 3 4 5 6 7 8 9      P: 2 3 7
    high = np.zeros(10, bool)
    high[[0, 1, 2, 3]] = True
    peak = np.zeros(10, bool)
    peak[[2, 3, 7]] = True
    counts = ov.per_trace_counts(high, peak, np.zeros(10, int), 1)
    assert counts.tolist() == [[10, 4, 3, 2]]
    s = ov.overlap_from_counts(*counts[0])
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 4)
    assert s["jaccard"] == pytest.approx(2 / 5)
    assert s["base_rate"] == pytest.approx(4 / 10)
    assert s["lift"] == pytest.approx((2 / 3) / (4 / 10))
    assert s["odds_ratio"] == pytest.approx((2 * 5) / (2 * 1))
    empty = ov.overlap_from_counts(10, 4, 0, 0)
    assert math.isnan(empty["precision"]) and empty["recall"] == 0


def test_lag_profile_known_answer_and_no_wraparound():
    # E at 0, 4, 9; peaks one token after two of them, plus one at 0 that a
    # wrap-around would pair with the high-entropy token at 9 of the same trace.
    high = np.zeros(10, bool)
    high[[0, 4, 9]] = True
    peak = np.zeros(10, bool)
    peak[[0, 1, 5]] = True
    trace = np.zeros(10, int)
    pos = np.arange(10)
    c = ov.lag_counts(high, peak, trace, pos, 1, lags=(-1, 0, 1))
    stats = ov.lag_stats(c.sum(axis=0))
    # lag +1: pairs (t, t+1) for t in 0..8 (9 has no partner): E_t = {0, 4},
    # P_t+1 at t = {0, 4}: both 2, peaks 2, union 2
    assert c[0, 2].tolist() == [9, 2, 2, 2]
    assert stats["precision"][2] == 1.0
    # lag 0: E∩P = {0}
    assert c[0, 1].tolist() == [10, 1, 3, 5]
    # lag -1: pairs (t, t-1) for t in 1..9; nothing pairs 0 with 9
    assert c[0, 0, 0] == 9 and c[0, 0, 1] == 0


def test_lag_profile_matches_a_loop_with_gaps():
    rng = np.random.default_rng(6)
    rows = []
    for t in range(12):
        positions = np.sort(rng.choice(40, size=int(rng.integers(1, 30)), replace=False))
        rows += [(t, p) for p in positions]
    trace = np.array([r[0] for r in rows])
    pos = np.array([r[1] for r in rows])
    high = rng.random(len(rows)) < 0.3
    peak = rng.random(len(rows)) < 0.2
    c = ov.lag_counts(high, peak, trace, pos, 12).sum(axis=0)
    where = {(t, p): i for i, (t, p) in enumerate(rows)}
    for li, lag in enumerate(ov.LAGS):
        pairs = [(i, where[(t, p + lag)]) for i, (t, p) in enumerate(rows)
                 if (t, p + lag) in where]
        both = sum(high[i] and peak[j] for i, j in pairs)
        peaks = sum(peak[j] for _, j in pairs)
        union = sum(high[i] or peak[j] for i, j in pairs)
        assert c[li].tolist() == [len(pairs), both, peaks, union], lag


def test_entropy_summary_known_answer():
    h = np.array([0.0, 0.001, 0.005, 0.5, 1.0, np.nan])
    s = ov.entropy_summary(h, quantiles=(0.5, 0.8))
    assert s["n"] == 5
    assert s["median"] == 0.005 and s["quantiles"]["0.5"] == 0.005
    assert s["quantiles"]["0.8"] == pytest.approx(np.quantile(h[:5], 0.8))
    assert s["fraction_below"] == pytest.approx(3 / 5)
    assert s["fraction_above_wang"] == pytest.approx(1 / 5)
    assert s["mean"] == pytest.approx(np.mean(h[:5]))


def test_token_table_and_agreement():
    texts = ["a", "b", "a", "c", "b", "a"]
    assert ov.token_table(texts, [0, 1, 2, 4, 5], top=2) == [("a", 3), ("b", 2)]
    assert ov.token_table(texts, [3, 1]) == [("b", 1), ("c", 1)]  # ties by text
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    b = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], bool)
    s = ov.set_agreement(a, b)
    assert s["a_in_b"] == 0.75 and s["b_in_a"] == 0.75 and s["jaccard"] == 3 / 5


def test_agreement_by_trace_uses_one_rule_for_both():
    trace = np.repeat([0, 1], 10)
    a = np.tile(np.arange(10.0), 2)
    b = a.copy()
    b[[9, 19]] = -1  # model B: the top token of each trace is now its lowest
    out = ov.agreement_by_trace(trace, a, b, kind="entropy",
                                rule=ov.EntropyRule("trace", 0.2))
    # A's top-2 per trace {8, 9}, B's {7, 8}: 1 of 2 shared in each trace
    assert out["a_in_b"] == 0.5 and out["n_traces"] == 2 and out["n_positions"] == 20
    same = ov.agreement_by_trace(trace, a, a, kind="peaks", rule=PeakRule("topk", 3))
    assert same["jaccard"] == 1.0 and same["n_a"] == 6


# ------------------------------------------------------------------ null and bootstrap
def test_circular_xcorr_matches_brute_force():
    rng = np.random.default_rng(7)
    traces = [rng.normal(size=int(n)) for n in rng.integers(1, 70, size=25)]
    ys = [rng.normal(size=len(t)) for t in traces]
    trace, _, x = flat(traces)
    _, _, y = flat(ys)
    (got,) = ov.circular_xcorr([x], y, trace, len(traces))
    starts, _ = ov.trace_bounds(trace)
    for i, (xt, yt) in enumerate(zip(traces, ys, strict=True)):
        for o in range(len(xt)):
            assert got[starts[i] + o] == pytest.approx(np.dot(xt, np.roll(yt, -o)),
                                                       abs=1e-9)


def test_p_value_formula():
    null = np.array([1.0, 2.0, 3.0])
    assert ov.p_value(null, 2.0, "greater") == (1 + 2) / 4
    assert ov.p_value(null, 5.0, "greater") == 1 / 4
    assert ov.p_value(np.array([np.nan, 9.0]), 5.0, "greater") == 2 / 3
    assert ov.p_value(null, 0.0, "less") == 1 / 4
    # two-sided (the default): twice the smaller tail, capped at 1
    assert ov.p_value(null, 5.0) == 2 / 4
    assert ov.p_value(null, 0.0) == 2 / 4
    assert ov.p_value(null, 2.0) == 1.0
    p, tail, mean, sd = ov.null_test(null, 0.0)
    assert (p, tail, mean, sd) == (0.5, "lower", 2.0, 1.0)


def test_a_depletion_is_significant_two_sided():
    """MI peaks placed where entropy is lowest: the one-sided upper p would read ~1."""
    trace, pos, h, m = planted(link=-1.0)
    high, _ = ov.high_entropy_mask(h, trace, ov.EntropyRule())
    res = ov.analyse(trace, pos, h, m, high, PeakRule("topr", 0.2), bootstrap=0, null=200)
    for name in ("jaccard", "spearman", "auroc"):
        assert res.stats[name].p == 2 / 201 and res.stats[name].tail == "lower", name
        assert res.stats[name].value < res.stats[name].null_mean


def planted(seed: int = 8, n_traces: int = 40, link: float = 1.0):
    """Traces where MI follows entropy with strength `link` (0: independent)."""
    rng = np.random.default_rng(seed)
    ents, mis = [], []
    for _ in range(n_traces):
        n = int(rng.integers(20, 80))
        h = rng.exponential(0.5, n) * (rng.random(n) < 0.6)
        ents.append(h)
        mis.append(link * h + rng.normal(0, 0.3, n))
    trace, pos, h = flat(ents)
    _, _, m = flat(mis)
    return trace, pos, h, m


def slow_null(trace, pos, h, m, high, rule, iterations, seed):
    """The null by brute force: shift every trace's MI, recompute from scratch."""
    n_tr = int(trace.max()) + 1
    starts, lengths = ov.trace_bounds(trace, n_tr)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    offsets = ov.shift_offsets(lengths, iterations, rng)
    out = {"jaccard": [], "spearman": [], "auroc": []}
    for it in range(iterations):
        shifted = np.concatenate([np.roll(m[starts[i]:starts[i] + lengths[i]],
                                          -offsets[it, i]) for i in range(n_tr)])
        peak = ov.peak_mask(shifted, trace, rule)
        c = ov.per_trace_counts(high, peak, trace, n_tr).sum(axis=0)
        out["jaccard"].append(ov.overlap_from_counts(*c)["jaccard"])
        rho = ov.spearman_per_trace(h, shifted, trace, n_tr)
        out["spearman"].append(np.nanmean(rho))
        out["auroc"].append(ov.auroc(h, peak))
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_shift_null_matches_brute_force(rule):
    trace, pos, h, m = planted(link=0.3)
    high, _ = ov.high_entropy_mask(h, trace, ov.EntropyRule())
    res = ov.analyse(trace, pos, h, m, high, rule, bootstrap=0, null=60, seed=3)
    slow = slow_null(trace, pos, h, m, high, rule, 60, seed=3)
    for name in ("jaccard", "spearman", "auroc"):
        assert res.stats[name].p == ov.p_value(slow[name], res.stats[name].value), name


def test_null_separates_planted_from_independent():
    trace, pos, h, m = planted(link=1.0)
    high, _ = ov.high_entropy_mask(h, trace, ov.EntropyRule())
    strong = ov.analyse(trace, pos, h, m, high, PeakRule("topr", 0.2), bootstrap=0,
                        null=200)
    assert strong.stats["jaccard"].p == 2 / 201 and strong.stats["auroc"].p == 2 / 201
    # Independent series: two-sided p-values are roughly uniform, so over 20 data sets
    # about 1 in 20 falls below 0.05 (seed 8's Spearman does, at 0.04, on the low side).
    small = {"jaccard": 0, "spearman": 0}
    for seed in range(20):
        trace, pos, h, m = planted(seed=seed, link=0.0)
        high, _ = ov.high_entropy_mask(h, trace, ov.EntropyRule())
        none = ov.analyse(trace, pos, h, m, high, PeakRule("topr", 0.2), bootstrap=0,
                          null=200, seed=seed)
        for k in small:
            small[k] += none.stats[k].p < 0.05
    assert all(v <= 3 for v in small.values()), small


def test_bootstrap_resamples_traces_and_matches_a_loop():
    trace, pos, h, m = planted()
    n_tr = int(trace.max()) + 1
    high, _ = ov.high_entropy_mask(h, trace, ov.EntropyRule())
    rule = PeakRule("topr", 0.2)
    res = ov.analyse(trace, pos, h, m, high, rule, bootstrap=150, null=0, seed=11)
    W = ov.bootstrap_weights(n_tr, 150, np.random.default_rng(np.random.SeedSequence([11, 1])))
    assert (W.sum(axis=1) == n_tr).all()
    peak = ov.peak_mask(m, trace, rule)
    starts, lengths = ov.trace_bounds(trace, n_tr)
    prec, auc = [], []
    for w in W:
        # the resample spelled out: each trace's tokens repeated w times
        take = np.concatenate([np.tile(np.arange(starts[i], starts[i] + lengths[i]), int(k))
                               for i, k in enumerate(w) if k])
        c = ov.per_trace_counts(high[take], peak[take], np.zeros(len(take), int), 1)[0]
        prec.append(ov.overlap_from_counts(*c)["precision"])
        auc.append(ov.auroc(h[take], peak[take]))
    lo, hi = ov.percentile_interval(prec)
    assert (res.stats["precision"].lo, res.stats["precision"].hi) == pytest.approx((lo, hi))
    # AUROC's bootstrap bins scores (documented): close to the exact resamples
    lo, hi = ov.percentile_interval(auc)
    assert res.stats["auroc"].lo == pytest.approx(lo, abs=0.01)
    assert res.stats["auroc"].hi == pytest.approx(hi, abs=0.01)
    assert res.stats["auroc"].lo < res.stats["auroc"].value < res.stats["auroc"].hi


def test_analyse_is_reproducible_with_a_seed():
    trace, pos, h, m = planted()
    high, _ = ov.high_entropy_mask(h, trace, ov.EntropyRule())
    a = ov.analyse(trace, pos, h, m, high, TUKEY, bootstrap=100, null=100, seed=5)
    b = ov.analyse(trace, pos, h, m, high, TUKEY, bootstrap=100, null=100, seed=5)
    c = ov.analyse(trace, pos, h, m, high, TUKEY, bootstrap=100, null=100, seed=6)
    assert a.to_json() == b.to_json()
    assert a.to_json()["stats"] != c.to_json()["stats"]


def test_analyse_skips_missing_mi_and_reports_counts():
    trace, pos, h, m = planted()
    m = m.copy()
    m[::3] = np.nan
    high, _ = ov.high_entropy_mask(h, trace, ov.EntropyRule())
    texts = [f"t{i % 7}" for i in range(len(h))]
    res = ov.analyse(trace, pos, h, m, high, PeakRule("topk", 5), texts=texts,
                     trace_ids=list(range(100, 100 + int(trace.max()) + 1)),
                     bootstrap=50, null=50)
    used = np.isfinite(m)
    assert res.n_positions == int(used.sum())
    assert res.n_high == int((high & used).sum())
    assert res.trace_ids[0] == 100
    assert sum(res.per_trace["n"]) == res.n_positions
    assert sum(c for _, c in res.tokens["high"]) <= res.n_high
    assert res.lags[3]["lag"] == 0 and res.lags[3]["precision"] == res.stats["precision"].value
    # the statistics only ever see the positions with MI
    idx = np.flatnonzero(used)
    direct = ov.analyse(trace[idx], pos[idx], h[idx], m[idx], high[idx], PeakRule("topk", 5),
                        bootstrap=50, null=50)
    assert direct.stats["precision"].value == res.stats["precision"].value
    assert direct.stats["spearman"].value == res.stats["spearman"].value


def test_odds_ratio_undefined_without_peaks():
    assert math.isnan(ov.odds_ratio(0, 9, 0, 185))  # |P| = 0
    assert math.isnan(ov.overlap_from_counts(194, 9, 0, 0)["odds_ratio"])
