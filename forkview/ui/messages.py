"""Messages the background workers post to the UI.

Workers run in threads and never touch widgets: they post these (post_message is
thread-safe) and the screen's handlers own all state. Each generation carries a
`gen_id` so late messages from a superseded generation are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from textual.message import Message

if TYPE_CHECKING:
    from models.types import TokenStep


@dataclass
class ModelStatus(Message):
    """Progress while a model loads ("dequantising…", "loading…")."""

    text: str


@dataclass
class ModelLoaded(Message):
    lm: Any  # models.loading.LoadedModel (typed loosely: the UI never imports models)


@dataclass
class ModelFailed(Message):
    error: str


@dataclass
class GenerationStarted(Message):
    gen_id: int
    trace_id: int


@dataclass
class TokensArrived(Message):
    """A batch of new tokens (batched ~every 50 ms so the UI is not flooded)."""

    gen_id: int
    steps: list[TokenStep]
    elapsed: float  # seconds since the first forward pass, for tokens/s


@dataclass
class GenerationFinished(Message):
    gen_id: int
    trace_id: int | None  # None when it failed before a trace was created
    error: str | None = None


@dataclass
class MIProgress(Message):
    """An MI worker's progress: estimator `name` has `done` of `total` positions.
    `step` counts estimators (1-based) out of `steps`."""

    mi_id: int
    trace_id: int
    name: str
    done: int
    total: int
    step: int
    steps: int


@dataclass
class MINotice(Message):
    """Something the user should know (an estimator skipped, a run failed)."""

    mi_id: int
    text: str
    severity: str = "information"


@dataclass
class MIFinished(Message):
    mi_id: int
    trace_id: int
    status: str  # complete | stopped | failed


@dataclass
class ForkStarted(Message):
    """A branch job's rows exist as traces (row -> trace id, in plan order)."""

    job_id: int
    trace_ids: list[int]


@dataclass
class ForkTokens(Message):
    """New tokens of a branch job, per row (batched like TokensArrived)."""

    job_id: int
    rows: dict[int, list[TokenStep]]
    elapsed: float


@dataclass
class ForkFinished(Message):
    """A branch job ended: its branches as (trace id, status, answer, correct, tokens),
    or an error before or while growing (branches already made keep their tokens)."""

    job_id: int
    results: list[tuple[int, str, str | None, bool | None, int]]
    error: str | None = None
