"""The overlap report in the explorer: the numbers of `forkview report`, filtered by
model, prompt set and estimator, recomputed in a worker when a filter changes.

The science lives in forkview/analysis/report.py (the same `build_report` the CLI
calls, same default settings, so the numbers match `forkview report`); this screen only
lays them out: a summary table (one row per model x estimator), and for the row under
the cursor its statistics with intervals and p-values, the lag profile and the entropy
histogram drawn with Unicode block characters, and its most frequent tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Select, Static

from forkview.analysis.report import (
    STAT_LABELS,
    Report,
    ReportError,
    ReportSettings,
    build_report,
    control_rows,
    fmt,
    fmt_ci,
    fmt_interval,
    fmt_p2,
    report_options,
    token_repr,
)
from forkview.text import counted

EIGHTHS = " ▏▎▍▌▋▊▉█"  # horizontal bar ends, 0/8 .. 8/8
LEVELS = " ▁▂▃▄▅▆▇█"  # vertical bar tops, 0/8 .. 8/8


# ---------------------------------------------------------------------- terminal plots
def hbar(value: float, top: float, width: int) -> str:
    """A horizontal bar of `width` cells at most, in eighths of a cell."""
    if not (math.isfinite(value) and top > 0) or value <= 0:
        return ""
    eighths = round(min(1.0, value / top) * width * 8)
    return "█" * (eighths // 8) + (EIGHTHS[eighths % 8] if eighths % 8 else "")


def column_chart(counts: list[int], height: int = 5) -> list[str]:
    """Vertical bars, one column per count, `height` rows (top row first), in eighths."""
    top = max(counts, default=0)
    if top <= 0:
        return [""] * height
    rows = []
    for r in range(height - 1, -1, -1):
        line = []
        for c in counts:
            eighths = round(c / top * height * 8)
            fill = eighths - r * 8
            line.append("█" if fill >= 8 else (LEVELS[fill] if fill > 0 else " "))
        rows.append("".join(line))
    return rows


def entropy_plot(report: Report, model_id: int, width: int = 40) -> Text:
    model = next((m for m in report.models if m.id == model_id), None)
    out = Text()
    if model is None or not model.histogram.get("counts"):
        return out
    counts = model.histogram["counts"]
    edges = model.histogram["edges"]
    step = max(1, math.ceil(len(counts) / width))
    merged = [sum(counts[i:i + step]) for i in range(0, len(counts), step)]
    out.append(f"entropy of {model.n_tokens:,} tokens (nats)\n", style="bold")
    for line in column_chart(merged, 5):
        out.append(line + "\n", style="#21918c")
    lo, hi = edges[0], edges[-1]
    axis = f"{lo:<.2g}".ljust(len(merged) - len(f"{hi:.2g}")) + f"{hi:.2g}"
    out.append(axis + "\n", style="dim")
    q = model.entropy.get("quantiles", {})
    out.append(f"median {fmt(q.get('0.5'))}  q0.8 {fmt(q.get('0.8'))}  "
               f"< 0.01 nats {fmt(model.entropy.get('fraction_below'))}", style="dim")
    return out


def lag_plot(row: Any, width: int = 28) -> Text:
    lags = row.result.lags
    top = max([v for r in lags for v in (r["precision"], r["precision_hi"])
               if math.isfinite(v)] + [1e-9])
    out = Text()
    out.append("lag profile: precision of E at t for P at t + lag\n", style="bold")
    base = row.result.stats["base_rate"].value
    for r in lags:
        v = r["precision"]
        out.append(f"{r['lag']:+d} ", style="dim")
        bar = hbar(v, top, width)
        out.append(bar.ljust(width), style="#3b528b" if r["lag"] else "#21918c")
        out.append(f" {fmt(v)} {_ci(r['precision_lo'], r['precision_hi'])}\n")
    out.append(f"base rate |E|/n {fmt(base)}", style="dim")
    return out


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) and math.isfinite(hi) else ""


def stats_table(row: Any) -> Table:
    """The raw statistics (secondary): two-sided shift-null p and its adjusted value."""
    t = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    t.add_column("statistic (raw)")
    t.add_column("value", justify="right")
    t.add_column("95% CI", justify="right")
    t.add_column("p", justify="right")
    t.add_column("p adj", justify="right")
    for name, label in STAT_LABELS.items():
        est = row.result.stats[name]
        d = 2 if name in ("odds_ratio", "lift") else 3
        t.add_row(label, fmt(est.value, d), fmt_ci(est, d), fmt_p2(est.p), fmt_p2(est.p_adj))
    return t


# Short names for the controls at 80 columns ("|" reads "within", ★ the primary).
_SHORT_CONTROL = {
    "none (raw)": "raw", "none (pooled over traces)": "pooled",
    "within trace": "| trace", "within trace × position bin (primary)": "| trace×pos ★",
    "within trace × token class": "| trace×class",
    "within trace × position × token class": "| trace×pos×class",
    "position removed (partial, per trace)": "| position",
    "within trace (mean over traces)": "| trace",
}
_SHORT_STAT = {"odds ratio": "OR", "Spearman": "ρ", "AUROC": "AUROC"}


def controls_table(row: Any) -> Table:
    """Raw and controlled statistics side by side, the primary endpoint (★) among them:
    the report's controls table, with short names."""
    t = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    for name, justify in (("statistic", "left"), ("value", "right"), ("95% CI", "right"),
                          ("p", "right"), ("p adj", "right")):
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for cells in control_rows(row.result):
        stat = next((v for k, v in _SHORT_STAT.items() if cells[0].startswith(k)), cells[0])
        t.add_row(f"{stat} {_SHORT_CONTROL.get(cells[1], cells[1])}", cells[2], cells[3],
                  cells[5], cells[7])
    return t


def verdict_text(row: Any) -> Text:
    """The verdict line (word in bold, colour by direction) and its caveats."""
    v = row.verdict
    if v is None:
        return Text("")
    colour = {"enriched": "green", "depleted": "magenta"}.get(v.word, "yellow")
    out = Text()
    rest = v.sentence.split(": ", 1)[-1]  # without the model · estimator label
    out.append(v.word, style=f"bold {colour}")
    out.append(rest[len(v.word):] if rest.startswith(v.word) else ": " + rest)
    for c in v.caveats:
        out.append("\n  · " + c, style="dim")
    return out


def token_lines(row: Any, depth: int = 6) -> Table:
    t = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    names = {"high": "E", "peak": "P", "both": "E∩P", "peak_only": "P only"}
    for label in names.values():
        t.add_column(label, no_wrap=True, max_width=16)
    for i in range(depth):
        cells = []
        for key in names:
            items = row.result.tokens.get(key, [])
            # Text, not markup: a token is shown as it is, whatever brackets it holds.
            cells.append(Text(f"{token_repr(items[i][0])} {items[i][1]}") if i < len(items)
                         else Text(""))
        t.add_row(*cells)
    return t


# ---------------------------------------------------------------------- messages
@dataclass
class ReportReady(Message):
    job: int
    report: Report


@dataclass
class ReportFailed(Message):
    job: int
    error: str


# ---------------------------------------------------------------------- the screen
# The primary endpoint (OR of E x P within trace x position bin, its interval, the
# Holm-adjusted p) and the verdict: what fits 80 columns; the rest is in the detail.
SUMMARY_COLUMNS = ("model", "estimator", "n", "OR", "95% CI", "p adj", "verdict")


class ReportScreen(Screen[None]):
    """`ReportScreen(db_path)`: opens its own read-only store in the worker."""

    DEFAULT_CSS = """
    ReportScreen #report-title { width: 1fr; padding: 0 1; background: $panel;
        text-style: bold; }
    ReportScreen #report-filters { height: auto; }
    ReportScreen #report-filters Select { width: 1fr; }
    ReportScreen #report-summary { height: auto; max-height: 8; }
    ReportScreen #report-status { padding: 0 1; color: $text-muted; }
    ReportScreen #report-detail { height: 1fr; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "back"),
        Binding("q", "app.quit", "quit"),
    ]

    def __init__(self, db_path: str | Path, *, settings: ReportSettings | None = None,
                 store: Any = None) -> None:
        super().__init__()
        self.db_path = Path(db_path)
        self.store = store  # reused when given (the app's); else opened read-only
        self.settings = settings or ReportSettings()
        self.report: Report | None = None
        self.job = 0
        self._options: dict[str, list[Any]] = {"models": [], "sets": [], "estimators": []}

    # ---- layout
    def compose(self) -> ComposeResult:
        yield Label(f"Overlap report · {self.db_path.name}", id="report-title")
        with Horizontal(id="report-filters"):
            yield Select([], prompt="all models", id="filter-model")
            yield Select([], prompt="all sets", id="filter-set")
            yield Select([], prompt="all estimators", id="filter-estimator")
        yield DataTable(id="report-summary", cursor_type="row", zebra_stripes=True)
        yield Label("computing…", id="report-status")
        with VerticalScroll(id="report-detail"):
            yield Static(id="detail-stats")
            yield Static(id="detail-plots")
            yield Static(id="detail-tokens")
        yield Footer()

    def on_mount(self) -> None:
        self._load_options()

    def _open_store(self) -> Any:
        if self.store is not None:
            return self.store, False
        from store import Store

        return Store.open(self.db_path, readonly=True), True

    # ---- options, then the first computation
    @work(thread=True, exclusive=True, group="report-options", exit_on_error=False)
    def _load_options(self) -> None:
        try:
            store, owned = self._open_store()
            try:
                options = report_options(store)
            finally:
                if owned:
                    store.close()
        except Exception as e:  # a broken file: say so on screen, keep the app alive
            self.app.call_from_thread(self._show_error, str(e))
            return
        self.app.call_from_thread(self._set_options, options)

    def _set_options(self, options: dict[str, list[Any]]) -> None:
        self._options = options
        with self.prevent(Select.Changed):
            self.query_one("#filter-model", Select).set_options(
                [(name, str(mid)) for mid, name in options["models"]])
            self.query_one("#filter-set", Select).set_options([(s, s) for s in options["sets"]])
            self.query_one("#filter-estimator", Select).set_options(
                [(e, e) for e in options["estimators"]])
        self.recompute()

    def _current_settings(self) -> ReportSettings:
        def chosen(widget_id: str) -> tuple[str, ...]:
            select = self.query_one(widget_id, Select)
            return () if select.is_blank() else (str(select.value),)

        return replace(self.settings, models=chosen("#filter-model"),
                       sets=chosen("#filter-set"), estimators=chosen("#filter-estimator"))

    @on(Select.Changed)
    def _filter_changed(self, _event: Select.Changed) -> None:
        self.recompute()

    def recompute(self) -> None:
        self.job += 1
        self.query_one("#report-status", Label).update("computing…")
        self._compute(self.job, self._current_settings())

    @work(thread=True, exclusive=True, group="report", exit_on_error=False)
    def _compute(self, job: int, settings: ReportSettings) -> None:
        try:
            store, owned = self._open_store()
            try:
                report = build_report(store, settings, database=self.db_path.name)
            finally:
                if owned:
                    store.close()
        except ReportError as e:
            self.post_message(ReportFailed(job, str(e)))
            return
        except Exception as e:
            self.post_message(ReportFailed(job, f"{type(e).__name__}: {e}"))
            return
        self.post_message(ReportReady(job, report))

    # ---- results
    @on(ReportReady)
    def _ready(self, message: ReportReady) -> None:
        if message.job != self.job:
            return  # a filter changed since: a newer report is on its way
        self.report = message.report
        table = self.query_one("#report-summary", DataTable)
        # Columns rebuilt with the rows: DataTable keeps a header rendered at the widths
        # of its first layout, so a table cleared and refilled could show the new rows
        # under a header sized for the old ones.
        table.clear(columns=True)
        table.add_columns(*SUMMARY_COLUMNS)
        for i, r in enumerate(self.report.rows):
            prim = r.result.primary
            # Narrow enough for 80 columns: names cut, the split folded into the estimator.
            est = r.estimator if r.group == "all" else f"{r.estimator}·{r.group}"
            word = r.verdict.word if r.verdict else "—"
            table.add_row(Text(_cut(r.model, 14)), Text(_cut(est, 14)),
                          fmt(r.result.n_traces), fmt(prim.get("estimate"), 2),
                          fmt_interval(prim.get("ci")), fmt_p2(prim.get("adjusted_p")),
                          Text(word), key=str(i))
        st = self.report.settings
        # short enough for 80 columns: the full definitions are in `forkview report`
        e = st.entropy
        e_short = (f"H ≥ {e.threshold:g}" if e.scope == "threshold"
                   else f"top {e.rho * 100:g}% ({e.scope})")
        self.query_one("#report-status", Label).update(
            f"{counted(self.report.n_traces, 'trace')} · E {e_short} · P {st.peaks.label} · "
            f"boot {st.bootstrap} · seed {st.seed}")
        self._show_detail(0)

    @on(ReportFailed)
    def _failed(self, message: ReportFailed) -> None:
        if message.job == self.job:
            self._show_error(message.error)

    def _show_error(self, error: str) -> None:
        self.report = None
        self.query_one("#report-summary", DataTable).clear()
        self.query_one("#report-status", Label).update(Text(error, style="bold red"))
        for wid in ("#detail-stats", "#detail-plots", "#detail-tokens"):
            self.query_one(wid, Static).update("")

    @on(DataTable.RowHighlighted, "#report-summary")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value is not None:
            self._show_detail(int(event.row_key.value))

    def _show_detail(self, index: int) -> None:
        if self.report is None:
            return
        stats = self.query_one("#detail-stats", Static)
        plots = self.query_one("#detail-plots", Static)
        tokens = self.query_one("#detail-tokens", Static)
        if not self.report.rows:
            stats.update(Text("; ".join(self.report.notes) or "no MI runs in this selection"))
            model = self.report.models[0].id if self.report.models else -1
            plots.update(entropy_plot(self.report, model))
            tokens.update("")
            return
        row = self.report.rows[min(index, len(self.report.rows) - 1)]
        res = row.result
        head = Text(f"{row.model} · {row.estimator} · {row.group}: {res.n_positions:,} "
                    f"positions with MI, |E| {res.n_high:,}, |P| {res.n_peaks:,}, "
                    f"|E∩P| {res.n_both:,}", style="bold")
        # the counterfactual test at this estimator's peaks (forkview mi --positions
        # categories --peaks-from <estimator>), when there is one
        cfs = [Text(c.sentence, style="italic") for c in self.report.counterfactual
               if c.model_id == row.model_id and c.peaks_from == row.estimator]
        stats.update(Group(head, verdict_text(row), *cfs, Text(""), controls_table(row),
                           Text(""), stats_table(row)))
        plots.update(Group(Text(""), lag_plot(row), Text(""),
                           entropy_plot(self.report, row.model_id)))
        tokens.update(Group(Text(""), Text("most frequent tokens", style="bold"),
                            token_lines(row)))

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 1:
            self.app.pop_screen()
        else:
            self.app.exit()
