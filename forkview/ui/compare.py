"""Two traces of a family side by side, aligned at the fork.

Each column is a TraceView of the trace's whole response (a branch's inherited prefix
included) coloured exactly as in the explorer (entropy, MI or both: `v`). The common
prefix, the tokens before the first position where the two differ, is faded in both
columns and both open on that position; moving the cursor in one column moves the
other to the same position, so the two continuations read side by side.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, Static

from forkview.ui.family_text import FullTokens, forced_label
from forkview.ui.fork_queue import answer_name, mark
from forkview.ui.mi_data import MISeries, MIState, format_value
from forkview.ui.scale import VIEWS, entropy_style
from forkview.ui.status import Legend
from forkview.ui.token_panel import short_repr
from forkview.ui.trace_view import TraceView
from models.types import TokenStep
from store import Store, StoreError, TraceInfo


def common_prefix(a: list[TokenStep], b: list[TokenStep]) -> int:
    """How many leading tokens the two responses share (same token ids)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x.token_id != y.token_id:
            break
        n += 1
    return n


class CompareScreen(Screen[None]):
    DEFAULT_CSS = """
    CompareScreen #compare-title {
        width: 1fr;
        padding: 0 1;
        background: $panel;
        text-style: bold;
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    CompareScreen #columns {
        height: 1fr;
    }
    CompareScreen .column {
        width: 1fr;
        height: 1fr;
        border: round $foreground 30%;
        border-title-align: left;
        border-subtitle-align: left;
    }
    CompareScreen .column:focus-within {
        border: round $primary;
    }
    CompareScreen .column > TraceView {
        height: 1fr;
    }
    CompareScreen .column > .cursor-info {
        height: 1;
        text-wrap: nowrap;
        text-overflow: ellipsis;
        color: $text-muted;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "back"),
        Binding("v", "cycle_view", "view"),
        Binding("tab", "switch", "other column"),
        Binding("question_mark,f1", "app.help", "help"),
        Binding("q", "app.quit", "quit"),
    ]

    def __init__(self, store: Store, a: int, b: int) -> None:
        super().__init__()
        self.store = store
        self.ids = (a, b)
        self.infos: list[TraceInfo] = []
        self.steps: list[list[TokenStep]] = []
        self.mi = (MIState(), MIState())
        self.common = 0
        self.view_mode = VIEWS[0]
        self._parent_steps = FullTokens(store)

    def compose(self) -> ComposeResult:
        yield Label("compare", id="compare-title")
        with Horizontal(id="columns"):
            for side in ("a", "b"):
                with Vertical(classes="column", id=f"col-{side}"):
                    yield TraceView(id=f"view-{side}")
                    yield Static(classes="cursor-info", id=f"info-{side}")
        yield Legend(id="compare-legend")
        yield Footer()

    @property
    def views(self) -> tuple[TraceView, TraceView]:
        return self.query_one("#view-a", TraceView), self.query_one("#view-b", TraceView)

    def on_mount(self) -> None:
        try:
            self.infos = [self.store.trace(i) for i in self.ids]
            self.steps = [self.store.full_tokens(i) for i in self.ids]
        except StoreError as e:
            self.notify(str(e), severity="error")
            self.dismiss(None)
            return
        self.common = common_prefix(*self.steps)
        for k, (info, steps, view) in enumerate(zip(self.infos, self.steps, self.views,
                                                    strict=True)):
            view.set_dim_before(self.common)
            view.set_steps(steps, cursor=min(self.common, max(0, len(steps) - 1)))
            column = self.query_one(f"#col-{'ab'[k]}", Vertical)
            column.border_title = self._heading(info)
            column.border_subtitle = self._answer(info)
            try:
                series = [MISeries(run, self.store.mi_values(run.id))
                          for run in self.store.mi_runs(info.id)]
            except StoreError:
                series = []
            self.mi[k].load(series, len(steps))
        self.query_one("#compare-title", Label).update(self._title())
        self._apply_view()
        self.views[0].focus()

    # ---------------------------------------------------------------- text
    def _heading(self, info: TraceInfo) -> str:
        if info.is_root:
            return f"#{info.id} root"
        forced = forced_label(self.store, info.id, info.parent_trace_id, info.fork_position,
                              info.forced_token_ids, self._parent_steps)
        return f"#{info.id} @{info.fork_position} {forced} {info.origin}".replace("  ", " ")

    @staticmethod
    def _answer(info: TraceInfo) -> str:
        answer = (f"answer {answer_name(info.answer)}{mark(info.correct)}"
                  if info.answer is not None else "no answer")
        return f"{answer} · {info.status} · {info.n_tokens} tok"

    def _title(self) -> str:
        a, b = self.ids
        na, nb = (len(s) for s in self.steps)
        if na == nb == self.common:
            return f"#{a} and #{b}: the same {na} tokens"
        return (f"#{a} | #{b} · first {self.common} tokens shared (faded) · they differ "
                f"from position {self.common}")

    # ---------------------------------------------------------------- views
    def _apply_view(self) -> None:
        mi_shown = self.view_mode != "entropy"
        for view, state, steps in zip(self.views, self.mi, self.steps, strict=True):
            n = len(steps)
            view.set_overlay(self.view_mode, state.bins(n) if mi_shown else [],
                             state.peaks if mi_shown else [])
        # One legend: the entropy scale is absolute; MI scales are per trace (the
        # left column's when it has values).
        state = self.mi[0] if self.mi[0].current else self.mi[1]
        current = state.current
        self.query_one(Legend).set_view(
            self.view_mode, series_label=current.label if current else None,
            mi_range=state.range, rule=state.rule, n_peaks=len(state.peaks),
            hint="forkview mi computes it")
        for k in range(2):
            self._show_cursor(k)

    def action_cycle_view(self) -> None:
        self.view_mode = VIEWS[(VIEWS.index(self.view_mode) + 1) % len(VIEWS)]
        self._apply_view()

    def action_switch(self) -> None:
        a, b = self.views
        (a if self.focused is b else b).focus()

    def action_back(self) -> None:
        self.dismiss(None)

    @on(TraceView.CursorMoved)
    def _cursor_moved(self, event: TraceView.CursorMoved) -> None:
        if not self.steps:
            return
        views = self.views
        k = 0 if event.view is views[0] else 1
        self._show_cursor(k)
        # The focused column leads; the other follows to the same position.
        if event.view is self.focused:
            other = views[1 - k]
            if 0 <= event.index < len(other.steps) and other.cursor != event.index:
                other.select(event.index)

    def _show_cursor(self, k: int) -> None:
        if not self.steps:
            return
        view = self.views[k]
        info = self.query_one(f"#info-{'ab'[k]}", Static)
        if not 0 <= view.cursor < len(view.steps):
            info.update("")
            return
        step = view.steps[view.cursor]
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f"{view.cursor} ")
        text.append(short_repr(step.text, 12), style="bold")
        text.append(f" H {step.entropy:.2f}")
        text.append(" ", style="")
        text.append("  ", style=entropy_style(step.entropy))
        current = self.mi[k].current
        if current is not None:
            text.append(f" MI {format_value(current.values.get(view.cursor))}")
        if view.cursor < self.common:
            text.append(" shared", style="dim")
        info.update(text)
