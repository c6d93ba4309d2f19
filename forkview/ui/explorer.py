"""The explorer: a prompt box, the streaming trace, the token panel, legend and status.

State lives here and changes only in message handlers; the generation worker runs in
a thread, talks to the model and the store through `annotate_prompt`, and posts
messages (see forkview.ui.messages) back.
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Input
from textual.worker import Worker

from forkview.ui.messages import (
    GenerationFinished,
    GenerationStarted,
    TokensArrived,
)
from forkview.ui.status import EntropyLegend, StatusLine
from forkview.ui.token_panel import TokenPanel
from forkview.ui.trace_view import TraceView
from models.errors import ModelError
from models.types import GenerationParams, TokenStep
from store import Store, StoreError

BATCH_SECONDS = 0.05  # how often a running generation repaints
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


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
        Binding("p", "focus_prompt", "prompt"),
        Binding("b,f2", "browse", "browse"),
        Binding("question_mark,f1", "app.help", "help"),
        Binding("q", "app.quit", "quit"),
    ]

    def __init__(self, store: Store, params: GenerationParams, *,
                 browse_only: bool = False, open_trace: int | None = None) -> None:
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

    # ---------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        placeholder = ("browse-only: press b to open a saved trace" if self.browse_only
                       else "type a prompt, Enter generates")
        yield Input(placeholder=placeholder, id="prompt")
        with Horizontal(id="main"):
            yield TraceView(id="trace", placeholder=(
                "Tokens appear here, coloured by entropy. Press ? for keys."))
            yield TokenPanel(id="panel")
        yield EntropyLegend(id="legend")
        yield StatusLine(id="status")
        yield Footer()

    @property
    def trace_view(self) -> TraceView:
        return self.query_one(TraceView)

    def on_mount(self) -> None:
        self._ready = True
        if self._loading:
            self._spinner = self.set_interval(0.25, self.refresh_status)
        if self.browse_only:
            self.trace_view.focus()
        else:
            self.query_one("#prompt", Input).focus()
        self.refresh_status()
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
        if self.pending_prompt is not None:
            prompt, self.pending_prompt = self.pending_prompt, None
            self.start_generation(prompt)

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
            left = Text(f"{self.lm.name} · {self.lm.device} {self.lm.dtype} · "
                        f"{sampling_label(self.params)}")
        status.set_model(left)
        right = Text()
        if self.trace_id is not None:
            right.append(f"trace #{self.trace_id} ")
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
        if self.tokens_per_second:
            right.append(f" · {self.tokens_per_second:.1f} tok/s")
        status.set_trace(right)

    # ---------------------------------------------------------------- cursor → panel
    @on(TraceView.CursorMoved)
    def _cursor_moved(self, event: TraceView.CursorMoved) -> None:
        view = event.view
        panel = self.query_one(TokenPanel)
        if 0 <= event.index < len(view.steps):
            panel.show(view.steps[event.index], event.index, len(view.steps),
                       view.is_high(event.index))
        else:
            panel.show(None)

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
        self.start_generation(prompt)

    def start_generation(self, prompt: str) -> None:
        self.gen_id += 1
        self.cancel = threading.Event()
        self.gen_done = threading.Event()
        self.generating = True
        self.trace_id, self.trace_status, self.stop_reason = None, "starting", None
        self.tokens_per_second = None
        view = self.trace_view
        view.set_steps([])
        view.follow = True
        view.focus()
        self.query_one(EntropyLegend).set_threshold(None)
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
        self.query_one(EntropyLegend).set_threshold(view.threshold)
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
        self._refresh_panel()
        self.refresh_status()
        if self.pending_prompt is not None:
            prompt, self.pending_prompt = self.pending_prompt, None
            self.start_generation(prompt)

    def _refresh_panel(self) -> None:
        view = self.trace_view
        if 0 <= view.cursor < len(view.steps):
            self.query_one(TokenPanel).show(view.steps[view.cursor], view.cursor,
                                            len(view.steps), view.is_high(view.cursor))

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
        # However the app ends, a running trace must not be left `running`.
        self.stop_generation()
        self.wait_generation()

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
            steps = self.store.tokens(trace_id)
        except StoreError as e:
            self.notify(str(e), severity="error")
            return
        self.trace_id, self.trace_status = info.id, info.status
        self.stop_reason, self.tokens_per_second = info.stop_reason, info.tokens_per_second
        self.query_one("#prompt", Input).value = info.prompt
        view = self.trace_view
        view.follow = False
        view.set_steps(steps, cursor=0)
        view.focus()
        self.query_one(EntropyLegend).set_threshold(view.threshold)
        self._refresh_panel()
        self.refresh_status()

    # ---------------------------------------------------------------- actions
    def action_escape(self) -> None:
        if self.stop_generation():
            return
        if isinstance(self.focused, Input):
            self.trace_view.focus()

    def action_focus_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_browse(self) -> None:
        from forkview.ui.browser import BrowserScreen

        self.app.push_screen(BrowserScreen(self.store), callback=self.open_trace)
