"""The legend (entropy, MI or both) and the status line under the trace."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import Label

from forkview.analysis.peaks import TUKEY, PeakRule
from forkview.ui.scale import HIGH_ENTROPY_FRACTION, append_entropy_scale, append_mi_scale


class Legend(Widget):
    """What the colours mean in the current view.

    entropy: the fixed absolute scale (0 … 3+ nats) and this trace's high-entropy cut;
    mi: the chosen MI series, its per-trace scale (5th..95th percentile, see
    forkview.analysis.peaks) and its peaks with their rule; both: the entropy scale and the
    MI peaks (underlined in the trace).
    """

    DEFAULT_CSS = """
    Legend {
        height: 1;
        padding: 0 1;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.threshold: float | None = None
        self.view_mode = "entropy"
        self.series_label: str | None = None
        self.mi_range: tuple[float, float] | None = None
        self.rule: PeakRule = TUKEY
        self.n_peaks = 0
        self.hint = "m computes MI"

    def set_threshold(self, threshold: float | None) -> None:
        if threshold != self.threshold:
            self.threshold = threshold
            self.refresh()

    def set_view(self, view_mode: str, *, series_label: str | None,
                 mi_range: tuple[float, float] | None, rule: PeakRule, n_peaks: int,
                 hint: str) -> None:
        self.view_mode, self.series_label, self.mi_range = view_mode, series_label, mi_range
        self.rule, self.n_peaks, self.hint = rule, n_peaks, hint
        self.refresh()

    @property
    def text(self) -> str:
        return self.render().plain

    def render(self) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        if self.view_mode == "mi":
            self._mi_scale(text)
        elif self.view_mode == "both":
            self._entropy_scale(text, compact=True)
            self._peaks(text, marker="")
        else:
            self._entropy_scale(text, compact=False)
        return text

    def _entropy_scale(self, text: Text, *, compact: bool) -> None:
        no_color = self.app.no_color
        append_entropy_scale(text, compact=compact, units=not no_color)
        if self.threshold is not None and not compact:
            pct = round(HIGH_ENTROPY_FRACTION * 100)
            if no_color:
                text.append(f"  top {pct}% ≥ {self.threshold:.2f}: bold underline")
            else:
                text.append(f"  top {pct}% ≥ {self.threshold:.2f} (n/N)", style="dim")

    def _mi_scale(self, text: Text) -> None:
        if self.series_label is None or self.mi_range is None:
            text.append("MI ", style="dim")
            text.append(f"no values on this trace · {self.hint}", style="italic")
            return
        append_mi_scale(text, self.series_label, *self.mi_range)
        self._peaks(text, marker="", label=False)

    def _peaks(self, text: Text, *, marker: str, label: bool = True) -> None:
        if self.series_label is None:
            text.append(f"  MI: none · {self.hint}", style="dim italic")
            return
        text.append("  ")
        text.append("peaks", style="bold underline")
        shown = f" {marker}"
        if label:
            shown += f"{self.series_label} "
        shown += f"{self.rule.label}: {self.n_peaks}"
        text.append(shown, style="dim")


EntropyLegend = Legend  # its name before the MI views


class StatusLine(Horizontal):
    """Model · device · sampling on the left; the trace's id, status, size, speed right."""

    DEFAULT_CSS = """
    StatusLine {
        height: 1;
        background: $panel;
        padding: 0 1;
    }
    StatusLine > #status-model {
        width: 1fr;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    StatusLine > #status-trace {
        width: auto;
        padding-left: 1;
    }
    """

    def compose(self) -> ComposeResult:
        yield Label(id="status-model")
        yield Label(id="status-trace")

    def set_model(self, text: str | Text) -> None:
        self.query_one("#status-model", Label).update(text)

    def set_trace(self, text: str | Text) -> None:
        self.query_one("#status-trace", Label).update(text)
