"""Branch jobs of the explorer: what the fork panel asks for, and the thread-side code
that grows it with `forkview.forks` (the same code as `forkview fork`).

A job is one request from the fork panel: a chosen alternative or typed text (one
branch, streamed into the trace view) or "sample N" (N branches in one batch). Jobs
wait in the explorer's queue and run one at a time in a worker thread, because the
model is never shared between threads. Each worker keeps one `PrefixCache` (the KV
cache of the last forked trace), so every branch of a trace reuses its prefix.

No Textual here and no torch at import time.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forkview import forks
from forkview.forks import DEFAULT_SAMPLES
from models.types import TokenStep
from store import Store

if TYPE_CHECKING:
    from textual.message import Message

BATCH_SECONDS = 0.05  # how often a growing branch repaints
MAX_SAMPLES = 256


@dataclass(frozen=True)
class ForkRequest:
    """What the fork panel returns: `choice` (an alternative's token id), `text` (typed
    text, encoded to forced tokens by the worker) or `sample` (N continuations,
    keeping the token or resampling it)."""

    kind: str  # choice | text | sample | counterfactual (n kept + n redrawn, one batch)
    token_id: int | None = None
    text: str = ""  # the typed text; for a choice, the alternative's text (labels)
    n: int = DEFAULT_SAMPLES
    keep_token: bool = False

    def label(self) -> str:
        if self.kind == "choice":
            return f"alternative {self.text!r}"
        if self.kind == "text":
            return f"text {self.text!r}"
        if self.kind == "counterfactual":
            return f"counterfactual, {self.n} kept vs {self.n} redrawn"
        return f"{self.n} samples, {'keep token' if self.keep_token else 'resample'}"


@dataclass
class ForkJob:
    job_id: int
    trace_id: int  # the trace branched from
    position: int
    request: ForkRequest
    max_new_tokens: int
    prefix: list[TokenStep]  # the source's tokens before the fork (for the live view)
    label: str
    source_answer: str | None = None
    source_correct: bool | None = None
    # filled in as it runs (UI thread)
    trace_ids: list[int] = field(default_factory=list)
    tokens: int = 0

    @property
    def rows(self) -> int:
        kind = self.request.kind
        return self.request.n * (2 if kind == "counterfactual" else 1) \
            if kind in ("sample", "counterfactual") else 1


Result = tuple[int, str, str | None, bool | None, int]  # id, status, answer, correct, tokens


def plan(lm: Any, source: forks.ForkSource, job: ForkJob) -> list[forks.PlannedBranch]:
    req = job.request
    if req.kind in ("sample", "counterfactual"):
        if not 1 <= req.n <= MAX_SAMPLES:
            raise forks.ForkError(f"N must be between 1 and {MAX_SAMPLES}, not {req.n}")
        params = forks.branch_params(source, max_new_tokens=job.max_new_tokens, sampling=True)
        if req.kind == "counterfactual":
            # rows 0..n-1 keep the token, n..2n-1 draw it anew: one batch, one prefix
            return (forks.plan_samples(source, job.position, req.n, True, params)
                    + forks.plan_samples(source, job.position, req.n, False, params))
        return forks.plan_samples(source, job.position, req.n, req.keep_token, params)
    params = forks.branch_params(source, max_new_tokens=job.max_new_tokens)
    if req.kind == "choice":
        if req.token_id is None:
            raise forks.ForkError("no alternative chosen")
        forced = [int(req.token_id)]
    else:
        forced = forks.encode_text(lm, req.text)  # ForkError when empty
    return [forks.PlannedBranch(forced, params, "fork", job.label)]


class PrefixSlot:
    """The prefix cache of the last trace branched from (worker threads only, one at a
    time). A cache that does not match is rebuilt; grow_branches checks it too."""

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.cache: Any = None
        self.builds = 0  # how many times a prefix was encoded (tests read it)

    def get(self, lm: Any, source: forks.ForkSource) -> Any:
        from models.engine import prefix_cache

        key = (source.info.id, id(lm))
        if (self.key != key or self.cache is None
                or self.cache.token_ids != source.token_ids
                or self.cache.prompt_ids != list(source.prompt_ids)):
            self.cache = None  # free the old one first
            self.cache = prefix_cache(lm, source.prompt_ids, source.token_ids)
            self.key = key
            self.builds += 1
        return self.cache

    def clear(self) -> None:
        self.key, self.cache = None, None


def run_job(lm: Any, store: Store, job: ForkJob, cancel: threading.Event, slot: PrefixSlot,
            post: Callable[[Message], None]) -> list[Result]:
    """Grow a job's branches (runs in a worker thread; only posts messages). Raises
    ForkError / StoreError / ModelError with a one-line message."""
    from forkview.ui.messages import ForkStarted, ForkTokens

    source = forks.load_source(store, job.trace_id)
    forks.check_position(source, job.position)
    forks.check_tokenizer(store, source, lm)
    branches = plan(lm, source, job)
    if cancel.is_set():
        return []  # stopped while queued or planning: nothing made
    cache = slot.get(lm, source)
    if cancel.is_set():
        return []
    ids: list[int] = []
    pending: dict[int, list[TokenStep]] = {}
    t0 = time.perf_counter()
    last = t0

    def flush() -> None:
        nonlocal pending, last
        if pending:
            post(ForkTokens(job.job_id, pending, time.perf_counter() - t0))
            pending = {}
        last = time.perf_counter()

    def on_start(_row: int, trace_id: int) -> None:
        nonlocal t0
        ids.append(trace_id)
        if len(ids) == len(branches):
            t0 = time.perf_counter()
            post(ForkStarted(job.job_id, list(ids)))

    def on_step(row: int, step: TokenStep) -> None:
        step.hidden = None
        pending.setdefault(row, []).append(step)
        if time.perf_counter() - last >= BATCH_SECONDS:
            flush()

    try:
        results = forks.grow(lm, store, source, job.position, branches, prefix_cache=cache,
                             cancel=cancel, on_start=on_start, on_step=on_step)
    finally:
        flush()
    return [(r.trace_id, r.status, r.answer, r.correct, len(r.output.steps)) for r in results]


# ---------------------------------------------------------------- answers of a sample


def answer_name(answer: str | None) -> str:
    return "none" if answer is None or answer == "" else repr(answer)


def mark(correct: bool | None) -> str:
    return {True: " ✓", False: " ✗", None: ""}[correct]


def distribution(results: Sequence[Result]) -> list[tuple[str, int, bool | None]]:
    """(answer, count, correct) most frequent first; no answer counts as 'none'."""
    counts = Counter(answer_name(r[2]) for r in results)
    correct = {answer_name(r[2]): r[3] for r in results}
    return [(a, n, correct[a]) for a, n in counts.most_common()]


def total_variation(a: Sequence[Result], b: Sequence[Result]) -> float:
    """Half the L1 distance between two answer distributions ("no answer" an outcome)."""
    ca = Counter(answer_name(r[2]) for r in a)
    cb = Counter(answer_name(r[2]) for r in b)
    na, nb = max(1, len(a)), max(1, len(b))
    return 0.5 * sum(abs(ca[k] / na - cb[k] / nb) for k in set(ca) | set(cb))


def counterfactual_text(job: ForkJob, results: Sequence[Result]) -> str:
    """Keep vs redraw at one position: the two answer distributions side by side, their
    total-variation distance and how often a redraw changes the answer (the same
    quantities as the rollout estimator's counterfactual, from this batch)."""
    n = job.request.n
    keep, redraw = results[:n], results[n:]
    ck = Counter(answer_name(r[2]) for r in keep)
    cr = Counter(answer_name(r[2]) for r in redraw)
    p_change = 1 - sum(ck[k] * cr[k] for k in ck) / max(1, len(keep) * len(redraw))
    # two continuations after the kept token already disagree this often (distinct
    # pairs): the baseline the change should be read against
    pairs = len(keep) * (len(keep) - 1)
    baseline = 1 - sum(c * (c - 1) for c in ck.values()) / pairs if pairs else float("nan")

    def show(rows: Sequence[Result]) -> str:
        return " · ".join(f"{a}×{c}{mark(ok)}" for a, c, ok in distribution(rows)) or "—"

    return (f"counterfactual at position {job.position} of #{job.trace_id}: "
            f"{len(keep)} kept vs {len(redraw)} redrawn\n"
            f"kept:    {show(keep)}\nredrawn: {show(redraw)}\n"
            f"TV {total_variation(keep, redraw):.2f} · answer changes "
            f"{p_change:.0%} of kept×redrawn pairs, {baseline:.0%} of kept×kept")


def distribution_text(job: ForkJob, results: Sequence[Result]) -> str:
    """The N answers of a sample job next to the original's, one notification."""
    parts = [f"{a}×{n}{mark(c)}" for a, n, c in distribution(results)]
    stopped = sum(1 for r in results if r[1] != "complete")
    head = (f"{len(results)} samples of #{job.trace_id} at position {job.position} "
            f"({'token kept' if job.request.keep_token else 'token resampled'})")
    tail = f"original: {answer_name(job.source_answer)}{mark(job.source_correct)}"
    note = f" ({stopped} stopped)" if stopped else ""
    return f"{head}{note}\nanswers: {' · '.join(parts) or '—'}\n{tail}"
