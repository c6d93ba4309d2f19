"""The Textual explorer: `create_app` is what `forkview` and `forkview browse` run.

Importing this module never imports torch or transformers: the model is loaded in a
thread after the app has started (so the prompt box is usable at once), and in
browse-only mode it is never loaded at all.

Hangups. The app quits as on `q` when its terminal goes away (the window or the SSH
connection closing) or a signal asks (`ForkviewApp.hang_up`, wired to SIGHUP, SIGTERM
and SIGINT by `forkview.cli`): a running generation, branch or MI run is saved as
`stopped` first. Textual's own Linux driver does not survive a dead terminal: its
input thread (no daemon) spins forever on the end-of-file a hung-up tty reads as; its
writer thread dies on the first EIO, after which the app blocks on its full queue; and
the SIGCONT that follows a hangup restarts both threads after the app has stopped
them, so the process never exits (issue 13: python and the `uv run` waiting for it
left at full CPU). `_HangupDriver` turns a dead terminal into a hangup instead. If the
app has not ended `HANGUP_GRACE` seconds after a hangup, a watchdog stops the model
work, waits for its writes (traces and MI runs saved as `stopped`), then `os._exit`s.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import sys
import threading
import time
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
from models.engine import backend_of
from models.errors import ModelError
from models.types import GenerationParams
from store import Store

if TYPE_CHECKING:
    from textual.driver import Driver

    from models.loading import LoadedModel

HANGUP_GRACE = 2.0  # seconds the app has to quit by itself after a hangup
WRITES_GRACE = 5.0  # then at most this long for running work to save itself as stopped
HANGUP_CODE = 129  # exit status after a hangup (128 + SIGHUP), as a shell reports it


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
                 dtype: str = "auto", backend: str = "hf",
                 params: GenerationParams | None = None, browse_only: bool = False,
                 lm: LoadedModel | None = None,
                 open_trace: int | None = None,
                 mi_estimators: Sequence[str] | None = None, preload: Any = None) -> None:
        super().__init__()
        self.preload = preload  # forkview.preload.Preload: the model, already loading
        self.store = store
        self.model_spec, self.device, self.dtype = model_spec, device, dtype
        self.backend = backend
        self.params = params or GenerationParams()
        self.browse_only = browse_only
        self.lm = lm
        self.explorer = ExplorerScreen(
            store, self.params, browse_only=browse_only, open_trace=open_trace,
            mi_estimators=None if mi_estimators is None else tuple(mi_estimators))
        self._hangup = threading.Event()
        self._hangup_claim = threading.Lock()
        self._hangup_code = HANGUP_CODE
        self._watchdog: threading.Thread | None = None

    def get_driver_class(self) -> type[Driver]:
        if _HangupDriver is None or os.environ.get("TEXTUAL_DRIVER"):
            return super().get_driver_class()
        return _HangupDriver

    def get_default_screen(self) -> Screen[Any]:
        return self.explorer

    def on_mount(self) -> None:
        if self._hangup.is_set():  # hung up while starting, before the loop could be told
            self._quit_after_hangup()
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
        """Runs in a thread: the import of torch (hf engine) and the load happen here
        (or, preloaded, the wait for it). Never touches widgets; post_message is
        thread-safe."""
        try:
            from models.engine import load

            if self.preload is not None:
                lm = self.preload.result()
            else:
                lm = load(self.model_spec, self.device, self.dtype, self.backend,
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
        engine = "" if backend_of(message.lm) == "hf" else f" ({backend_of(message.lm)})"
        self.notify(f"{message.lm.name} ready on {message.lm.device}{engine} "
                    f"({message.lm.load_seconds:.1f}s)", timeout=3)

    @on(ModelFailed)
    def _model_failed(self, message: ModelFailed) -> None:
        self.explorer.model_failed(message.error)
        self.notify(message.error, title="model failed to load", severity="error",
                    timeout=15)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        await self._stop_work_and_exit()

    async def _stop_work_and_exit(self, return_code: int = 0) -> None:
        # Stop a running generation (branch job, MI pass) and let it save the trace
        # (the branches, the run) as `stopped` first; queued branch jobs are dropped.
        explorer = self.explorer
        for stop, worker in ((explorer.stop_generation, explorer.worker),
                             (explorer.stop_all_forks, explorer.fork_worker),
                             (explorer.stop_mi, explorer.mi_worker)):
            if stop() and worker is not None:
                with contextlib.suppress(WorkerCancelled, WorkerFailed):
                    await worker.wait()
        self.exit(return_code=return_code)

    # ---------------------------------------------------------------- hangups
    @property
    def hung_up(self) -> bool:
        return self._hangup.is_set()

    def hang_up(self, return_code: int = HANGUP_CODE) -> None:
        """Quit because the terminal went away or a signal asked: as on `q`, running
        work is saved as `stopped` first, and the app's return code is `return_code`.

        Safe to call from a signal handler and from any thread, any number of times
        (the first call counts). With `arm_watchdog` called before `run`, the process
        ends within about HANGUP_GRACE + WRITES_GRACE seconds whatever the app does."""
        if not self._hangup_claim.acquire(blocking=False):
            return
        self._hangup_code = return_code
        self._hangup.set()
        loop = self._loop  # set while the app runs (None before: on_mount catches up)
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # closed: the app has already ended
                loop.call_soon_threadsafe(self._quit_after_hangup)

    def _quit_after_hangup(self) -> None:
        # on the app's loop: queue the quit as a callback, run in the app's context
        self.call_later(self._stop_work_and_exit, self._hangup_code)

    def arm_watchdog(self) -> None:
        """Start the thread that ends the process if the app has not ended by itself
        HANGUP_GRACE seconds after `hang_up` (a daemon: it never delays an exit)."""
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="forkview-hangup",
                                              daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        self._hangup.wait()
        time.sleep(HANGUP_GRACE)
        # Still running: the app's loop (or the interpreter's exit) is stuck. The model
        # work runs in threads of its own: stop it and let it save its trace, branches
        # or MI run as `stopped` (each sets its done event after its last write).
        explorer = self.explorer
        for cancel in (explorer.cancel, explorer.fork_cancel, explorer.mi_cancel):
            cancel.set()
        deadline = time.monotonic() + WRITES_GRACE
        for done in (explorer.gen_done, explorer.fork_done, explorer.mi_done):
            done.wait(max(0.0, deadline - time.monotonic()))
        os._exit(self._hangup_code)

    def on_unmount(self) -> None:
        self.store.close()


class _TerminalOutput:
    """The driver's output file. A write to a terminal that has gone away (EIO, EPIPE)
    is dropped and reported, instead of killing Textual's writer thread."""

    def __init__(self, file: Any, on_lost: Any) -> None:
        self._file = file
        self._on_lost = on_lost

    def write(self, text: str) -> int:
        try:
            return int(self._file.write(text))
        except OSError:
            self._on_lost()
            return len(text)

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError:
            self._on_lost()

    def fileno(self) -> int:
        return int(self._file.fileno())

    def isatty(self) -> bool:
        return bool(self._file.isatty())


_HangupDriver: Any = None

if sys.platform != "win32":
    from codecs import getincrementaldecoder

    from textual._loop import loop_last
    from textual._parser import ParseError
    from textual._xterm_parser import XTermParser
    from textual.drivers.linux_driver import LinuxDriver

    class _HangupDriver(LinuxDriver):  # type: ignore[no-redef]
        """Textual's Linux driver, but a terminal that goes away ends the app
        (`ForkviewApp.hang_up`): reading it gives end-of-file or an error (the tty hung
        up, stdin closed), or writing it fails."""

        def __init__(self, app: App[Any], **kw: Any) -> None:
            self._suspended = False  # before super() installs the SIGCONT handler
            super().__init__(app, **kw)
            self._file = _TerminalOutput(self._file, self._terminal_lost)

        def _terminal_lost(self) -> None:
            hang_up = getattr(self._app, "hang_up", None)
            if hang_up is not None:
                hang_up()

        # Textual restarts application mode on every SIGCONT, but a hangup brings one
        # (the kernel and shells send SIGHUP, then SIGCONT): arriving as the app stops,
        # it started a new input thread that then kept the process alive. Resume only
        # from this driver's own suspension (ctrl+z), and never after a hangup.
        def _sigtstp_application(self, *args: Any) -> None:
            self._suspended = self._auto_restart
            super()._sigtstp_application(*args)

        def _sigcont_application(self, *args: Any) -> None:
            suspended, self._suspended = self._suspended, False
            if suspended and not getattr(self._app, "hung_up", False):
                super()._sigcont_application(*args)

        def run_input_thread(self) -> None:
            # LinuxDriver.run_input_thread (Textual 8.2), except that the end of the
            # input stops the thread (after a hangup) instead of looping on it: select
            # reports a hung-up tty readable at once, forever, and the read gives b"".
            selector = selectors.SelectSelector()
            selector.register(self.fileno, selectors.EVENT_READ)
            fileno = self.fileno
            parser = XTermParser(self._debug)
            decode = getincrementaldecoder("utf-8")().decode

            def process(events: list[tuple[selectors.SelectorKey, int]],
                        final: bool = False) -> bool:
                """Feed what the terminal sent; False once its input has ended."""
                for last, (_key, mask) in loop_last(events):
                    if mask & selectors.EVENT_READ:
                        try:
                            data = os.read(fileno, 1024 * 4)
                        except BlockingIOError:
                            continue
                        except OSError:  # EIO: the terminal is gone
                            data = b""
                        if not data:
                            return False
                        for event in parser.feed(decode(data, final=final and last)):
                            self.process_message(event)
                for event in parser.tick():
                    self.process_message(event)
                return True

            try:
                while not self.exit_event.is_set():
                    if not process(selector.select(0.1)):
                        self._terminal_lost()
                        self.exit_event.wait()  # set by disable_input as the app stops
                        return
                selector.unregister(fileno)
                process(selector.select(0.1), final=True)
            finally:
                selector.close()
                try:
                    for _event in parser.feed(""):
                        pass
                except (EOFError, ParseError):
                    pass


def create_app(*, db_path: str | Path | None = None, model_spec: str = "default",
               device: str = "auto", dtype: str = "auto", backend: str = "hf",
               params: GenerationParams | None = None, browse_only: bool = False,
               lm: LoadedModel | None = None, open_trace: int | None = None,
               mi_estimators: Sequence[str] | None = None,
               preload: Any = None) -> App[None]:
    """The forkview explorer (or, with browse_only, the trace browser; no model).

    `mi_estimators`: the MI estimators computed after each generation and on `m`
    (default hsic and answer-gain; empty: none after generation)."""
    # Browsing never writes: the committed sample database stays byte-identical.
    store = Store.open(db_path, readonly=browse_only)
    return ForkviewApp(store, model_spec=model_spec, device=device, dtype=dtype,
                       backend=backend, params=params, browse_only=browse_only, lm=lm,
                       open_trace=open_trace,
                       mi_estimators=mi_estimators, preload=preload)
