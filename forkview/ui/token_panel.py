"""The side panel: everything recorded about the token under the cursor."""

from __future__ import annotations

import math

from rich.cells import cell_len, set_cell_size
from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from forkview.ui.mi_data import PanelMI, format_value
from forkview.ui.scale import entropy_style
from models.types import TokenStep

_EIGHTHS = " ▏▎▍▌▋▊▉█"
LABEL = 9  # width of the field names


def bar(fraction: float, width: int) -> str:
    """A horizontal bar of `width` cells filled to `fraction`, in eighths of a cell."""
    fraction = max(0.0, min(1.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + (_EIGHTHS[part] if part else "")
    return text.ljust(width)


def fit(text: str, width: int) -> str:
    """`text` padded or cut (with …) to exactly `width` cells."""
    if cell_len(text) > width:
        return set_cell_size(text, width - 1) + "…"
    return set_cell_size(text, width)


def short_repr(text: str, width: int) -> str:
    shown = repr(text)
    if cell_len(shown) > width:
        shown = set_cell_size(shown, width - 1) + "…"
    return shown


class TokenPanel(Widget):
    """Position, text, id, entropy, sampling entropy, logprob, p, rank, every MI run's
    value (▸ = the series the views show, ▲ = a peak), at a rollout position the
    answers each forked alternative led to, and the top-k alternatives (as bars,
    chosen token marked ▶) of the selected token."""

    DEFAULT_CSS = """
    TokenPanel {
        width: 40;
        height: 1fr;
        padding: 0 1;
        border-left: vkey $foreground 20%;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    def __init__(self, *, name: str | None = None, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.step: TokenStep | None = None
        self.index = -1
        self.total = 0
        self.high = False
        self.mi: PanelMI | None = None

    def show(self, step: TokenStep | None, index: int = -1, total: int = 0,
             high: bool = False, mi: PanelMI | None = None) -> None:
        self.step, self.index, self.total, self.high = step, index, total, high
        self.mi = mi
        self.refresh(layout=True)

    def render(self) -> Text:
        step = self.step
        if step is None:
            return Text("No token selected.\n\nGenerate or open a trace,\nthen move with ← →.",
                        style="italic")
        width = max(20, self.content_region.width)
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append(f"position {step.position}", style="bold")
        out.append(f" ({self.index + 1}/{self.total})", style="dim")
        if self.high:
            out.append(" • high H", style="bold underline")
        out.append("\n")

        def field(name: str, value: str | Text) -> None:
            out.append(f"{name:<{LABEL}}", style="dim")
            out.append(value)
            out.append("\n")

        shown = Text(short_repr(step.text, width - LABEL))
        if not step.text:
            # an empty piece: name the token (e.g. <|im_end|>) if the top list has it
            name = next((a.text for a in step.top if a.token_id == step.token_id), "")
            if name:
                shown.append(f" {short_repr(name, width - LABEL - 4)}", style="dim")
        field("text", shown)
        field("id", f"{step.token_id}   rank {step.rank}")
        swatch = Text()
        swatch.append(f"{step.entropy:.3f} nats ")
        swatch.append("   ", style=entropy_style(step.entropy))
        field("entropy", swatch)
        field("sampling", f"{step.sampling_entropy:.3f} nats")
        p = math.exp(step.logprob) if step.logprob is not None else float("nan")
        field("logprob", f"{step.logprob:.3f}   p {p:.3f}")
        if self.mi is not None:
            self._render_mi(out, self.mi, width)
        out.append(f"top {len(step.top)} alternatives", style="bold")
        out.append("\n")
        label_w = min(14, max((cell_len(repr(a.text)) for a in step.top), default=4))
        label_w = max(4, min(label_w, width // 2 - 2))
        bar_w = max(3, width - 2 - label_w - 1 - 6)
        chosen_shown = False
        for alt in step.top:
            chosen = alt.token_id == step.token_id
            chosen_shown = chosen_shown or chosen
            style = Style(bold=True) if chosen else Style()
            out.append("▶ " if chosen else "  ", style=style)
            out.append(short_repr(alt.text, label_w).ljust(label_w) + " ", style=style)
            out.append(bar(alt.prob, bar_w), style=style)
            out.append(f"{alt.prob * 100:5.1f}%", style=style)
            out.append("\n")
        if not chosen_shown:
            out.append("▶ ", style="bold")
            out.append(short_repr(step.text, label_w).ljust(label_w), style="bold")
            out.append(f" rank {step.rank}, p {p:.2g}", style="bold")
            out.append("\n")
        out.rstrip()
        return out

    @staticmethod
    def _render_mi(out: Text, mi: PanelMI, width: int) -> None:
        if not mi.rows:
            out.append(f"{'MI':<{LABEL}}", style="dim")
            out.append(f"none · {mi.hint}" if mi.hint else "none", style="italic")
            out.append("\n")
            return
        out.append("MI at this token", style="bold")
        out.append("\n")
        value_w = 9
        label_w = max(6, width - 2 - value_w)
        for row in mi.rows:
            style = Style(bold=row.selected)
            out.append("▸" if row.selected else " ", style=style)
            # The status is never cut: the parameters give way first.
            status = "" if row.status == "complete" else f" ({row.status})"
            label = fit(row.label, max(1, label_w - cell_len(status))) + status
            out.append(label.ljust(label_w), style=style if row.status != "failed"
                       else Style(color="red"))
            if row.value is None:
                out.append(f"{'·':>{value_w}}", style="dim")
            else:
                out.append(f"{format_value(row.value):>{value_w}}", style=style)
            out.append("▲" if row.peak else " ", style="bold")
            out.append("\n")
        if mi.alternatives:
            out.append("rollout: answers per fork", style="bold")
            out.append("\n")
            text_w = 8
            for alt in mi.alternatives:
                style = Style(bold=alt.emitted)
                out.append("▶" if alt.emitted else " ", style=style)
                out.append(fit(short_repr(alt.text, text_w), text_w), style=style)
                prob = "" if alt.prob is None else f"{alt.prob * 100:3.0f}%"
                out.append(f"{prob:>5} ", style=style)
                hist = " ".join(f"{a}×{n}" for a, n in alt.answers) or "—"
                room = max(4, width - 1 - text_w - 6)
                if cell_len(hist) > room:
                    hist = set_cell_size(hist, room - 1) + "…"
                out.append(hist)
                out.append("\n")
