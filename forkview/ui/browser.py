"""The trace browser: saved traces newest first, filtered by text and model."""

from __future__ import annotations

import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Input, Label
from textual.widgets.data_table import CellDoesNotExist

from forkview.text import counted
from store import Store, StoreError, TraceInfo

STATUS_STYLE = {"complete": "green", "stopped": "yellow", "failed": "red", "running": "cyan",
                "superseded": "dim"}
LIST_LIMIT = 1000  # the browser is for looking around; the CLI exports everything


def started_utc(iso: str | None) -> str:
    """Start time in UTC: the same on every machine (the database stores UTC)."""
    if not iso:
        return ""
    try:
        dt = datetime.fromisoformat(iso)
    except ValueError:
        return iso[:16].replace("T", " ")
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%d %H:%M")


def command_hints(db_path: str | Path, trace_id: int, position: int | None = None,
                  estimator: str = "hsic") -> dict[str, str]:
    """The shell commands the explorer suggests for what browse-only mode cannot do,
    each complete as printed: the database on screen by its absolute path (`--db`; the
    default database is another file), MI with its `--estimator`. Keys: explore, mi,
    replay, and fork when a position is given."""
    db = shlex.quote(str(Path(db_path).expanduser().resolve()))
    hints = {
        "explore": f"forkview --db {db}",
        "mi": f"forkview mi --db {db} --trace {trace_id} --estimator {shlex.quote(estimator)}",
        "replay": f"forkview replay --db {db} --trace {trace_id}",
    }
    if position is not None:
        hints["fork"] = (f"forkview fork --db {db} --trace {trace_id} --position {position} "
                         "--top 3")
    return hints


def snippet(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(1, width - 1)] + "…"


class BrowserScreen(Screen[int | None]):
    """Dismisses with the chosen trace id (None: back without choosing)."""

    DEFAULT_CSS = """
    BrowserScreen #browser-title {
        width: 1fr;
        padding: 0 1;
        background: $panel;
        text-style: bold;
    }
    BrowserScreen #filters {
        height: auto;
    }
    BrowserScreen #filter-text {
        width: 2fr;
    }
    BrowserScreen #filter-model {
        width: 1fr;
    }
    BrowserScreen DataTable {
        height: 1fr;
    }
    BrowserScreen #browser-count {
        padding: 0 1;
        color: $text-muted;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "back"),
        Binding("slash", "filter", "filter"),
        # Superseded traces (stopped copies a resumed batch made again) are hidden until
        # asked for; the count line says so when there are any.
        Binding("s", "toggle_superseded", "superseded", show=False),
        Binding("question_mark,f1", "app.help", "help"),
        Binding("q", "app.quit", "quit"),
    ]

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.traces: list[TraceInfo] = []
        self.show_superseded = False
        self._debounce: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Label(f"forkview traces · {self.store.path.name}", id="browser-title")
        with Horizontal(id="filters"):
            yield Input(placeholder="filter: prompt or output text", id="filter-text")
            yield Input(placeholder="model", id="filter-model")
        yield DataTable(cursor_type="row", zebra_stripes=True, id="traces")
        yield Label(id="browser-count")
        yield Footer()

    def on_mount(self) -> None:
        self.reload()
        self.query_one(DataTable).focus()

    def on_screen_resume(self) -> None:
        # New traces may have been generated since the browser was last shown.
        if self.is_mounted:
            self.reload()

    def on_resize(self) -> None:
        self._fill_table()

    def reload(self) -> None:
        search = self.query_one("#filter-text", Input).value.strip() or None
        model = self.query_one("#filter-model", Input).value.strip() or None
        try:
            # Branches and rollout continuations (often hundreds per trace) belong in a
            # trace's family, not in this list.
            self.traces = self.store.list_traces(search=search, model=model, limit=LIST_LIMIT,
                                                 roots_only=True,
                                                 superseded=self.show_superseded)
        except StoreError as e:
            self.notify(str(e), severity="error")
            self.traces = []
        self._fill_table()

    def _fill_table(self) -> None:
        table = self.query_one(DataTable)
        selected = self._selected_id()
        table.clear(columns=True)
        model_w = 22 if self.size.width >= 110 else 14
        status_w = 10 if self.show_superseded else 8  # "superseded" is 10 wide
        fixed = 5 + status_w + model_w + 5 + 16 + 6 * 2 + 2  # columns, cell padding, scrollbar
        prompt_w = max(16, self.size.width - fixed)
        table.add_column("id", key="id", width=5)
        table.add_column("status", key="status", width=status_w)
        table.add_column("model", key="model", width=model_w)
        table.add_column("tok", key="tok", width=5)
        table.add_column("started (UTC)", key="started", width=16)
        table.add_column("prompt", key="prompt", width=prompt_w)
        for t in self.traces:
            table.add_row(
                Text(str(t.id), justify="right"),
                Text(t.status, style=STATUS_STYLE.get(t.status, "")),
                snippet(t.model_name, model_w),
                Text(str(t.n_tokens), justify="right"),
                started_utc(t.started_at),
                snippet(t.prompt, prompt_w),
                key=str(t.id),
            )
        if selected is not None and str(selected) in table.rows:
            table.move_cursor(row=table.get_row_index(str(selected)), animate=False)
        n = len(self.traces)
        shown = counted(n, "trace")
        if n >= LIST_LIMIT:
            shown += f" (newest {LIST_LIMIT}; narrow the filter)"
        total = self.store.count_traces(superseded=self.show_superseded)
        if total != n:
            shown += f" of {total}"
        hidden = (0 if self.show_superseded
                  else self.store.count_traces(superseded=True) - total)
        if hidden:
            shown += f" · s shows {hidden} superseded"
        elif self.show_superseded:
            shown += " · s hides superseded"
        self.query_one("#browser-count", Label).update(
            shown + " · Enter opens · / filters · Esc back")

    def _selected_id(self) -> int | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        except CellDoesNotExist:
            return None
        return int(key.value) if key.value is not None else None

    @on(Input.Changed)
    def _filter_changed(self) -> None:
        # Typing fires per key; query once the user pauses.
        if self._debounce is not None:
            self._debounce.stop()
        self._debounce = self.set_timer(0.2, self.reload)

    @on(Input.Submitted)
    def _filter_submitted(self) -> None:
        if self._debounce is not None:
            self._debounce.stop()
        self.reload()
        self.query_one(DataTable).focus()

    @on(DataTable.RowSelected)
    def _open(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.dismiss(int(event.row_key.value))

    def action_toggle_superseded(self) -> None:
        self.show_superseded = not self.show_superseded
        self.reload()

    def action_filter(self) -> None:
        self.query_one("#filter-text", Input).focus()

    def action_back(self) -> None:
        if isinstance(self.focused, Input):
            self.query_one(DataTable).focus()
        else:
            self.dismiss(None)
