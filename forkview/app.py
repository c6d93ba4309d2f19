"""The Textual explorer: `create_app` is what `forkview` and `forkview browse` run.

Importing this module never imports torch or transformers: the model is loaded in a
thread after the app has started (so the prompt box is usable at once), and in
browse-only mode it is never loaded at all.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on
from textual.app import App
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.worker import WorkerCancelled, WorkerFailed

from forkview.ui.explorer import ExplorerScreen
from forkview.ui.help import HelpScreen
from forkview.ui.messages import ModelFailed, ModelLoaded, ModelStatus
from models.errors import ModelError
from models.types import GenerationParams
from store import Store

if TYPE_CHECKING:
    from models.loading import LoadedModel


class ForkviewApp(App[None]):
    TITLE = "forkview"
    CSS_PATH = "ui/app.tcss"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (100, "-wide")]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "quit", show=False, priority=True),
        Binding("f1", "help", "help", show=False),
    ]

    def __init__(self, store: Store, *, model_spec: str = "default", device: str = "auto",
                 dtype: str = "auto", params: GenerationParams | None = None,
                 browse_only: bool = False, lm: LoadedModel | None = None,
                 open_trace: int | None = None,
                 mi_estimators: Sequence[str] | None = None) -> None:
        super().__init__()
        self.store = store
        self.model_spec, self.device, self.dtype = model_spec, device, dtype
        self.params = params or GenerationParams()
        self.browse_only = browse_only
        self.lm = lm
        self.explorer = ExplorerScreen(
            store, self.params, browse_only=browse_only, open_trace=open_trace,
            mi_estimators=None if mi_estimators is None else tuple(mi_estimators))

    def get_default_screen(self) -> Screen[Any]:
        return self.explorer

    def on_mount(self) -> None:
        if self.lm is not None:
            self.explorer.model_ready(self.lm)
        elif not self.browse_only:
            self.explorer.model_loading(f"loading model {self.model_spec}…")
            self._load_model()

    def _load_model(self) -> None:
        # A daemon thread rather than a Textual thread worker: loading cannot be
        # interrupted, and a worker's executor thread would hold the process open for
        # the rest of the load (up to a minute) after the user quits.
        threading.Thread(target=self._load_model_thread, name="forkview-load-model",
                         daemon=True).start()

    def _load_model_thread(self) -> None:
        """Runs in a thread: the import of torch and the load happen here. Never touches
        widgets; post_message is thread-safe."""
        try:
            from models.loading import load_model

            lm = load_model(self.model_spec, self.device, self.dtype,
                            status=lambda text: self.post_message(ModelStatus(text)))
        except ModelError as e:
            self.post_message(ModelFailed(str(e)))
        except Exception as e:  # shown in the app, not as a traceback
            self.post_message(ModelFailed(f"{type(e).__name__}: {e}"))
        else:
            self.post_message(ModelLoaded(lm))

    @on(ModelStatus)
    def _model_status(self, message: ModelStatus) -> None:
        self.explorer.model_loading(message.text)

    @on(ModelLoaded)
    def _model_loaded(self, message: ModelLoaded) -> None:
        self.lm = message.lm
        self.explorer.model_ready(message.lm)
        self.notify(f"{message.lm.name} ready on {message.lm.device} "
                    f"({message.lm.load_seconds:.0f}s)", timeout=3)

    @on(ModelFailed)
    def _model_failed(self, message: ModelFailed) -> None:
        self.explorer.model_failed(message.error)
        self.notify(message.error, title="model failed to load", severity="error",
                    timeout=15)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        # Stop a running generation (branch job, MI pass) and let it save the trace
        # (the branches, the run) as `stopped` first; queued branch jobs are dropped.
        explorer = self.explorer
        for stop, worker in ((explorer.stop_generation, explorer.worker),
                             (explorer.stop_all_forks, explorer.fork_worker),
                             (explorer.stop_mi, explorer.mi_worker)):
            if stop() and worker is not None:
                with contextlib.suppress(WorkerCancelled, WorkerFailed):
                    await worker.wait()
        self.exit()

    def on_unmount(self) -> None:
        self.store.close()


def create_app(*, db_path: str | Path | None = None, model_spec: str = "default",
               device: str = "auto", dtype: str = "auto",
               params: GenerationParams | None = None, browse_only: bool = False,
               lm: LoadedModel | None = None, open_trace: int | None = None,
               mi_estimators: Sequence[str] | None = None) -> App[None]:
    """The forkview explorer (or, with browse_only, the trace browser; no model).

    `mi_estimators`: the MI estimators computed after each generation and on `m`
    (default hsic and answer-gain; empty: none after generation)."""
    # Browsing never writes: the committed sample database stays byte-identical.
    store = Store.open(db_path, readonly=browse_only)
    return ForkviewApp(store, model_spec=model_spec, device=device, dtype=dtype,
                       params=params, browse_only=browse_only, lm=lm, open_trace=open_trace,
                       mi_estimators=mi_estimators)
