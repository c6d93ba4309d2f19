"""The fork panel (Enter on a token): what the trace recorded there, and the three
ways to branch from it.

It shows the token, its entropy and MI, and the top-k alternatives with the
probabilities stored with the trace (TokenStep.top: exactly what the parent's step
computed). Enter on an alternative, Enter in the text box (the text becomes the forced
token(s)) or "Sample N" dismisses with a ForkRequest; the explorer queues it.
"""

from __future__ import annotations

import math
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from forkview.forks import DEFAULT_SAMPLES
from forkview.ui.fork_queue import MAX_SAMPLES, ForkRequest
from forkview.ui.mi_data import PanelMI, format_value
from forkview.ui.scale import entropy_style
from forkview.ui.token_panel import bar, fit, short_repr
from models.types import TokenStep


def alternative_prompt(text: str, prob: float, chosen: bool, bar_w: int = 38,
                       answers: str = "") -> Text:
    """One alternative: marker, token, a probability bar, p (exactly as stored) and,
    where the rollout estimator forked it, the answers its continuations reached."""
    label_w = 14
    style = "bold" if chosen else ""
    out = Text(no_wrap=True, overflow="ellipsis")
    out.append("▶ " if chosen else "  ", style=style)
    out.append(fit(short_repr(text, label_w), label_w) + " ", style=style)
    out.append(bar(prob, bar_w), style=style)
    out.append(f" p {prob:.4f}", style=style)
    out.append("  taken" if chosen else "", style="dim")
    if answers:
        out.append(f"  rollouts → {answers}", style="dim")
    return out


class ForkPanel(ModalScreen[ForkRequest | None]):
    """Dismisses with a ForkRequest, or None (Esc)."""

    DEFAULT_CSS = """
    ForkPanel {
        align: center middle;
    }
    ForkPanel > #fork-box {
        width: 78;
        max-width: 100%;
        height: auto;
        max-height: 100%;
        overflow-y: auto;
        border: round $primary;
        border-title-align: left;
        border-subtitle-align: right;
        background: $surface;
        padding: 0 1;
    }
    ForkPanel #fork-token {
        height: auto;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    ForkPanel .fork-heading {
        text-style: bold;
        margin-top: 1;
    }
    ForkPanel #fork-alts {
        height: auto;
        max-height: 10;
    }
    ForkPanel .fork-row {
        height: 1;
    }
    ForkPanel #row-text {
        margin-top: 1;
    }
    ForkPanel .fork-row > Label {
        width: 9;
        text-style: bold;
    }
    ForkPanel #fork-text {
        width: 1fr;
    }
    ForkPanel #fork-n {
        width: 7;
    }
    ForkPanel #fork-keep {
        margin: 0 1;
    }
    ForkPanel #fork-cf {
        margin-left: 1;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "close"),
    ]

    def __init__(self, trace_id: int, step: TokenStep, *, index: int, total: int,
                 high: bool = False, mi: PanelMI | None = None, branch_note: str = "",
                 samples: int = DEFAULT_SAMPLES) -> None:
        super().__init__()
        self.trace_id = trace_id
        self.step = step
        self.index, self.total, self.high = index, total, high
        self.mi = mi
        self.branch_note = branch_note
        self.samples = samples

    # ---------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        step = self.step
        with Vertical(id="fork-box") as box:
            box.border_title = (f"fork trace #{self.trace_id} at position {step.position} "
                                f"({self.index + 1}/{self.total})")
            box.border_subtitle = "Tab next field · Esc closes"
            yield Static(self._token_info(), id="fork-token")
            yield Label("alternatives recorded here · ↑↓ Enter branches from one",
                        classes="fork-heading")
            yield OptionList(*self._options(), id="fork-alts", compact=True)
            with Horizontal(classes="fork-row", id="row-text"):
                yield Label("type")
                yield Input(placeholder="any text: forced as the next token(s) · Enter",
                            id="fork-text", compact=True)
            with Horizontal(classes="fork-row", id="row-sample"):
                yield Label("sample N")
                yield Input(str(self.samples), id="fork-n", type="integer", compact=True,
                            max_length=3)
                yield Checkbox("keep token: no", id="fork-keep", compact=True)
                yield Button("Sample", id="fork-sample", compact=True, variant="primary")
                yield Button("Keep vs redraw", id="fork-cf", compact=True)

    def _token_info(self) -> Text:
        step = self.step
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append("token ", style="dim")
        out.append(short_repr(step.text, 24), style="bold")
        p = math.exp(step.logprob) if step.logprob is not None else float("nan")
        out.append(f"  id {step.token_id}  rank {step.rank}  p {p:.4f}")
        if self.branch_note:
            out.append(f"  {self.branch_note}", style="dim")
        out.append("\nentropy ", style="dim")
        out.append(f"{step.entropy:.3f} nats ")
        out.append("   ", style=entropy_style(step.entropy))
        out.append("  sampling ", style="dim")
        out.append(f"{step.sampling_entropy:.3f} nats")
        if self.high:
            out.append("  • high H", style="bold underline")
        mi = self.mi
        if mi is None or not mi.rows:
            out.append("\nMI ", style="dim")
            out.append(f"none · {mi.hint}" if mi is not None and mi.hint else "none",
                       style="italic")
            return out
        for row in mi.rows:
            out.append("\nMI ", style="dim")
            status = "" if row.status == "complete" else f" ({row.status})"
            out.append(fit(row.label + status, 30), style="bold" if row.selected else "")
            value = "·" if row.value is None else format_value(row.value)
            out.append(f" {value:>10}")
            out.append(" ▲ peak" if row.peak else "", style="bold")
        return out

    def _options(self) -> list[Option]:
        step = self.step
        if not step.top:
            return [Option(Text("no alternatives were recorded for this token",
                                style="italic"), id="none", disabled=True)]
        rollouts = {a.text: " ".join(f"{ans}×{n}" for ans, n in a.answers)
                    for a in (self.mi.alternatives if self.mi is not None else [])}
        bar_w = 12 if any(rollouts.get(a.text) for a in step.top) else 38
        options = []
        for i, alt in enumerate(step.top):
            chosen = alt.token_id == step.token_id
            # The trace's own token is shown (with its p) but not offered: a branch
            # forcing it would repeat the trace; Sample N with keep token varies it.
            options.append(Option(
                alternative_prompt(alt.text, alt.prob, chosen, bar_w, rollouts.get(alt.text, "")),
                id=str(i), disabled=chosen))
        return options

    def on_mount(self) -> None:
        alts = self.query_one("#fork-alts", OptionList)
        first = next((i for i, o in enumerate(alts.options) if not o.disabled), None)
        if first is not None:
            alts.highlighted = first
            alts.focus()
        else:
            self.query_one("#fork-text", Input).focus()

    # ---------------------------------------------------------------- choosing
    @on(OptionList.OptionSelected, "#fork-alts")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id in (None, "none"):
            return
        alt = self.step.top[int(event.option.id)]
        self.dismiss(ForkRequest("choice", token_id=alt.token_id, text=alt.text))

    @on(Input.Submitted, "#fork-text")
    def _typed(self, event: Input.Submitted) -> None:
        event.stop()
        if event.value == "":
            self.notify("The text is empty: type the token(s) to force, or Esc. "
                        "No branch was made.", severity="warning", timeout=5)
            return
        self.dismiss(ForkRequest("text", text=event.value))

    @on(Input.Submitted, "#fork-n")
    def _n_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._sample()

    @on(Button.Pressed, "#fork-sample")
    def _sample_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self._sample()

    @on(Checkbox.Changed, "#fork-keep")
    def _keep_changed(self, event: Checkbox.Changed) -> None:
        # The state in words: on a terminal without colours the box looks the same on
        # and off.
        event.checkbox.label = f"keep token: {'yes' if event.value else 'no'}"

    @on(Button.Pressed, "#fork-cf")
    def _counterfactual_pressed(self, event: Button.Pressed) -> None:
        """N continuations keeping the token and N drawing it anew, in one batch: the
        answer distributions side by side with their TV distance."""
        event.stop()
        n = self._n()
        if n is not None:
            self.dismiss(ForkRequest("counterfactual", n=n))

    def _n(self) -> int | None:
        raw = self.query_one("#fork-n", Input).value.strip()
        try:
            n = int(raw or self.samples)
        except ValueError:
            n = 0
        if not 1 <= n <= MAX_SAMPLES:
            self.notify(f"N must be a whole number from 1 to {MAX_SAMPLES}.",
                        severity="warning")
            return None
        return n

    def _sample(self) -> None:
        n = self._n()
        if n is None:
            return
        keep = self.query_one("#fork-keep", Checkbox).value
        self.dismiss(ForkRequest("sample", n=n, keep_token=keep))
