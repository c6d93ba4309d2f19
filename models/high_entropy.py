"""The high-entropy rule, defined once: a trace's high-entropy tokens are its top 20%
by entropy, that is ceil(0.2 n) tokens (at least one) and every token tied with the
last of them. Pure Python (no torch, no numpy): the explorer, the stratified positions
of the rollout estimator (`stratified_positions`), the peak rules and the report's vectorised set E
(forkview/analysis/overlap.py) all count with `top_count`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

HIGH_ENTROPY_FRACTION = 0.2  # "high-entropy" = the top 20% of a trace's tokens


def top_count(n: int, fraction: float = HIGH_ENTROPY_FRACTION) -> int:
    """How many of n values make the top `fraction`: ceil(n * fraction), at least one.
    The epsilon keeps float noise from rounding up (15 * 0.2 = 3.0000000000000004)."""
    return max(1, math.ceil(n * fraction - 1e-9))


def high_entropy_threshold(entropies: Sequence[float | None],
                           fraction: float = HIGH_ENTROPY_FRACTION) -> float | None:
    """Smallest entropy still in the top `fraction` of the trace (ties included); None
    without any value (None and NaN entries never count)."""
    values = [e for e in entropies if e is not None and not math.isnan(e)]
    if not values:
        return None
    return sorted(values, reverse=True)[top_count(len(values), fraction) - 1]


def high_entropy_positions(entropies: Sequence[float | None],
                           fraction: float = HIGH_ENTROPY_FRACTION) -> list[int]:
    """Indices of the trace's high-entropy tokens, in order."""
    threshold = high_entropy_threshold(entropies, fraction)
    if threshold is None:
        return []
    return [i for i, e in enumerate(entropies) if e is not None and e >= threshold]


def stratified_positions(
    entropies: Sequence[float], rho: float = HIGH_ENTROPY_FRACTION, seed: int = 0
) -> list[int]:
    """Every high-entropy position (the top ``rho`` of the trace, ties at the threshold
    included) plus as many randomly chosen (seeded) low-entropy positions as controls,
    fewer if there are not enough; sorted."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], not {rho}")
    threshold = high_entropy_threshold(entropies, rho)
    if threshold is None:
        return []
    high = [i for i, h in enumerate(entropies) if h >= threshold]
    low = [i for i, h in enumerate(entropies) if h < threshold]
    controls = random.Random(seed).sample(low, min(len(high), len(low)))
    return sorted(high + controls)
