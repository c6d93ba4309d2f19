"""The strip chart under the trace: entropy and the chosen MI along the positions.

Three rows: `H` entropy bars, `MI` bars of the selected MI series, and a marker row
(• high entropy: top 20% of the trace, ▲ MI peak, ◆ both, ◇ a counterfactual result
there and nothing else; a counterfactual result under a mark underlines it). One column
per position
while they fit, else consecutive positions share a column (bars show the column's
largest value, markers any marked position in it). The cursor's column is reversed in
all three rows; clicking a column moves the cursor there (to the column's largest
value of the row clicked, its first peak on the marker row).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.message import Message
from textual.strip import Strip
from textual.widget import Widget

from forkview.analysis.peaks import bin_edges, scale_bin
from forkview.ui.scale import CURSOR_STYLE, VIRIDIS, entropy_bin

BLOCKS = "▁▂▃▄▅▆▇█"
LABEL_W = 3
HIGH_MARK, PEAK_MARK, BOTH_MARK, CF_MARK = "•", "▲", "◆", "◇"
_FG = [Style(color=Color.parse(c)) for c in VIRIDIS]


def _level(frac: float) -> str:
    if math.isnan(frac):
        return BLOCKS[0]
    return BLOCKS[max(0, min(len(BLOCKS) - 1, int(frac * len(BLOCKS))))]


class StripChart(Widget):
    """Entropy / MI / markers along the trace, in sync with the trace cursor."""

    DEFAULT_CSS = """
    StripChart {
        height: 3;
        padding: 0 0 0 1;
        background: $boost;
    }
    StripChart .strip-chart--label {
        color: $text-muted;
    }
    """
    COMPONENT_CLASSES: ClassVar[set[str]] = {"strip-chart--label"}

    class Selected(Message):
        """A column was clicked: move the cursor to `position`."""

        def __init__(self, position: int) -> None:
            super().__init__()
            self.position = position

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.entropies: list[float] = []
        self.high: set[int] = set()
        self.mi: list[float | None] = []
        self.mi_range: tuple[float, float] | None = None
        self.peaks: set[int] = set()
        self.counterfactual: set[int] = set()  # positions with a keep-vs-redraw result
        self.cursor = -1

    # ---------------------------------------------------------------- data
    def set_entropy(self, entropies: Sequence[float], high: set[int]) -> None:
        self.entropies = list(entropies)
        self.high = set(high)
        self.refresh()

    def set_mi(self, values: Sequence[float | None], scale: tuple[float, float] | None,
               peaks: set[int]) -> None:
        self.mi = list(values)
        self.mi_range = scale
        self.peaks = set(peaks)
        self.refresh()

    def set_counterfactual(self, positions: set[int]) -> None:
        self.counterfactual = set(positions)
        self.refresh()

    def set_cursor(self, index: int) -> None:
        if index != self.cursor:
            self.cursor = index
            self.refresh()

    # ---------------------------------------------------------------- geometry
    def columns(self) -> list[tuple[int, int]]:
        return bin_edges(len(self.entropies), max(0, self.size.width - LABEL_W))

    def column_of(self, index: int) -> int | None:
        for c, (start, end) in enumerate(self.columns()):
            if start <= index < end:
                return c
        return None

    def position_at(self, column: int, row: int) -> int | None:
        cols = self.columns()
        if not 0 <= column < len(cols):
            return None
        start, end = cols[column]
        span = range(start, end)
        if row == 0:
            return max(span, key=lambda i: (self.entropies[i], -i))
        if row == 1:
            with_mi = [i for i in span if self._mi(i) is not None]
            if with_mi:
                return max(with_mi, key=lambda i: (self._mi(i), -i))
        if row == 2:
            marked = ([i for i in span if i in self.peaks] or [i for i in span if i in self.high]
                      or [i for i in span if i in self.counterfactual])
            if marked:
                return marked[0]
        return start

    def _mi(self, i: int) -> float | None:
        v = self.mi[i] if i < len(self.mi) else None
        return None if v is None or math.isnan(v) else v

    # ---------------------------------------------------------------- rendering
    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.rich_style
        label_style = base + self.get_component_rich_style("strip-chart--label")
        if y > 2 or not self.entropies:
            return Strip.blank(width, base)
        label = ("H", "MI", "")[y]
        segments = [Segment(f"{label:<{LABEL_W}}", label_style)]
        if y == 1 and not self.mi:
            segments.append(Segment("no MI values", label_style + Style(italic=True)))
            return Strip(segments).adjust_cell_length(width, base)
        cols = self.columns()
        cursor_col = self.column_of(self.cursor) if self.cursor >= 0 else None
        if y == 0:
            top = max((e for e in self.entropies if not math.isnan(e)), default=0.0) or 1.0
        mi_vals = [v for v in (self._mi(i) for i in range(len(self.entropies)))
                   if v is not None]
        mi_lo, mi_hi = (min(mi_vals), max(mi_vals)) if mi_vals else (0.0, 0.0)
        no_color = self.app.no_color
        for c, (start, end) in enumerate(cols):
            span = range(start, end)
            style = base
            if y == 0:
                e = max(self.entropies[i] for i in span)
                char = _level(e / top)
                if not no_color:
                    style += _FG[entropy_bin(e)]
            elif y == 1:
                vals = [v for v in (self._mi(i) for i in span) if v is not None]
                if not vals:
                    char = "·"
                    style += Style(dim=True)
                else:
                    v = max(vals)
                    frac = (v - mi_lo) / (mi_hi - mi_lo) if mi_hi > mi_lo else 0.5
                    char = _level(frac)
                    if self.mi_range is not None and not no_color:
                        step = scale_bin(v, *self.mi_range)
                        if step is not None:
                            style += _FG[step]
            else:
                peak = any(i in self.peaks for i in span)
                high = any(i in self.high for i in span)
                cf = any(i in self.counterfactual for i in span)
                char = BOTH_MARK if peak and high else PEAK_MARK if peak else (
                    HIGH_MARK if high else CF_MARK if cf else " ")
                if peak:
                    style += Style(bold=True)
                if cf and char != CF_MARK:
                    style += Style(underline=True)
            if c == cursor_col:
                style += CURSOR_STYLE
            segments.append(Segment(char, style))
        return Strip(segments).adjust_cell_length(width, base)

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        position = self.position_at(offset.x - LABEL_W, offset.y)
        if position is not None:
            self.post_message(self.Selected(position))
