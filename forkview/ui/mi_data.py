"""The MI runs of the trace on screen, as the explorer's views read them.

Pure Python (no Textual, no torch): the store's runs and values in, labels, the
selected series, its scale, peaks and per-token colour steps out. Every run of the
trace (estimator + full parameter set) is one series; `e` cycles the ones with values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forkview.analysis.peaks import TUKEY, PeakRule, find_peaks, scale_bin, scale_range
from models.estimators import REGISTRY
from models.estimators.base import SHORT_NAMES
from store.db import MIRunInfo


def _short_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value).replace("\n", "⏎")
    return text if len(text) <= 12 else text[:11] + "…"


def short_params(estimator: str, params: Mapping[str, Any]) -> str:
    """e.g. hsic -> "σ=50", a median-bandwidth plain run -> "σ=median norm=off". What
    to show comes from the estimator's own declaration (headline, short names, and its
    defaults as the usual values): nothing is copied here."""
    cls = REGISTRY.get(estimator)
    # getattr: a registered estimator need not subclass Estimator (duck typing)
    usual = getattr(cls, "defaults", None)
    headline = getattr(cls, "headline", ())
    names = {**SHORT_NAMES, **getattr(cls, "short_names", {})}
    parts = []
    for key in headline:
        if key in params:
            name = names.get(key, key)
            sep = "" if name.endswith(">") else "="
            parts.append(f"{name}{sep}{_short_value(params[key])}")
    for key, value in params.items():
        if key in headline:
            continue
        if usual is not None and usual.get(key, object()) == value:
            continue
        if usual is None and len(parts) >= 2:
            break  # an estimator this view doesn't know: its first parameters only
        parts.append(f"{names.get(key, key)}={_short_value(value)}")
    return " ".join(parts)


def format_value(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.2e}"


@dataclass
class MISeries:
    """One MI run of the trace: its values (position -> value) and details."""

    run: MIRunInfo
    values: dict[int, float | None]
    details: dict[int, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.run.estimator, json.dumps(self.run.params, sort_keys=True, default=str)

    @property
    def label(self) -> str:
        short = short_params(self.run.estimator, self.run.params)
        return f"{self.run.estimator} {short}".strip()

    @property
    def has_values(self) -> bool:
        return any(v is not None for v in self.values.values())


@dataclass
class AlternativeAnswers:
    """One forked alternative at a rollout position and where its continuations ended."""

    text: str
    prob: float | None
    emitted: bool
    answers: list[tuple[str, int]]  # (answer, count), most frequent first


def _answer_name(answer: Any) -> str:
    return "∅" if answer is None or answer == "" else str(answer)


def rollout_alternatives(detail: Any) -> list[AlternativeAnswers]:
    """Read a rollout detail generically: {"alternatives": [{text|token, prob|p,
    emitted, counts (over detail["classes"]) | answers {answer: n} | histogram}], ...}.
    Anything else gives no rows."""
    if not isinstance(detail, Mapping):
        return []
    alts = detail.get("alternatives")
    if not isinstance(alts, Sequence) or isinstance(alts, str):
        return []
    classes = detail.get("classes")
    out = []
    for alt in alts:
        if not isinstance(alt, Mapping):
            continue
        text = alt.get("text", alt.get("token", alt.get("token_id", "?")))
        prob = alt.get("prob", alt.get("p"))
        hist: list[tuple[str, int]] = []
        counts = alt.get("counts")
        answers = alt.get("answers", alt.get("histogram"))
        if isinstance(counts, Sequence) and isinstance(classes, Sequence):
            hist = [(_answer_name(c), int(n)) for c, n in zip(classes, counts, strict=False)
                    if n]
        elif isinstance(answers, Mapping):
            hist = [(_answer_name(a), int(n)) for a, n in answers.items() if n]
        elif isinstance(answers, Sequence) and not isinstance(answers, str):
            tally: dict[str, int] = {}
            for a in answers:
                tally[_answer_name(a)] = tally.get(_answer_name(a), 0) + 1
            hist = list(tally.items())
        hist.sort(key=lambda item: -item[1])
        out.append(AlternativeAnswers(
            text=str(text), prob=float(prob) if isinstance(prob, (int, float)) else None,
            emitted=bool(alt.get("emitted", False)), answers=hist))
    return out


class MIState:
    """The trace's MI series, which one is shown, and what the views derive from it."""

    def __init__(self) -> None:
        self.series: list[MISeries] = []
        self.selected: tuple[str, str] | None = None
        self.rule: PeakRule = TUKEY
        self.peaks: list[int] = []
        self.peak_set: set[int] = set()
        self.range: tuple[float, float] | None = None
        self._peak_cache: dict[tuple[tuple[str, str], PeakRule], set[int]] = {}

    # ---------------------------------------------------------------- data
    def load(self, series: list[MISeries], n_tokens: int) -> None:
        """Replace the runs (keeps the selected series when it is still there)."""
        self.series = series
        self._peak_cache.clear()
        keys = [s.key for s in self.shown_series]
        if self.selected not in keys:
            self.selected = self._default(keys)
        self._derive(n_tokens)

    def clear(self) -> None:
        self.load([], 0)

    def _default(self, keys: list[tuple[str, str]]) -> tuple[str, str] | None:
        if not keys:
            return None
        # The same estimator as before if it has a run here (its newest), else the first.
        if self.selected is not None:
            same = [k for k in keys if k[0] == self.selected[0]]
            if same:
                return same[-1]
        return keys[0]

    @property
    def shown_series(self) -> list[MISeries]:
        """Series `e` cycles through: runs with at least one value."""
        return [s for s in self.series if s.has_values]

    @property
    def current(self) -> MISeries | None:
        return next((s for s in self.series if s.key == self.selected), None)

    def cycle(self, n_tokens: int) -> MISeries | None:
        keys = [s.key for s in self.shown_series]
        if not keys:
            return None
        i = keys.index(self.selected) if self.selected in keys else -1
        self.selected = keys[(i + 1) % len(keys)]
        self._derive(n_tokens)
        return self.current

    def set_rule(self, rule: PeakRule, n_tokens: int) -> None:
        self.rule = rule
        self._derive(n_tokens)

    # ---------------------------------------------------------------- derived
    def _derive(self, n_tokens: int) -> None:
        cur = self.current
        values = cur.values if cur else {}
        values = {p: v for p, v in values.items() if 0 <= p < n_tokens}
        self.peaks = find_peaks(values, self.rule)
        self.peak_set = set(self.peaks)
        self.range = scale_range(values)

    def value_list(self, n_tokens: int) -> list[float | None]:
        cur = self.current
        if cur is None:
            return [None] * n_tokens
        return [cur.values.get(i) for i in range(n_tokens)]

    def bins(self, n_tokens: int) -> list[int | None]:
        """Colour step per token of the selected series (None: no value there)."""
        if self.range is None:
            return [None] * n_tokens
        lo, hi = self.range
        return [scale_bin(v, lo, hi) for v in self.value_list(n_tokens)]

    def peaks_of(self, series: MISeries) -> set[int]:
        if series.key == self.selected:
            return self.peak_set
        key = (series.key, self.rule)
        if key not in self._peak_cache:
            self._peak_cache[key] = set(find_peaks(series.values, self.rule))
        return self._peak_cache[key]


@dataclass
class PanelRow:
    """One MI run's line in the side panel."""

    label: str
    value: float | None
    status: str  # the run's: running | complete | stopped | failed
    selected: bool  # the series the views show
    peak: bool  # a peak of this run (current rule) at this position
    error: str | None = None


@dataclass
class PanelMI:
    """Everything the side panel shows about MI at one position."""

    rows: list[PanelRow]
    alternatives: list[AlternativeAnswers]  # rollout forks at this position, if any
    hint: str = ""


def panel_mi(state: MIState, index: int, hint: str = "") -> PanelMI:
    rows = []
    alternatives: list[AlternativeAnswers] = []
    for s in state.series:
        rows.append(PanelRow(
            label=s.label, value=s.values.get(index), status=s.run.status,
            selected=s.key == state.selected, peak=index in state.peaks_of(s),
            error=s.run.error))
        if not alternatives and index in s.details:
            alternatives = rollout_alternatives(s.details[index])
    return PanelMI(rows, alternatives, hint)
