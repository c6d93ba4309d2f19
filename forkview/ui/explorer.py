"""The explorer: a prompt box, the streaming trace, the strip chart, the token panel,
legend and status.

State lives here and changes only in message handlers. Three kinds of worker run in
threads and post messages (see forkview.ui.messages) back: the generation
(`annotate_prompt`), branch jobs from the fork panel (`forkview.forks.grow`, queued,
one at a time) and, after a generation or on `m`, the MI estimators
(`forkview.mi.run_many`, which skips what cannot run with its reason and stores values
as they come, so cancelling keeps what is finished). They never run at the same time:
the model is not shared between threads. `_pump` starts the next one when the model
is free: a waiting prompt first, then queued branches, then MI (a branch request
pauses MI, which resumes after).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from functools import partial
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Input
from textual.worker import Worker

from forkview import forks
from forkview.analysis.peaks import RULES
from forkview.ui.chart import StripChart
from forkview.ui.fork_panel import ForkPanel
from forkview.ui.fork_queue import (
    ForkJob,
    ForkRequest,
    PrefixSlot,
    Result,
    answer_name,
    counterfactual_text,
    distribution_text,
    mark,
)
from forkview.ui.messages import (
    ForkFinished,
    ForkStarted,
    ForkTokens,
    GenerationFinished,
    GenerationStarted,
    MIFinished,
    MINotice,
    MIProgress,
    TokensArrived,
)
from forkview.ui.mi_data import MISeries, MIState, panel_mi
from forkview.ui.scale import VIEWS
from forkview.ui.status import Legend, StatusLine
from forkview.ui.token_panel import TokenPanel
from forkview.ui.trace_view import TraceView
from models.errors import ModelError
from models.types import GenerationParams, TokenStep
from store import Store, StoreError, TraceInfo

BATCH_SECONDS = 0.05  # how often a running generation repaints
MI_RELOAD_SECONDS = 0.5  # how often a running MI pass re-reads its values
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
DEFAULT_MI = ("hsic", "answer-gain")  # what runs after each generation


def sampling_label(params: GenerationParams) -> str:
    if params.greedy:
        text = "greedy"
    else:
        text = f"T={params.temperature:g}"
        if params.top_p < 1.0:
            text += f" top-p {params.top_p:g}"
        if params.top_k:
            text += f" top-k {params.top_k}"
        if params.seed is not None:
            text += f" seed {params.seed}"
    return text + f" · ≤{params.max_new_tokens} tok"


class ExplorerScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "escape", "stop", show=False),
        Binding("enter", "fork", "fork"),
        Binding("t", "tree", "tree"),
        Binding("v", "cycle_view", "view"),
        Binding("e", "cycle_estimator", "estimator", show=False),
        Binding("r", "cycle_rule", "peak rule", show=False),
        Binding("m", "run_mi", "MI"),
        Binding("R", "report", "report", show=False),
        Binding("p", "focus_prompt", "prompt"),
        Binding("b,f2", "browse", "browse"),
        Binding("question_mark,f1", "app.help", "help"),
        Binding("q", "app.quit", "quit"),
    ]

    def __init__(self, store: Store, params: GenerationParams, *,
                 browse_only: bool = False, open_trace: int | None = None,
                 mi_estimators: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.store = store
        self.initial_trace = open_trace
        self.params = params
        self.browse_only = browse_only
        self.lm: Any = None  # models.loading.LoadedModel once loaded
        self.model_error: str | None = None
        self.model_message = "starting…"
        self.load_started = time.monotonic()
        # the trace on screen
        self.trace_id: int | None = None
        self.trace_status: str | None = None
        # (parent id, fork position) when the trace on screen is a branch
        self.branch_of: tuple[int, int] | None = None
        self.stop_reason: str | None = None
        self.tokens_per_second: float | None = None
        # the generation in flight
        self.gen_id = 0
        self.generating = False
        self.cancel = threading.Event()
        self.gen_done = threading.Event()
        self.gen_done.set()
        self.worker: Worker[None] | None = None
        self.pending_prompt: str | None = None
        self._spinner: Timer | None = None
        self._ready = False  # on_mount has run: widgets exist
        # MI: what is shown (the view, the series, its peaks) and the pass in flight
        self.view_mode = VIEWS[0]
        self.mi = MIState()
        self.mi_estimators = tuple(DEFAULT_MI if mi_estimators is None else mi_estimators)
        self.mi_id = 0
        self.mi_running = False
        self.mi_trace_id: int | None = None
        self.mi_progress: MIProgress | None = None
        self.mi_cancel = threading.Event()
        self.mi_done = threading.Event()
        self.mi_done.set()
        self.mi_worker: Worker[None] | None = None
        self._mi_started = 0.0
        self._mi_reloaded = 0.0
        self._mi_timer: Timer | None = None
        self.mi_names: tuple[str, ...] = ()
        # MI to start when the model is free: after a generation, or a pass paused
        # for branch jobs (it resumes: stored values are kept)
        self.mi_next: tuple[int, tuple[str, ...]] | None = None
        self._mi_paused = False
        # branch jobs: the queue, the one growing, and the one streaming into the view
        self.fork_queue: deque[ForkJob] = deque()
        self.fork_job: ForkJob | None = None
        self.fork_ids = 0
        self.fork_cancel = threading.Event()
        self.fork_done = threading.Event()
        self.fork_done.set()
        self.fork_worker: Worker[None] | None = None
        self.fork_slot = PrefixSlot()  # the last forked trace's KV cache (worker only)
        self.view_fork: int | None = None
        self._fork_started = 0.0
        self._fork_timer: Timer | None = None

    # ---------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        placeholder = ("browse-only: press b to open a saved trace" if self.browse_only
                       else "type a prompt, Enter generates")
        yield Input(placeholder=placeholder, id="prompt")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield TraceView(id="trace", placeholder=(
                    "Tokens appear here, coloured by entropy. F1 for keys "
                    "(or ? outside the prompt)."))
                yield StripChart(id="chart")
            yield TokenPanel(id="panel")
        yield Legend(id="legend")
        yield StatusLine(id="status")
        yield Footer()

    @property
    def trace_view(self) -> TraceView:
        return self.query_one(TraceView)

    @property
    def chart(self) -> StripChart:
        return self.query_one(StripChart)

    @property
    def legend(self) -> Legend:
        return self.query_one(Legend)

    def on_mount(self) -> None:
        self._ready = True
        if self._loading:
            self._spinner = self.set_interval(0.25, self.refresh_status)
        if self.browse_only:
            self.trace_view.focus()
        else:
            self.query_one("#prompt", Input).focus()
        self.refresh_status()
        self._apply_view()
        if self.initial_trace is not None:
            self.open_trace(self.initial_trace)
        elif self.browse_only:
            self.action_browse()

    # ---------------------------------------------------------------- model state
    @property
    def _loading(self) -> bool:
        return not self.browse_only and self.lm is None and self.model_error is None

    def _stop_spinner(self) -> None:
        if self._spinner is not None:
            self._spinner.stop()
            self._spinner = None

    def model_loading(self, message: str) -> None:
        if self.model_message == "starting…":
            self.load_started = time.monotonic()
        self.model_message = message
        if self._ready and self._spinner is None:
            self._spinner = self.set_interval(0.25, self.refresh_status)
        self.refresh_status()

    def model_ready(self, lm: Any) -> None:
        self.lm = lm
        self._stop_spinner()
        self.refresh_status()
        self._pump()

    def model_failed(self, error: str) -> None:
        self.model_error = error
        self.pending_prompt = None
        self._stop_spinner()
        self.refresh_status()

    # ---------------------------------------------------------------- status line
    def refresh_status(self) -> None:
        if not self._ready:
            return
        status = self.query_one(StatusLine)
        if self.browse_only:
            left = Text(f"browse only · {self.store.path.name}")
        elif self.model_error:
            left = Text(f"model failed: {self.model_error}", style="bold red")
        elif self.lm is None:
            elapsed = time.monotonic() - self.load_started
            frame = SPINNER[int(elapsed * 4) % len(SPINNER)]
            left = Text(f"{frame} {self.model_message} {elapsed:.0f}s", style="italic")
        else:
            # device, dtype and sampling first: at 80 columns the model's name is what
            # the ellipsis cuts, never the settings that decide the numbers
            dtype = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(
                self.lm.dtype, self.lm.dtype)
            left = Text(f"{self.lm.device} {dtype} · {sampling_label(self.params)} · "
                        f"{self.lm.name}")
        status.set_model(left)
        right = Text()
        if self.trace_id is not None:
            right.append(f"trace #{self.trace_id} ")
            if self.branch_of is not None:
                right.append(f"⑂#{self.branch_of[0]}@{self.branch_of[1]} ", style="dim")
        if self.trace_status:
            style = {"running": "bold cyan", "complete": "green", "stopped": "yellow",
                     "failed": "bold red", "stopping": "yellow"}.get(self.trace_status, "")
            right.append(self.trace_status, style=style)
            if self.stop_reason and self.trace_status != "running":
                right.append(f" ({self.stop_reason})")
            if self.trace_status == "running":
                right.append(" (Esc stops)", style="dim")
        n = len(self.trace_view.steps)
        if self.trace_status:
            right.append(f" · {n} tok")
        job = self.fork_job
        if job is not None and (self.view_fork != job.job_id or self.fork_queue):
            right.append(" · ")
            right.append_text(self._fork_status())
        elif self.mi_running:
            right.append(" · ")
            right.append_text(self._mi_status())
        elif self.tokens_per_second:
            right.append(f" · {self.tokens_per_second:.1f} tok/s")
        status.set_trace(right)

    def _mi_status(self) -> Text:
        elapsed = time.monotonic() - self._mi_started
        frame = SPINNER[int(elapsed * 4) % len(SPINNER)]
        text = Text(f"{frame} MI", style="bold cyan")
        if self.mi_trace_id != self.trace_id:
            text.append(f" #{self.mi_trace_id}", style="cyan")
        prog = self.mi_progress
        if self.mi_cancel.is_set():
            text.append(" stopping…", style="yellow")
        elif prog is not None:
            text.append(f" {prog.name} {prog.done}/{prog.total}", style="cyan")
            if prog.steps > 1:
                text.append(f" ({prog.step}/{prog.steps})", style="dim")
            text.append(" Esc stops", style="dim")
        else:
            text.append(" starting…", style="cyan")
        return text

    def _fork_status(self) -> Text:
        job = self.fork_job
        assert job is not None
        elapsed = time.monotonic() - self._fork_started
        frame = SPINNER[int(elapsed * 4) % len(SPINNER)]
        text = Text(f"{frame} ⑂", style="bold magenta")
        if self.fork_cancel.is_set():
            text.append(" stopping…", style="yellow")
        elif self.view_fork != job.job_id:  # growing out of sight (sample N, or left)
            rows = f"{job.rows} branches " if job.rows > 1 else "branch "
            text.append(f" {rows}{job.tokens} tok", style="magenta")
        if self.fork_queue:
            text.append(f" +{len(self.fork_queue)} queued", style="magenta")
        if self.view_fork != job.job_id and not self.fork_cancel.is_set():
            text.append(" Esc stops", style="dim")
        return text

    # ---------------------------------------------------------------- cursor → panel
    @on(TraceView.CursorMoved)
    def _cursor_moved(self, event: TraceView.CursorMoved) -> None:
        self.chart.set_cursor(event.index)
        self._refresh_panel()

    @on(StripChart.Selected)
    def _chart_selected(self, event: StripChart.Selected) -> None:
        self.trace_view.select(event.position)

    # ---------------------------------------------------------------- views and MI data
    def _mi_hint(self) -> str:
        return "forkview mi computes it" if self.browse_only else "m computes it"

    def _hints(self, position: int | None = None,
               trace_id: int | None = None) -> dict[str, str]:
        """Commands that work as printed: this database by path, the estimator on view."""
        from forkview.ui.browser import command_hints

        current = self.mi.current
        est = current.run.estimator if current is not None else "hsic"
        return command_hints(self.store.path, trace_id or self.trace_id or 0, position,
                             estimator=est)

    def _load_mi(self) -> None:
        """Re-read the MI runs of the trace on screen and repaint what shows them."""
        n = len(self.trace_view.steps)
        if self.trace_id is None or self.trace_status in (None, "starting", "running"):
            self.mi.clear()
            self.chart.set_counterfactual(set())
        else:
            try:
                series = [MISeries(run, self.store.mi_values(run.id),
                                   self.store.mi_details(run.id))
                          for run in self.store.mi_runs(self.trace_id)]
            except StoreError as e:
                self.notify(str(e), severity="error")
                series = []
            self.mi.load(series, n)
            # positions where a rollout run measured the keep-vs-redraw counterfactual
            self.chart.set_counterfactual({
                p for s in series for p, d in s.details.items()
                if isinstance(d, dict) and "counterfactual" in d})
        self._mi_reloaded = time.monotonic()
        self._apply_view()

    def _apply_view(self) -> None:
        if not self._ready:
            return
        view = self.trace_view
        n = len(view.steps)
        mi_shown = self.view_mode != "entropy"
        view.set_overlay(self.view_mode, self.mi.bins(n) if mi_shown else [],
                         self.mi.peaks if mi_shown else [])
        current = self.mi.current
        self.chart.set_mi(self.mi.value_list(n) if current else [], self.mi.range,
                          self.mi.peak_set)
        self.legend.set_view(self.view_mode, series_label=current.label if current else None,
                             mi_range=self.mi.range, rule=self.mi.rule,
                             n_peaks=len(self.mi.peaks), hint=self._mi_hint())
        self._refresh_panel()

    def _refresh_entropy(self) -> None:
        view = self.trace_view
        self.chart.set_entropy([s.entropy for s in view.steps], set(view.high_positions))
        self.legend.set_threshold(view.threshold)

    def action_cycle_view(self) -> None:
        self.view_mode = VIEWS[(VIEWS.index(self.view_mode) + 1) % len(VIEWS)]
        self._apply_view()

    def action_cycle_estimator(self) -> None:
        if self.mi.cycle(len(self.trace_view.steps)) is None:
            self.notify(f"No MI values on this trace ({self._mi_hint()}).", timeout=4)
            return
        if self.view_mode == "entropy":
            self.view_mode = "mi"  # make the choice visible
        self._apply_view()

    def action_cycle_rule(self) -> None:
        i = RULES.index(self.mi.rule) if self.mi.rule in RULES else -1
        self.mi.set_rule(RULES[(i + 1) % len(RULES)], len(self.trace_view.steps))
        self._apply_view()
        self.notify(f"MI peaks: {self.mi.rule.label} ({self.mi.rule.definition})",
                    timeout=3)

    # ---------------------------------------------------------------- generating
    @on(Input.Submitted, "#prompt")
    def _submit(self, event: Input.Submitted) -> None:
        prompt = event.value
        if not prompt.strip():
            self.notify("Type a prompt first.", severity="warning")
            return
        if self.browse_only:
            self.notify("This is browse-only mode: no model is loaded. Run `forkview` "
                        "(without browse) to generate.", severity="warning", timeout=6)
            return
        if self.model_error:
            self.notify(f"No model: {self.model_error}", severity="error")
            return
        if self.lm is None:
            self.pending_prompt = prompt
            self.notify("Model loading… the prompt will run when it is ready.")
            return
        if self.generating:
            # Enter again restarts: stop this one (saved as stopped), then run the new one.
            self.pending_prompt = prompt
            self.cancel.set()
            return
        if self.fork_job is not None:
            # Branches are explicit requests: they are not dropped for a new prompt.
            self.pending_prompt = prompt
            self.notify("The prompt runs when the growing branches finish (Esc stops "
                        "them).", timeout=5)
            return
        if self.mi_running:
            # The model is busy with MI: stop it (finished values are kept), then generate.
            self.pending_prompt = prompt
            self.stop_mi()
            return
        self.start_generation(prompt)

    def start_generation(self, prompt: str) -> None:
        self.gen_id += 1
        self.cancel = threading.Event()
        self.gen_done = threading.Event()
        self.generating = True
        self.trace_id, self.trace_status, self.stop_reason = None, "starting", None
        self.tokens_per_second = None
        self.branch_of = None
        self.view_fork = None
        view = self.trace_view
        view.set_steps([])
        view.set_dim_before(0)
        view.follow = True
        view.focus()
        self._refresh_entropy()
        self._load_mi()
        self.refresh_status()
        self.worker = self._generate(self.gen_id, self.lm, prompt, self.params,
                                     self.cancel, self.gen_done)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def _generate(self, gen_id: int, lm: Any, prompt: str, params: GenerationParams,
                  cancel: threading.Event, done: threading.Event) -> None:
        """Runs in a thread: never touches widgets, only posts messages."""
        from forkview.pipeline import annotate_prompt

        batch: list[TokenStep] = []
        trace_id: int | None = None
        t0 = time.perf_counter()
        last_post = t0

        def flush() -> None:
            nonlocal batch, last_post
            if batch:
                self.post_message(TokensArrived(gen_id, batch, time.perf_counter() - t0))
                batch = []
            last_post = time.perf_counter()

        def on_start(result: Any) -> None:
            nonlocal trace_id, t0
            trace_id = result.trace_id
            t0 = time.perf_counter()
            self.post_message(GenerationStarted(gen_id, result.trace_id))

        def on_step(step: TokenStep) -> None:
            step.hidden = None
            batch.append(step)
            if time.perf_counter() - last_post >= BATCH_SECONDS:
                flush()

        error = None
        try:
            annotate_prompt(lm, self.store, prompt, params, cancel=cancel,
                            on_start=on_start, on_step=on_step)
        except (ModelError, StoreError) as e:  # e.g. an empty or too-long prompt
            error = str(e)
        except Exception as e:  # a model or store failure: shown, never a traceback
            error = f"{type(e).__name__}: {e}"
        finally:
            flush()
            done.set()
        self.post_message(GenerationFinished(gen_id, trace_id, error))

    @on(GenerationStarted)
    def _started(self, message: GenerationStarted) -> None:
        if message.gen_id != self.gen_id:
            return
        self.trace_id = message.trace_id
        self.trace_status = "stopping" if self.cancel.is_set() else "running"
        self.refresh_status()

    @on(TokensArrived)
    def _tokens(self, message: TokensArrived) -> None:
        if message.gen_id != self.gen_id:
            return
        view = self.trace_view
        view.append_steps(message.steps)
        if message.elapsed > 0:
            self.tokens_per_second = len(view.steps) / message.elapsed
        self._refresh_entropy()
        self._refresh_panel()
        self.refresh_status()

    @on(GenerationFinished)
    def _finished(self, message: GenerationFinished) -> None:
        if message.gen_id != self.gen_id:
            return
        self.generating = False
        if message.trace_id is not None:
            try:
                info = self.store.trace(message.trace_id)
                self.trace_status, self.stop_reason = info.status, info.stop_reason
                self.tokens_per_second = info.tokens_per_second
            except StoreError as e:
                self.notify(str(e), severity="error")
        else:
            self.trace_status = "failed" if message.error else None
        if message.error:
            self.notify(message.error, title="generation failed", severity="error", timeout=8)
        self._load_mi()
        self.refresh_status()
        if (self.pending_prompt is None and self.trace_status == "complete"
                and self.trace_id is not None and self.mi_estimators and self.lm is not None):
            self.mi_next = (self.trace_id, self.mi_estimators)
        self._pump()

    def _pump(self) -> None:
        """Start the next model task if the model is free (module doc)."""
        if (self.lm is None or self.generating or self.mi_running
                or self.fork_job is not None):
            return
        if self.pending_prompt is not None:
            prompt, self.pending_prompt = self.pending_prompt, None
            self.start_generation(prompt)
        elif self.fork_queue:
            self._start_fork(self.fork_queue.popleft())
        elif self.mi_next is not None:
            trace_id, names = self.mi_next
            self.mi_next = None
            self.start_mi(trace_id, names)

    def _refresh_panel(self) -> None:
        if not self._ready:
            return
        view = self.trace_view
        panel = self.query_one(TokenPanel)
        if 0 <= view.cursor < len(view.steps):
            panel.show(view.steps[view.cursor], view.cursor, len(view.steps),
                       view.is_high(view.cursor), panel_mi(self.mi, view.cursor,
                                                           self._mi_hint()))
        else:
            panel.show(None)

    def stop_generation(self) -> bool:
        """Ask the running generation to stop; it saves the trace as `stopped`."""
        if not self.generating:
            return False
        self.cancel.set()
        self.pending_prompt = None
        self.trace_status = "stopping"
        self.refresh_status()
        return True

    def wait_generation(self, timeout: float = 15.0) -> bool:
        """Block until the generation thread has finished writing (used on exit)."""
        return self.gen_done.wait(timeout)

    def on_unmount(self) -> None:
        # However the app ends, a running trace (branch, MI run) must not be left
        # `running`: each keeps its tokens (values), marked stopped.
        self.stop_generation()
        self.stop_all_forks()
        self.stop_mi()
        self.wait_generation()
        self.fork_done.wait(15.0)
        self.mi_done.wait(15.0)

    # ---------------------------------------------------------------- MI
    def action_run_mi(self) -> None:
        """`m`: compute the selected MI estimators on the trace on screen."""
        if self.browse_only:
            hints = self._hints()
            self.notify("Computing MI needs a model: this is browse-only mode. Run "
                        f"`{hints['explore']}` to explore with a model, or "
                        f"`{hints['mi']}`.", severity="warning", timeout=8)
            return
        if self.model_error:
            self.notify(f"No model: {self.model_error}", severity="error")
            return
        if self.lm is None:
            self.notify("The model is still loading: press m again when it is ready.",
                        severity="warning")
            return
        if self.trace_id is None:
            self.notify("Generate or open a trace first.", severity="warning")
            return
        if self.generating or self.trace_status == "running":
            self.notify("A generation is running: wait for it or press Esc.",
                        severity="warning")
            return
        if self.fork_job is not None:
            if self.mi_estimators:
                self.mi_next = (self.trace_id, self.mi_estimators)
                self.notify("MI runs when the growing branches finish.", timeout=4)
            return
        if self.mi_running:
            self.notify("MI is already running (Esc stops it).", severity="warning")
            return
        if not self.mi_estimators:
            self.notify("No MI estimators selected.", severity="warning")
            return
        self.start_mi(self.trace_id, self.mi_estimators)

    def start_mi(self, trace_id: int, names: tuple[str, ...]) -> None:
        self.mi_id += 1
        self.mi_cancel = threading.Event()
        self.mi_done = threading.Event()
        self.mi_running = True
        self.mi_trace_id = trace_id
        self.mi_names = names
        self.mi_progress = None
        self._mi_started = time.monotonic()
        if self._mi_timer is None:
            self._mi_timer = self.set_interval(0.25, self.refresh_status)
        self.refresh_status()
        self.mi_worker = self._run_mi(self.mi_id, self.lm, trace_id, names, self.mi_cancel,
                                      self.mi_done)

    def stop_mi(self) -> bool:
        """Ask the MI pass to stop after its current chunk; stored values stay."""
        if not self.mi_running:
            return False
        self.mi_cancel.set()
        self.refresh_status()
        return True

    @work(thread=True, exclusive=True, group="mi", exit_on_error=False)
    def _run_mi(self, mi_id: int, lm: Any, trace_id: int, names: tuple[str, ...],
                cancel: threading.Event, done: threading.Event) -> None:
        """Runs in a thread: never touches widgets, only posts messages."""
        status = "complete"

        def notice(text: str, severity: str = "information") -> None:
            self.post_message(MINotice(mi_id, text, severity))

        try:
            from forkview.mi import jobs_for, run_many
            from models.estimators import get_estimator

            estimators = [get_estimator(name) for name in names]
            skipped: dict[str, list[str]] = {}  # reason -> estimators, one notice each
            step = [0, 0]

            def outcome(o: Any) -> None:
                nonlocal status
                if o.status == "skipped":
                    reason = o.reason + (f" ({self._hints(trace_id=trace_id)['mi']} loads "
                                         "it)" if o.other_model else "")
                    skipped.setdefault(reason, []).append(o.job.estimator.name)
                elif o.status == "failed":
                    notice(f"{o.job.estimator.name}: {o.reason}", "error")
                    status = "failed"
                elif o.status == "stopped":
                    status = "stopped"

            def start(n: int) -> None:
                for reason, skipped_names in skipped.items():
                    notice(f"{', '.join(skipped_names)} skipped: {reason}", "warning")
                step[1] = n

            def run(_job: Any, k: int, _n: int) -> None:
                step[0] = k

            def progress(job: Any, finished: int, total: int) -> None:
                self.post_message(MIProgress(mi_id, trace_id, job.estimator.name, finished,
                                             total, step[0], step[1]))

            runs = run_many(lm, self.store, jobs_for([trace_id], estimators), own_model=True,
                            cancel=cancel, on_outcome=outcome, on_start=start, on_run=run,
                            on_progress=progress, on_status=notice)
            if runs.interrupted and status == "complete":
                status = "stopped"
            if runs.count("skipped") == len(runs.outcomes) and status == "complete":
                status = "skipped"
        except (ModelError, StoreError) as e:
            notice(str(e), "error")
            status = "failed"
        except Exception as e:  # shown in the app, never a traceback
            notice(f"{type(e).__name__}: {e}", "error")
            status = "failed"
        finally:
            done.set()
        self.post_message(MIFinished(mi_id, trace_id, status))

    @on(MIProgress)
    def _mi_progressed(self, message: MIProgress) -> None:
        if message.mi_id != self.mi_id:
            return
        self.mi_progress = message
        finished_one = message.done >= message.total
        if message.trace_id == self.trace_id and (
                finished_one or message.done == 0
                or time.monotonic() - self._mi_reloaded >= MI_RELOAD_SECONDS):
            self._load_mi()
        self.refresh_status()

    @on(MINotice)
    def _mi_notice(self, message: MINotice) -> None:
        if message.mi_id != self.mi_id:
            return
        self.notify(message.text, title="MI", severity=message.severity,  # type: ignore[arg-type]
                    timeout=8 if message.severity == "error" else 5)

    @on(MIFinished)
    def _mi_finished(self, message: MIFinished) -> None:
        if message.mi_id != self.mi_id:
            return
        self.mi_running = False
        if self._mi_timer is not None:
            self._mi_timer.stop()
            self._mi_timer = None
        if message.trace_id == self.trace_id:
            self._load_mi()
        if message.status == "stopped" and self._mi_paused:
            self.notify("MI paused for the branches: it resumes when they finish.",
                        timeout=4)
        elif message.status == "stopped":
            self.notify("MI stopped: the values computed so far are kept.", timeout=4)
        elif message.status == "complete":
            self.notify(f"MI done on trace #{message.trace_id}.", timeout=3)
        self._mi_paused = False
        self.refresh_status()
        self._pump()

    # ---------------------------------------------------------------- opening traces
    def open_trace(self, trace_id: int | None) -> None:
        """Show a saved trace (read-only). None: keep what is shown."""
        if trace_id is None:
            return
        if self.generating:
            self.notify("A generation is running: press Esc to stop it first.",
                        severity="warning")
            return
        try:
            info = self.store.trace(trace_id)
            # a branch: its whole response, the parent's prefix included (faded)
            steps = self.store.full_tokens(trace_id)
        except StoreError as e:
            self.notify(str(e), severity="error")
            return
        self.trace_id, self.trace_status = info.id, info.status
        self.stop_reason, self.tokens_per_second = info.stop_reason, info.tokens_per_second
        self.view_fork = None  # a growing branch no longer streams into the view
        fork = info.fork_position or 0
        self.branch_of = None if info.is_root else (info.parent_trace_id or 0, fork)
        self.query_one("#prompt", Input).value = info.prompt
        view = self.trace_view
        view.follow = False
        view.set_dim_before(fork if not info.is_root else 0)
        view.set_steps(steps, cursor=fork if not info.is_root else 0)
        view.focus()
        self._refresh_entropy()
        self._load_mi()
        self.refresh_status()

    # ---------------------------------------------------------------- actions
    def action_escape(self) -> None:
        if self.stop_generation() or self.stop_fork() or self.stop_mi():
            return
        if isinstance(self.focused, Input):
            self.trace_view.focus()

    def action_focus_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_browse(self) -> None:
        from forkview.ui.browser import BrowserScreen

        self.app.push_screen(BrowserScreen(self.store), callback=self.open_trace)

    def action_report(self) -> None:
        """The overlap report of this database: `forkview report`'s numbers."""
        from forkview.ui.report_screen import ReportScreen

        self.app.push_screen(ReportScreen(self.store.path, store=self.store))

    def action_tree(self) -> None:
        """`t`: the family tree of the trace on screen."""
        from forkview.ui.tree import TreeScreen

        if self.trace_id is None:
            self.notify("Generate or open a trace first: t shows its family of branches.",
                        severity="warning")
            return
        self.app.push_screen(TreeScreen(self.store, self.trace_id, browse_only=self.browse_only),
                             callback=self._tree_closed)

    def _tree_closed(self, trace_id: int | None) -> None:
        if trace_id is not None:
            self.open_trace(trace_id)
            return
        # The trace on screen may have been deleted from the tree: show its parent.
        if self.trace_id is None or self.generating or self.view_fork is not None:
            return
        try:
            self.store.trace(self.trace_id)
        except StoreError:
            parent = self.branch_of[0] if self.branch_of else None
            self.notify(f"Trace #{self.trace_id} was deleted.", timeout=4)
            self._clear_trace()
            self.open_trace(parent)

    def _clear_trace(self) -> None:
        self.trace_id = self.trace_status = self.stop_reason = None
        self.branch_of, self.tokens_per_second = None, None
        self.trace_view.set_dim_before(0)
        self.trace_view.set_steps([])
        self._refresh_entropy()
        self._load_mi()
        self.refresh_status()

    def _reload_tree(self) -> None:
        from forkview.ui.tree import TreeScreen

        for screen in self.app.screen_stack:
            if isinstance(screen, TreeScreen):
                screen.reload()

    # ---------------------------------------------------------------- forks
    def action_fork(self) -> None:
        """Enter on a token: the fork panel (alternatives, typed text, sample N)."""
        view = self.trace_view
        if self.trace_id is None or not view.steps or not 0 <= view.cursor < len(view.steps):
            self.notify("Generate or open a trace first, then press Enter on a token.",
                        severity="warning")
            return
        if self.trace_status in ("starting", "running", "stopping"):
            self.notify("This trace is still being written: wait for it (or press Esc), "
                        "then fork it.", severity="warning")
            return
        position = view.cursor
        if self.browse_only:
            hints = self._hints(position)
            self.notify("Forking needs a model: this is browse-only mode. Run "
                        f"`{hints['explore']}` to explore with a model, or "
                        f"`{hints['fork']}`.", severity="warning", timeout=8)
            return
        if self.model_error:
            self.notify(f"No model: {self.model_error}", severity="error")
            return
        if self.lm is None:
            self.notify("The model is still loading: press Enter again when it is ready.",
                        severity="warning")
            return
        try:
            info = self.store.trace(self.trace_id)
            forks.check_tokenizer(self.store, forks.ForkSource(info, []), self.lm)
        except (forks.ForkError, StoreError) as e:
            self.notify(str(e), severity="error", timeout=8)
            return
        note = ""
        if self.branch_of is not None and position < self.branch_of[1]:
            note = f"(inherited from #{self.branch_of[0]})"
        panel = ForkPanel(info.id, view.steps[position], index=position, total=len(view.steps),
                          high=view.is_high(position),
                          mi=panel_mi(self.mi, position, self._mi_hint()), branch_note=note)
        self.app.push_screen(panel, callback=partial(
            self._fork_requested, info, position, list(view.steps[:position])))

    def _fork_requested(self, info: TraceInfo, position: int, prefix: list[TokenStep],
                        request: ForkRequest | None) -> None:
        if request is None:
            return
        self.fork_ids += 1
        job = ForkJob(job_id=self.fork_ids, trace_id=info.id, position=position,
                      request=request, max_new_tokens=self.params.max_new_tokens,
                      prefix=prefix, label=request.label(), source_answer=info.answer,
                      source_correct=info.correct)
        self.fork_queue.append(job)
        if self.mi_running and not self.mi_cancel.is_set():
            # The user is waiting for the branch: MI steps aside and resumes after.
            self.mi_next = (self.mi_trace_id or info.id, self.mi_names)
            self._mi_paused = True
            self.stop_mi()
        ahead = len(self.fork_queue) - 1 + (self.fork_job is not None)
        if ahead:
            self.notify(f"Queued: {job.label} at position {position} of #{info.id} "
                        f"({ahead} ahead).", timeout=4)
        self._pump()
        self.refresh_status()

    def _start_fork(self, job: ForkJob) -> None:
        self.fork_job = job
        self.fork_cancel = threading.Event()
        self.fork_done = threading.Event()
        self._fork_started = time.monotonic()
        if self._fork_timer is None:
            self._fork_timer = self.set_interval(0.25, self.refresh_status)
        self.refresh_status()
        self.fork_worker = self._grow(job, self.lm, self.fork_cancel, self.fork_done)

    @work(thread=True, group="fork", exit_on_error=False)
    def _grow(self, job: ForkJob, lm: Any, cancel: threading.Event,
              done: threading.Event) -> None:
        """Runs in a thread: never touches widgets, only posts messages."""
        from forkview.ui.fork_queue import run_job

        results: list[Result] = []
        error = None
        try:
            results = run_job(lm, self.store, job, cancel, self.fork_slot, self.post_message)
        except (forks.ForkError, ModelError, StoreError) as e:
            error = str(e)
        except Exception as e:  # shown in the app, never a traceback
            error = f"{type(e).__name__}: {e}"
        finally:
            done.set()
        self.post_message(ForkFinished(job.job_id, results, error))

    def _is_current(self, job_id: int) -> bool:
        return self.fork_job is not None and self.fork_job.job_id == job_id

    @on(ForkStarted)
    def _fork_started_msg(self, message: ForkStarted) -> None:
        if not self._is_current(message.job_id):
            return
        job = self.fork_job
        assert job is not None
        job.trace_ids = list(message.trace_ids)
        if job.rows == 1 and not self.generating:
            # A chosen or typed branch streams into the trace view, like a generation.
            self.view_fork = job.job_id
            self.trace_id = job.trace_ids[0]
            self.trace_status = "stopping" if self.fork_cancel.is_set() else "running"
            self.stop_reason, self.tokens_per_second = None, None
            self.branch_of = (job.trace_id, job.position)
            view = self.trace_view
            view.set_dim_before(job.position)
            view.set_steps(job.prefix, cursor=None)
            view.follow = True
            if self.app.screen is self:
                view.focus()
            self._refresh_entropy()
            self._load_mi()
        self.refresh_status()
        self._reload_tree()

    @on(ForkTokens)
    def _fork_tokens(self, message: ForkTokens) -> None:
        if not self._is_current(message.job_id):
            return
        job = self.fork_job
        assert job is not None
        job.tokens += sum(len(steps) for steps in message.rows.values())
        if self.view_fork == job.job_id and 0 in message.rows:
            view = self.trace_view
            view.append_steps(message.rows[0])
            if message.elapsed > 0:
                self.tokens_per_second = (len(view.steps) - job.position) / message.elapsed
            self._refresh_entropy()
            self._refresh_panel()
        self.refresh_status()

    @on(ForkFinished)
    def _fork_finished(self, message: ForkFinished) -> None:
        if not self._is_current(message.job_id):
            return
        job = self.fork_job
        assert job is not None
        self.fork_job = None
        if not self.fork_queue and self._fork_timer is not None:
            self._fork_timer.stop()
            self._fork_timer = None
        if self.view_fork == job.job_id:
            self.view_fork = None
            try:
                info = self.store.trace(self.trace_id or 0)
                self.trace_status, self.stop_reason = info.status, info.stop_reason
            except StoreError:
                self.trace_status = "failed"
            self._load_mi()
        self._announce(job, message)
        self._reload_tree()
        self.refresh_status()
        self._pump()

    def _announce(self, job: ForkJob, message: ForkFinished) -> None:
        if message.error:
            self.notify(message.error, title="branch failed", severity="error", timeout=8)
            return
        if not message.results:
            self.notify(f"Stopped before it started: no branch made ({job.label}).",
                        timeout=4)
            return
        if job.request.kind == "counterfactual":
            self.notify(counterfactual_text(job, message.results), title="counterfactual",
                        timeout=30)
            return
        if job.request.kind == "sample":
            self.notify(distribution_text(job, message.results), title="sample",
                        timeout=20)
            return
        tid, status, answer, correct, n = message.results[0]
        self.notify(f"Branch #{tid} of #{job.trace_id} at {job.position} ({job.label}): "
                    f"{status}, {n} tokens, answer {answer_name(answer)}{mark(correct)}.",
                    timeout=6)

    def stop_fork(self) -> bool:
        """Stop the growing branch job: its branches keep their tokens, marked stopped.
        Queued jobs still run."""
        if self.fork_job is None:
            return False
        self.fork_cancel.set()
        if self.view_fork == self.fork_job.job_id:
            self.trace_status = "stopping"
        self.refresh_status()
        return True

    def stop_all_forks(self) -> bool:
        """Drop the queued jobs and stop the growing one (quitting)."""
        self.fork_queue.clear()
        return self.stop_fork()
