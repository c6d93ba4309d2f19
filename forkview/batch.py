"""Batch annotation: every prompt of a set, N samples each, generated in batches.

`forkview annotate --prompts FILE|builtin:NAME --samples N [--mi ...]` lands here. The
N samples of one prompt are grown as ONE lock-step batch (`models.branch.grow_branches`
from position 0 with no forced tokens), each row with its own seed, so a sample made
in a batch of 8 replays alone from its stored seed (`forkview replay`).

Seeds are derived, not drawn: sample i of prompt p gets `sample_seed(base, p, i)`
(base = --seed, default 0). Re-running the same command therefore asks for exactly
the same (prompt, params, seed) rows, which is what makes a batch resumable: a row
with a complete trace of the same model, prompt text, set/id, parameters and seed is
skipped; a stopped or failed one is made again. The old trace stays (nothing is
deleted), but a stopped copy is marked `superseded` as its remake starts (meta points
from it to the remake, `Store.supersede`), so there is always exactly one counted trace
per (prompt, model, parameters, seed): reports, listings and exports leave superseded
traces out. MI estimators then run on every complete trace of the batch that has no
complete run with the same parameters (`forkview.mi.run_many`: an interrupted run
resumes; a trace an estimator cannot run on, e.g. without a reference answer, is
skipped with its reason and the batch goes on).

No Textual; torch only inside the functions that generate. Tokens reach the database
as they are made (store.writer), so Ctrl-C keeps them, marked stopped.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from forkview.errors import UsageError
from forkview.prompt_sets import PromptItem
from models.errors import ModelError
from models.types import GenerationParams, TokenStep
from store import Store
from store.db import write_section

if TYPE_CHECKING:
    from models.estimators import Estimator
    from models.loading import LoadedModel


@dataclass(frozen=True)
class BatchJob:
    """One prompt × sample: the trace a batch wants to exist."""

    item: PromptItem
    index: int  # sample index, 0..N-1
    params: GenerationParams  # seed included (None only when greedy)

    def key(self) -> tuple[Any, ...]:
        return (self.item.prompt, self.item.set, self.item.id, self.params)


@dataclass
class JobResult:
    prompt_id: str  # the item's id in its set
    set: str
    sample: int
    seed: int | None
    trace_id: int | None = None
    status: str = "pending"  # complete | stopped | failed | pending
    skipped: bool = False  # an earlier run had already made it
    n_tokens: int = 0


@dataclass
class BatchSummary:
    jobs: list[JobResult] = field(default_factory=list)
    generated: int = 0  # traces started now (stopped ones included)
    skipped: int = 0
    tokens: int = 0
    seconds: float = 0.0  # generating (MI not included)
    mi_runs: int = 0  # estimator runs computed (or finished) now
    mi_skipped: int = 0  # already complete
    mi_not_run: list[str] = field(default_factory=list)  # skipped or failed, one line each
    superseded: int = 0  # stopped copies marked superseded by this run's traces
    interrupted: bool = False

    @property
    def stopped(self) -> int:
        return sum(j.status == "stopped" and not j.skipped for j in self.jobs)

    @property
    def trace_ids(self) -> list[int]:
        return [j.trace_id for j in self.jobs if j.trace_id is not None]


class BatchProgress:
    """What a batch reports while it runs; the default reports nothing."""

    def start_generation(self, prompts: int, skipped_prompts: int) -> None: ...
    def tokens(self, n: int) -> None: ...
    def prompt_done(self) -> None: ...
    def start_mi(self, total: int) -> None: ...
    def mi_done(self, label: str) -> None: ...
    def close(self) -> None: ...


class RichBatchProgress(BatchProgress):
    """A progress bar on stderr: prompts done/total, tokens/s, ETA; then MI runs."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        )
        self.bar.start()
        self.task: Any = None
        self.t0 = time.perf_counter()
        self.n_tokens = 0

    def start_generation(self, prompts: int, skipped_prompts: int) -> None:
        self.t0 = time.perf_counter()
        self.task = self.bar.add_task("prompts", total=prompts, completed=skipped_prompts,
                                      rate="")

    def tokens(self, n: int) -> None:
        self.n_tokens += n
        # A tokens/s figure every 16 tokens is plenty (and keeps the bar cheap).
        if self.task is not None and self.n_tokens % 16 < n:
            dt = time.perf_counter() - self.t0
            self.bar.update(self.task, rate=f"{self.n_tokens / dt:6.1f} tok/s" if dt else "")

    def prompt_done(self) -> None:
        if self.task is not None:
            self.bar.advance(self.task)

    def start_mi(self, total: int) -> None:
        self.task = self.bar.add_task("MI runs", total=total, rate="")

    def mi_done(self, label: str) -> None:
        self.bar.update(self.task, advance=1, rate=label)

    def close(self) -> None:
        self.bar.stop()


# ---------------------------------------------------------------------- planning


def sample_seed(base: int, prompt_id: str, index: int) -> int:
    """The seed of sample `index` of prompt `prompt_id`: a pure function of its inputs
    (31 bits, as `resolve_seed` draws), so a re-run asks for the same rows."""
    digest = hashlib.sha256(f"forkview-batch:{base}:{prompt_id}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def with_set(items: Sequence[PromptItem], set_name: str | None) -> list[PromptItem]:
    """The items stored under `set_name` (prompts.source_set) instead of their own set."""
    if not set_name:
        return list(items)
    return [replace(it, set=set_name) for it in items]


def plan_jobs(items: Sequence[PromptItem], samples: int,
              params: GenerationParams) -> list[list[BatchJob]]:
    """Every prompt × sample, grouped by prompt. Greedy rows carry no seed (there is
    nothing to draw); sampled rows carry their derived seed."""
    if samples < 1:
        raise UsageError(f"--samples must be at least 1, not {samples}")
    if samples > 1 and params.greedy:
        raise UsageError(f"{samples} greedy samples of a prompt would be identical copies; "
                         "give --temperature T > 0 (or leave it out for T = 1)")
    base = int(params.seed or 0)
    groups = []
    for item in items:
        group = []
        for i in range(samples):
            seed = None if params.greedy else sample_seed(base, item.id, i)
            group.append(BatchJob(item, i, replace(params, seed=seed)))
        groups.append(group)
    return groups


def completed_traces(store: Store, model_id: int) -> dict[tuple[Any, ...], int]:
    """Key (prompt text, set, id, params) -> id of a complete root trace of this model
    row made from a prompt with that text and source (the newest if several)."""
    return _existing_traces(store, model_id)[0]


def _existing_traces(store: Store, model_id: int) -> tuple[dict[tuple[Any, ...], int],
                                                           dict[tuple[Any, ...], list[int]]]:
    """(`completed_traces`, key -> ids of the stopped root traces with that key, oldest
    first: the copies a remake supersedes)."""
    done: dict[tuple[Any, ...], int] = {}
    stopped: dict[tuple[Any, ...], list[int]] = {}
    for info in store.root_traces(model_id=model_id):
        if info.origin != "generate":
            continue
        key = (info.prompt, info.source_set, info.source_id, info.params)
        if info.status == "complete":
            done[key] = info.id
        elif info.status == "stopped":
            stopped.setdefault(key, []).append(info.id)
    return done, stopped


# ---------------------------------------------------------------------- running


def run_batch(
    lm: LoadedModel,
    store: Store,
    items: Sequence[PromptItem],
    params: GenerationParams,
    *,
    samples: int = 1,
    estimators: Sequence[Estimator] = (),
    progress: BatchProgress | None = None,
    cancel: threading.Event | None = None,
) -> BatchSummary:
    """Generate what is missing of `items` × `samples`, then the MI runs that are
    missing. Ctrl-C (KeyboardInterrupt) or `cancel` ends the batch early: every token
    made so far is saved (those traces are marked stopped) and the summary comes back
    with `interrupted` set; other errors propagate after the same saving."""
    from forkview.pipeline import model_row_id

    progress = progress or BatchProgress()
    groups = plan_jobs(items, samples, params)
    model_id = model_row_id(store, lm)
    # every prompt is checked before any is generated
    prompt_ids = _encode_all(lm, items, params)
    done, stopped = _existing_traces(store, model_id)
    summary = BatchSummary()
    results: dict[tuple[str, int], JobResult] = {}
    todo: list[tuple[list[int], list[BatchJob]]] = []
    for ids, group in zip(prompt_ids, groups, strict=True):
        missing = []
        for job in group:
            r = JobResult(prompt_id=job.item.id, set=job.item.set, sample=job.index,
                          seed=job.params.seed)
            results[(job.item.id, job.index)] = r
            summary.jobs.append(r)
            tid = done.get(job.key())
            if tid is not None:
                r.trace_id, r.status, r.skipped = tid, "complete", True
                summary.skipped += 1
                # A stopped copy beside a complete twin (left by an older forkview):
                # the complete one is the counted one.
                summary.superseded += len(store.supersede(stopped.get(job.key(), ()), by=tid))
            else:
                missing.append(job)
        if missing:
            todo.append((ids, missing))
    t0 = time.perf_counter()
    try:
        progress.start_generation(len(groups), len(groups) - len(todo))
        for ids, jobs in todo:
            summary.generated += len(jobs)
            cut = _grow_prompt(lm, store, model_id, ids, jobs, results, summary,
                               progress, cancel, stopped)
            progress.prompt_done()
            if cut or (cancel is not None and cancel.is_set()):
                summary.interrupted = True
                break
        summary.seconds = time.perf_counter() - t0
        if not summary.interrupted and estimators:
            _run_mi(lm, store, model_id, summary, estimators, progress, cancel)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.seconds = summary.seconds or time.perf_counter() - t0
        progress.close()
    return summary


def _encode_all(lm: LoadedModel, items: Sequence[PromptItem],
                params: GenerationParams | None = None) -> list[list[int]]:
    from models.prompting import encode_prompt

    params = params or GenerationParams()
    out = []
    for item in items:
        try:
            out.append(encode_prompt(lm, item.prompt, raw=params.raw, system=params.system,
                                     enable_thinking=params.enable_thinking))
        except ModelError as e:
            raise ModelError(f"prompt {item.id}: {e}") from e
    return out


def _grow_prompt(lm: LoadedModel, store: Store, model_id: int, prompt_ids: list[int],
                 jobs: Sequence[BatchJob], results: dict[tuple[str, int], JobResult],
                 summary: BatchSummary, progress: BatchProgress,
                 cancel: threading.Event | None,
                 stopped: dict[tuple[Any, ...], list[int]] | None = None) -> bool:
    """One prompt's missing samples as one batch, saved as they grow; the stopped copies
    of each (`stopped`, by job key) are marked superseded by its new trace. True when
    the batch was cancelled."""
    from forkview.pipeline import record_answer, record_think_span
    from models.branch_types import BranchRequest
    from models.engine import grow_branches

    item = jobs[0].item
    prompt_row = store.add_prompt(item.prompt, reference_answer=item.answer,
                                  reference_solution=item.solution or None,
                                  source_set=item.set, source_id=item.id)
    rows = [results[(job.item.id, job.index)] for job in jobs]
    tids: list[int] = []
    # A row that ends (EOS or its length limit) is closed as complete at once, so an
    # interrupt while the other rows still grow does not mark it stopped.
    eos = lm.eos_token_ids
    room = (lm.context_length - len(prompt_ids)) if lm.context_length else None
    ends = []  # (tokens, stop reason) at which each row ends unless EOS comes first
    for j in jobs:
        if room is not None and room < j.params.max_new_tokens:
            ends.append((room, "context"))
        else:
            ends.append((j.params.max_new_tokens, "length"))
    counts = [0] * len(jobs)
    try:
        with ExitStack() as stack:
            writers = []
            # Each new trace, its writer (which closes it whatever happens) and the
            # superseding of its stopped copies are one step: an interrupt waits for the
            # end of it, so no trace is left running and no stopped copy is counted
            # beside its remake.
            with write_section():
                for job, r in zip(jobs, rows, strict=True):
                    tid = store.start_trace(model_id=model_id, prompt_id=prompt_row,
                                            prompt_token_ids=prompt_ids, params=job.params,
                                            origin="generate")
                    tids.append(tid)
                    writers.append(stack.enter_context(store.writer(tid)))
                    r.trace_id, r.status = tid, "running"
                    summary.superseded += len(store.supersede(
                        (stopped or {}).get(job.key(), ()), by=tid))

            def on_step(row: int, step: TokenStep) -> None:
                writers[row].add(step)
                counts[row] += 1
                if step.token_id in eos or counts[row] >= ends[row][0]:
                    writers[row].finish("complete",
                                        "eos" if step.token_id in eos else ends[row][1])
                summary.tokens += 1
                progress.tokens(1)

            outputs = grow_branches(lm, prompt_ids, [], 0,
                                    [BranchRequest((), job.params) for job in jobs],
                                    cancel=cancel, on_step=on_step)
            for w, out, r in zip(writers, outputs, rows, strict=True):
                r.status = "stopped" if out.stop_reason == "interrupted" else "complete"
                w.finish(r.status, out.stop_reason or None)
    finally:
        # Whatever happened, each row's trace is closed (the writers did that) and
        # gets its answer from the tokens it has. A remake that failed gives its stopped
        # copies back their place.
        for r, tid in zip(rows, tids, strict=False):  # tids: those started
            info = store.trace(tid)
            r.status, r.n_tokens = info.status, info.n_tokens
            if info.status == "failed":
                summary.superseded -= len(store.unsupersede(tid))
            record_answer(store, tid, info.text, item.answer, stop_reason=info.stop_reason)
            record_think_span(store, tid, lm.tokenizer, prompt_ids)
    return any(r.status == "stopped" for r in rows)


def _run_mi(lm: LoadedModel, store: Store, model_id: int, summary: BatchSummary,
            estimators: Sequence[Estimator], progress: BatchProgress,
            cancel: threading.Event | None) -> None:
    """The estimators on the batch's complete traces (forkview.mi.run_many): a trace one
    cannot run on (no reference, say) is skipped with its reason, the rest go on."""
    from forkview.mi import jobs_for, run_many

    tids = [j.trace_id for j in summary.jobs if j.status == "complete" and j.trace_id]

    def ended(o: Any) -> None:
        if o.status == "done":
            summary.mi_skipped += 1
            return
        if o.status in ("complete", "stopped"):
            summary.mi_runs += 1
        else:
            summary.mi_not_run.append(o.line)
        if o.status != "skipped":
            progress.mi_done(f"trace {o.job.trace_id} {o.job.estimator.name} {o.label}")

    runs = run_many(lm, store, jobs_for(tids, estimators), model_id=model_id,
                    own_model=True, cancel=cancel, on_start=progress.start_mi,
                    on_outcome=ended)
    if runs.interrupted:
        summary.interrupted = True
