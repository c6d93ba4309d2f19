"""The entropy legend and the status line under the trace."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import Label

from forkview.ui.scale import HIGH_ENTROPY_FRACTION, N_BINS, bin_label, bin_style


class EntropyLegend(Widget):
    """The fixed absolute scale (0 … 3+ nats) and this trace's high-entropy cut."""

    DEFAULT_CSS = """
    EntropyLegend {
        height: 1;
        padding: 0 1;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.threshold: float | None = None

    def set_threshold(self, threshold: float | None) -> None:
        if threshold != self.threshold:
            self.threshold = threshold
            self.refresh()

    def render(self) -> Text:
        no_color = self.app.no_color
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append("entropy", style="dim")
        for i in range(N_BINS):
            text.append(f"{bin_label(i):>4}", style=bin_style(i))
        if not no_color:
            text.append(" nats", style="dim")
        if self.threshold is not None:
            pct = round(HIGH_ENTROPY_FRACTION * 100)
            if no_color:
                text.append(f"  top {pct}% ≥ {self.threshold:.2f}: bold underline")
            else:
                text.append(f"  top {pct}% ≥ {self.threshold:.2f} (n/N)", style="dim")
        return text


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
