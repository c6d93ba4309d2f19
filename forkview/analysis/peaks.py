"""MI peaks and the per-trace MI colour scale. Pure Python (no Textual, no numpy).

Peaks are per trace, by a named rule whose parameter is always shown with them:
- `tukey`: m_t > Q3 + tau * IQR (tau = 1.5), Tukey's upper fence;
- `topk`: the k largest values (k = 20, as MI-Peaks' plots);
- `topr`: the top rho of the trace's values (rho = 0.2, like "high-entropy").
Positions without a value (None / NaN: not computed, or not finite) never count.

MI estimators are on different scales (hsic is a normalised kernel score, not nats),
so the MI colours are per trace: the trace's 5th to 95th percentile split into the
same 9 viridis steps as entropy, values outside clipped to the ends. Percentiles
rather than min..max because peaks are outliers by definition: min..max would paint
almost every token in the lowest colour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from models.high_entropy import HIGH_ENTROPY_FRACTION, top_count

SCALE_QUANTILES = (0.05, 0.95)


def finite(values: Mapping[int, float | None]) -> dict[int, float]:
    """The positions that carry a real value."""
    return {p: float(v) for p, v in values.items()
            if v is not None and not math.isnan(v) and not math.isinf(v)}


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method) of a non-empty sequence."""
    if not values:
        raise ValueError("quantile of no values")
    s = sorted(values)
    pos = (len(s) - 1) * min(1.0, max(0.0, q))
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class PeakRule:
    name: str  # tukey | topk | topr
    param: float

    @property
    def label(self) -> str:
        """The rule with its parameter, as shown next to the peaks."""
        if self.name == "tukey":
            return f"tukey τ={self.param:g}"
        if self.name == "topk":
            return f"top-k k={int(self.param)}"
        return f"top-r ρ={self.param:g}"

    @property
    def definition(self) -> str:
        if self.name == "tukey":
            return f"m > Q3 + {self.param:g}·IQR"
        if self.name == "topk":
            return f"the {int(self.param)} largest values"
        return f"the top {self.param * 100:g}% of values"


TUKEY = PeakRule("tukey", 1.5)
RULES: tuple[PeakRule, ...] = (TUKEY, PeakRule("topk", 20),
                               PeakRule("topr", HIGH_ENTROPY_FRACTION))


def _largest(values: dict[int, float], k: int) -> list[int]:
    # Ties broken by position (earlier first) so the result is deterministic.
    ranked = sorted(values, key=lambda p: (-values[p], p))
    return sorted(ranked[:max(0, k)])


def find_peaks(values: Mapping[int, float | None], rule: PeakRule = TUKEY) -> list[int]:
    """Positions of the trace's MI peaks under `rule`, in order."""
    vals = finite(values)
    if not vals:
        return []
    if rule.name == "tukey":
        data = list(vals.values())
        q1, q3 = quantile(data, 0.25), quantile(data, 0.75)
        fence = q3 + rule.param * (q3 - q1)
        return sorted(p for p, v in vals.items() if v > fence)
    if rule.name == "topk":
        return _largest(vals, int(rule.param))
    if rule.name == "topr":
        return _largest(vals, top_count(len(vals), rule.param))
    raise ValueError(f"unknown peak rule {rule.name!r}")


def scale_range(values: Mapping[int, float | None]) -> tuple[float, float] | None:
    """(lo, hi) of the MI colour scale: the 5th and 95th percentiles (min..max when
    those coincide); None without any value."""
    vals = list(finite(values).values())
    if not vals:
        return None
    lo, hi = (quantile(vals, q) for q in SCALE_QUANTILES)
    if hi <= lo:
        lo, hi = min(vals), max(vals)
    return lo, hi


def scale_bin(value: float | None, lo: float, hi: float, n_bins: int = 9) -> int | None:
    """Colour step 0..n_bins-1 of a value on [lo, hi] (clipped); None without a value."""
    if value is None or math.isnan(value):
        return None
    if hi <= lo:
        return n_bins // 2 if value == lo else (0 if value < lo else n_bins - 1)
    frac = (value - lo) / (hi - lo)
    return max(0, min(n_bins - 1, int(frac * n_bins)))


def bin_edges(n: int, width: int) -> list[tuple[int, int]]:
    """Split positions 0..n-1 into at most `width` consecutive [start, end) bins: one
    position per column while they fit, else evenly sized groups."""
    if n <= 0 or width <= 0:
        return []
    if n <= width:
        return [(i, i + 1) for i in range(n)]
    return [(c * n // width, (c + 1) * n // width) for c in range(width)]
