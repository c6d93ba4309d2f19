"""MI-Peaks' HSIC: the batched HsicTarget against the literal formulas, and its options.

Inputs mimic last-layer hidden states (heavy tails, scale ~30 like SmolLM2-135M's) and
also cover flat kernels (scale 1 with sigma = 50) and sharp ones (small sigma).
"""

from __future__ import annotations

import numpy as np
import pytest

from models.hsic import HsicTarget, hsic_direct, median_bandwidth

RTOL = 1e-5


def _pair_batch(d: int, n: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hy = rng.standard_t(4, d) * scale
    hs = 0.5 * hy + rng.standard_t(4, (n, d)) * scale
    return hs, hy


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    ("d", "scale", "bandwidth"),
    [
        (64, 30.0, 50.0),
        (64, 1.0, 50.0),  # flat kernel: tiny scores, rank ~4
        (64, 30.0, "median"),
        (64, 200.0, 50.0),  # spread wider than sigma: dense fallback at d = 64
        (128, 30.0, 7.5),
        (576, 30.0, 50.0),
        (576, 30.0, "median"),
    ],
)
def test_target_equals_direct(d, scale, bandwidth):
    n = 2 if d == 576 else 5
    hs, hy = _pair_batch(d, n, scale, seed=d)
    want = np.array([hsic_direct(h, hy, sigma=bandwidth) for h in hs])
    _assert_close(HsicTarget(hy, bandwidth=bandwidth).scores(hs), want)
    _assert_close(HsicTarget(hy, bandwidth=bandwidth, method="dense").scores(hs), want)


def test_every_dense_and_lowrank_combination_agrees():
    hs, hy = _pair_batch(96, 4, 30.0, seed=3)
    hs[1] *= 20.0  # this token's kernel needs a high rank
    want = np.array([hsic_direct(h, hy) for h in hs])
    for kw in ({}, {"max_rank": 1}, {"method": "dense", "backend": "numpy"}):
        got = HsicTarget(hy, **kw).evaluate(hs)
        _assert_close(got.values, want)
    mixed = HsicTarget(hy, max_rank=24).evaluate(hs)
    assert mixed.params["dense_tokens"] == [1]
    assert mixed.params["dense_y"] is False
    assert HsicTarget(hy, max_rank=1).evaluate(hs).params["dense_y"] is True
    # wide y, narrow x: y dense, tokens low rank
    wide = HsicTarget(hy * 20.0, max_rank=24).evaluate(hs[[0, 2]])
    assert wide.params["dense_y"] is True and wide.params["dense_tokens"] == []
    _assert_close(wide.values, [hsic_direct(h, hy * 20.0) for h in hs[[0, 2]]])


def test_lowrank_error_bound_is_reported_and_respected():
    hs, hy = _pair_batch(200, 6, 30.0, seed=11)
    want = np.array([hsic_direct(h, hy) for h in hs])
    for atol in (1e-3, 1e-8):
        res = HsicTarget(hy, atol=atol).evaluate(hs)
        assert 0 <= res.params["error_bound_max"] <= atol
        assert np.max(np.abs(res.values - want)) <= atol + 1e-9


def test_dependent_pairs_score_above_independent_ones():
    rng = np.random.default_rng(0)
    dep, ind = [], []
    for _ in range(8):
        x = rng.normal(0, 30, 128)
        y_dep = 40 * np.tanh(x / 30) + rng.normal(0, 3, 128)
        y_ind = rng.normal(0, 30, 128)
        dep.append(HsicTarget(y_dep).scores(x[None])[0])
        ind.append(HsicTarget(y_ind).scores(x[None])[0])
    assert np.mean(dep) > 1.5 * np.mean(ind)
    assert sum(a > b for a, b in zip(dep, ind, strict=True)) >= 7


def _plain_hsic(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    """Textbook biased HSIC, explicit centring matrices on both sides."""
    d = x.size
    h = np.eye(d) - np.full((d, d), 1.0 / d)
    kx = np.exp(-np.subtract.outer(x, x) ** 2 / (2 * sigma**2))
    ky = np.exp(-np.subtract.outer(y, y) ** 2 / (2 * sigma**2))
    return float(np.sum((h @ kx @ h) * (h @ ky @ h)) / (d - 1) ** 2)


@pytest.mark.parametrize("sigma", [50.0, 12.0])
def test_plain_hsic_matches_textbook_formula(sigma):
    hs, hy = _pair_batch(80, 3, 30.0, seed=5)
    want = [_plain_hsic(h, hy, sigma) for h in hs]
    _assert_close(HsicTarget(hy, bandwidth=sigma, normalised=False).scores(hs), want)
    _assert_close([hsic_direct(h, hy, sigma=sigma, normalised=False) for h in hs], want)
    assert HsicTarget(hy, normalised=False).params["variant"] == "plain"


def test_median_bandwidth_is_the_median_pairwise_distance():
    rng = np.random.default_rng(2)
    for a in (rng.normal(size=301), rng.normal(size=300), rng.integers(0, 4, 250) * 1.0,
              rng.standard_t(2, 1000) * 30):
        d = a.size
        brute = np.median(np.abs(np.subtract.outer(a, a))[np.triu_indices(d, 1)])
        assert median_bandwidth(a) == brute
    assert median_bandwidth(np.array([0.0, 1.0, 3.0])) == 2.0  # distances 1, 2, 3
    # over half the pairs tie at 0: the mean distance instead
    a = np.array([0.0] * 9 + [2.0])
    assert median_bandwidth(a) == pytest.approx(2.0 * 9 / 45)
    assert median_bandwidth(np.full(5, 7.0)) == 1.0


def _nocco(x: np.ndarray, y: np.ndarray, sx: float, sy: float) -> float:
    """MI-Peaks' normalised HSIC written out with its own kernels, per-side sigmas."""
    d = x.size
    h = np.eye(d) - np.full((d, d), 1.0 / d)
    r = []
    for a, s in ((x, sx), (y, sy)):
        kc = np.exp(-np.subtract.outer(a, a) ** 2 / (2 * s * s)) @ h
        r.append(kc @ np.linalg.inv(kc + 1e-5 * d * np.eye(d)))
    return float(np.sum(r[0] * r[1].T))


def test_bandwidth_options_are_used_as_documented_and_recorded():
    hs, hy = _pair_batch(64, 3, 30.0, seed=9)
    fixed = HsicTarget(hy, bandwidth=12.5).evaluate(hs)
    _assert_close(fixed.values, [_nocco(h, hy, 12.5, 12.5) for h in hs])
    assert fixed.params["sigma"] == 12.5 and fixed.params["sigma_y"] == 12.5
    assert fixed.params["bandwidth"] == "fixed" and "sigma_x" not in fixed.params

    med = HsicTarget(hy, bandwidth="median").evaluate(hs)
    sy = median_bandwidth(hy)
    sx = [median_bandwidth(h) for h in hs]
    _assert_close(med.values, [_nocco(h, hy, s, sy) for h, s in zip(hs, sx, strict=True)])
    assert med.params["bandwidth"] == "median" and "sigma" not in med.params
    assert med.params["sigma_y"] == sy and med.params["sigma_x"] == sx
    assert len(set(sx)) == 3  # one sigma per token, not a shared one

    p = fixed.params
    assert p["eps"] == 1e-5 and p["centring"] == "right" and p["variant"] == "normalised"
    assert p["d"] == 64 and p["n"] == 3 and p["method"] == "lowrank"
    assert p["dtype"] == "float64"


def test_defaults_follow_mi_peaks():
    hs, hy = _pair_batch(64, 2, 30.0, seed=1)
    p = HsicTarget(hy).params
    assert p["sigma"] == 50.0 and p["eps"] == 1e-5 and p["variant"] == "normalised"
    _assert_close([hsic_direct(hs[0], hy)], [_nocco(hs[0], hy, 50.0, 50.0)])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x, y: hsic_direct(x, y, sigma=0.0), "positive"),
        (lambda x, y: hsic_direct(x, y, sigma=-1.0), "positive"),
        (lambda x, y: hsic_direct(x, y, sigma=float("nan")), "positive"),
        (lambda x, y: hsic_direct(x, y, sigma="silverman"), "unknown bandwidth"),
        (lambda x, y: hsic_direct(x, y, eps=0.0), "eps"),
        (lambda x, y: hsic_direct(x, y[:-1]), "differ in length"),
        (lambda x, y: hsic_direct(x[None], y), "1-D"),
        (lambda x, y: hsic_direct(x[:1], y[:1]), "at least 2"),
        (lambda x, y: hsic_direct(np.full_like(x, np.nan), y), "NaN"),
        (lambda x, y: HsicTarget(y, bandwidth=-3), "positive"),
        (lambda x, y: HsicTarget(y, bandwidth="Median"), "unknown bandwidth"),
        (lambda x, y: HsicTarget(y, method="exact"), "unknown method"),
        (lambda x, y: HsicTarget(y, backend="jax"), "unknown backend"),
        (lambda x, y: HsicTarget(y, atol=0.0), "atol"),
        (lambda x, y: HsicTarget(y, max_rank=0), "max_rank"),
        (lambda x, y: HsicTarget(y).scores(x), r"shape \(n, 16\)"),
        (lambda x, y: HsicTarget(y).scores(np.ones((2, 15))), r"shape \(n, 16\)"),
    ],
)
def test_bad_parameters_raise_one_line_value_errors(call, message):
    x, y = np.arange(16.0), np.arange(16.0)[::-1].copy()
    with pytest.raises(ValueError, match=message) as err:
        call(x, y)
    assert "\n" not in str(err.value)


def test_empty_batch_and_constant_vectors():
    hy = np.random.default_rng(0).normal(0, 30, 32)
    res = HsicTarget(hy).evaluate(np.zeros((0, 32)))
    assert res.values.shape == (0,)
    # a constant token carries no information: its centred kernel is 0
    assert HsicTarget(hy).scores(np.full((1, 32), 3.0))[0] == pytest.approx(0.0, abs=1e-9)
    assert hsic_direct(np.full(32, 3.0), hy) == pytest.approx(0.0, abs=1e-9)
