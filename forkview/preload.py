"""Start loading a model before the explorer's own modules are imported.

On the llama.cpp engine the model loads in about half a second, while Textual, the
store (SQLAlchemy, SQLModel) and the explorer take longer than that to import; the CLI
starts the load on a thread first, so the explorer is ready as soon as it is drawn. On
the transformers engine loading imports torch, which holds the interpreter lock for
seconds and would only slow the imports down: it still loads after the app starts,
with its progress shown. No Textual here.
"""

from __future__ import annotations

import threading
from typing import Any


class Preload:
    """A model loading on a daemon thread; `result()` waits and returns it, or raises
    what loading raised."""

    def __init__(self, spec: str, device: str, dtype: str, backend: str):
        self._model: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(spec, device, dtype, backend),
                                        name="forkview-preload", daemon=True)
        self._thread.start()

    def _run(self, spec: str, device: str, dtype: str, backend: str) -> None:
        try:
            from models.engine import load

            self._model = load(spec, device, dtype, backend)
        except BaseException as e:  # handed to whoever waits for the model
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._model


def start(spec: str, device: str, dtype: str, backend: str) -> Preload | None:
    """A preload where it pays (the llama.cpp engine), else None."""
    return Preload(spec, device, dtype, backend) if backend == "llama.cpp" else None
