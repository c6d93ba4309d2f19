"""Saved trace -> MI estimator -> store: the one path `forkview mi`, `annotate --mi`,
batches, `rescore --mi`, `import --mi` and the explorer share (`run_many`: which traces,
which model, what cannot run and why, what is done already; `run_estimator`: one run).
No Textual here.

Each (trace, estimator, full parameter set) is one run in `mi_runs`; values are stored
chunk by chunk as the estimator yields them, so an interrupted run resumes where it
stopped and finished positions are never recomputed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forkview.errors import ForkviewError, UsageError
from models.errors import ModelError, one_line
from store import Store, StoreError, TraceInfo

if TYPE_CHECKING:
    from models.estimators import Estimator, TraceData
    from models.loading import LoadedModel


@dataclass
class MIRunSummary:
    run_id: int
    trace_id: int
    estimator: str
    positions: list[int]  # all positions this run covers
    computed: int  # computed now (the rest were stored by an earlier run)
    status: str


def trace_data(store: Store, trace_id: int) -> TraceData:
    from models.estimators import TraceData

    info = store.trace(trace_id)
    # A branch is its whole response (the parent's prefix, then its own tokens), so its
    # MI values line up with positions as every other trace's do.
    tokens = store.full_tokens(trace_id)
    if not tokens:
        raise StoreError(f"trace {trace_id} has no tokens")
    if info.status == "running":
        raise StoreError(f"trace {trace_id} is still running")
    return TraceData(
        prompt_ids=info.prompt_token_ids,
        token_ids=[t.token_id for t in tokens],
        entropies=[t.entropy for t in tokens],
        text="".join(t.text for t in tokens),
        reference_answer=info.reference_answer,
        reference_solution=info.reference_solution,
    )


def resolve_positions(spec: str | Sequence[int] | None, default: str,
                      entropies: Sequence[float], seed: int = 0) -> list[int]:
    """`all`, `stratified` (every top-20% entropy position plus as many seeded random
    low-entropy controls) or explicit positions; None means the estimator's default.
    `categories` is drawn per trace from a stored MI run (forkview/analysis/categories.py,
    `forkview mi --positions categories`) and then passed here as explicit positions."""
    n = len(entropies)
    if spec is None:
        spec = default
    if isinstance(spec, str):
        if spec == "categories":
            raise UsageError("positions 'categories' are drawn per trace from a stored MI "
                             "run: use forkview mi --positions categories --peaks-from NAME")
        if spec == "all":
            return list(range(n))
        if spec == "stratified":
            from models.high_entropy import stratified_positions

            return sorted(stratified_positions(list(entropies), seed=seed))
        try:
            spec = [int(p) for p in spec.split(",") if p.strip()]
        except ValueError:
            raise UsageError(
                f"bad positions '{spec}': use all, stratified or a list like 0,5,9"
            ) from None
    bad = [p for p in spec if not 0 <= p < n]
    if bad:
        raise ForkviewError(f"position {bad[0]} is out of range (the trace has {n} tokens, "
                         f"positions 0..{n - 1})")
    return sorted(set(spec))


def _with(detail: Any, extra: dict[str, Any] | None) -> Any:
    """A position's details with `extra` merged in (a non-dict detail is kept under
    "detail")."""
    if not extra:
        return detail
    if detail is None:
        return dict(extra)
    if isinstance(detail, dict):
        return {**detail, **extra}
    return {"detail": detail, **extra}


def _store_children(store: Store, trace_id: int, children: Sequence[Any],
                    estimator: Estimator, model_id: int | None, data: TraceData) -> None:
    """Keep each continuation as a child trace (parent, fork position, forced token,
    answer, correctness), before the position's value: a value never exists without
    the continuations it came from."""
    from models.answers import answers_equivalent
    from models.types import GenerationParams

    p = estimator.params
    for child in children:
        params = GenerationParams(
            max_new_tokens=int(p.get("max_new_tokens", 0)),
            temperature=float(p.get("temperature", 1.0)), seed=child.seed,
            top_alternatives=10 if child.steps else 0,
        )
        tid = store.add_child_trace(
            trace_id, fork_position=child.fork_position,
            forced_token_ids=child.forced_token_ids, params=params, text_=child.text,
            steps=child.steps, n_tokens=len(child.token_ids), stop_reason=child.stop_reason,
            answer=child.answer, answer_method=child.answer_method, model_id=model_id,
        )
        if child.answer is not None and data.reference_answer:
            store.set_answer(tid, child.answer, child.answer_method,
                             answers_equivalent(child.answer, data.reference_answer))


def model_key(lm: LoadedModel) -> str:
    """How a run names the model it was computed with, database-independently (so it
    survives `forkview merge`): spec, content hash or hub revision, dtype, device: the
    fields that identify a `models` row."""
    ident = lm.content_hash or lm.revision
    return " ".join([f"{lm.spec}@{ident}" if ident else lm.spec, lm.dtype, lm.device])


def made_by(store: Store, info: TraceInfo, lm: LoadedModel) -> bool:
    """Whether `lm` is the model that made the trace: `lm` is the trace's `models` row
    (Store.upsert_model matches rows on store.schema.MODEL_KEY: the same weights,
    dtype, device and engine)."""
    from forkview.pipeline import model_row_id

    return info.model_id is not None and info.model_id == model_row_id(store, lm)


def run_params(store: Store, trace_id: int, estimator: Estimator,
               lm: LoadedModel) -> dict[str, Any]:
    """The parameter set a run is stored under. Runs are unique per (trace, estimator,
    params): a run computed with a model other than the one that made the trace (another
    `models` row: other weights, or the same weights in another dtype or on another
    device; `forkview rescore --mi`, `forkview mi --model`) carries that model as the
    extra parameter "model", so it is kept beside the trace's own run instead of
    resuming it. Runs with the trace's own model keep the bare estimator parameters."""
    params = dict(estimator.params)
    if not made_by(store, store.trace(trace_id), lm):
        params["model"] = model_key(lm)
    return params


CONTROLS = ("wrong-reference", "bandwidth")


def wrong_reference(store: Store, trace_id: int, estimator: Estimator,
                    data: TraceData) -> tuple[TraceData, dict[str, Any]]:
    """The trace with another prompt's reference (store.other_reference) in place of
    its own, and the run parameters that mark the run as this control. A reference-based
    estimator whose series and peaks barely change measures something other than
    information about the answer (science.md §6: hsic correlates 0.98-0.99)."""
    import dataclasses

    if "reference" not in estimator.needs:
        raise UsageError(f"the wrong-reference control needs a reference-based estimator "
                         f"(hsic, answer-gain), not {estimator.name}")
    other = store.other_reference(trace_id)
    if other is None:
        raise StoreError(f"trace {trace_id}: no other prompt with a different reference "
                         "answer to use as the wrong reference")
    pid, answer, solution = other
    swapped = dataclasses.replace(data, reference_answer=answer, reference_solution=solution)
    return swapped, {"control": "wrong-reference", "reference_prompt_id": pid}


def bandwidth_variant(estimator: Estimator) -> tuple[Estimator, dict[str, Any]]:
    """hsic with the other bandwidth rule (science.md §2: sigma = 50 fixed regardless of
    the model's hidden scale, or the median heuristic), for the report's sensitivity
    table: the same trace, estimator and reference, only sigma changed."""
    from models.estimators import get_estimator

    if estimator.name != "hsic":
        raise UsageError(f"the bandwidth control is for hsic, not {estimator.name}")
    other = 50.0 if estimator.params.get("bandwidth") == "median" else "median"
    return (get_estimator("hsic", {**estimator.params, "bandwidth": other}),
            {"control": "bandwidth"})


def _planned(store: Store, trace_id: int, estimator: Estimator, data: TraceData,
             control: str | None) -> tuple[Estimator, TraceData, dict[str, Any]]:
    """The estimator, trace data and control parameters a run will use."""
    extra: dict[str, Any] = {}
    if control == "bandwidth":
        estimator, extra = bandwidth_variant(estimator)
    elif control == "wrong-reference":
        data, extra = wrong_reference(store, trace_id, estimator, data)
    elif control is not None:
        raise UsageError(f"unknown control {control!r} (use {', '.join(CONTROLS)})")
    return estimator, data, extra


def already_done(store: Store, trace_id: int, estimator: Estimator,
                 positions: str | Sequence[int] | None = None, *, control: str | None = None,
                 extra_params: dict[str, Any] | None = None) -> bool:
    """Whether the trace's own model already has a complete run of exactly this
    estimator, parameters and control covering these positions: read only, no model,
    so `forkview mi` with nothing left to compute returns at once. (A run made with
    another model carries a "model" parameter, which only loading it can tell: such a
    request is never counted done here.)"""
    data = trace_data(store, trace_id)
    estimator, data, extra = _planned(store, trace_id, estimator, data, control)
    params = {**estimator.params, **extra, **(extra_params or {})}
    return _covered(store, trace_id, estimator, params, positions, data)


def _covered(store: Store, trace_id: int, estimator: Estimator, params: dict[str, Any],
             positions: str | Sequence[int] | None, data: TraceData) -> bool:
    """Whether a complete run of the estimator under exactly `params` already holds
    every wanted position."""
    found = store.find_mi_run(trace_id, estimator.name, params)
    if found is None or found[1] != "complete":
        return False
    wanted = resolve_positions(positions, estimator.default_positions, data.entropies)
    return set(wanted) <= found[2]


def _announce(text: str) -> None:
    """A loading notice where the caller gave no status line (one line on stderr)."""
    import sys

    print(f"forkview: {text}", file=sys.stderr, flush=True)


def run_estimator(
    lm: LoadedModel,
    store: Store,
    trace_id: int,
    estimator: Estimator,
    positions: str | Sequence[int] | None = None,
    *,
    model_id: int | None = None,
    cancel: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
    control: str | None = None,
    extra_params: dict[str, Any] | None = None,
    position_details: Mapping[int, dict[str, Any]] | None = None,
    budget: Any = None,
    status: Callable[[str], None] | None = None,
) -> MIRunSummary:
    """Compute (or finish) one estimator run on one saved trace. `control`
    "wrong-reference" scores it against another prompt's reference, "bandwidth" (hsic)
    with the other bandwidth rule: a run of its own, marked in its params ("control"),
    that reports keep apart from the real runs and compare with them.

    `extra_params` are added to the run's params (so they make a run of their own, e.g.
    "categories": how the positions were drawn); `position_details` are merged into
    each position's stored details (e.g. {"category": "e_only"}). `budget` (rollout: a
    models.rollout.TokenBudget shared by the command) ends the run before a position
    whose worst case would pass it; the run is then "stopped", and resumes when run
    again.

    The estimator runs on the engine that can do what it needs (models.engine.for_needs):
    `lm` itself, or for a llama.cpp model the same file on transformers (loaded once,
    announced through `status`); the run is still the trace's own model's, and its info
    records the engine that computed it."""
    from models.engine import backend_of, for_needs

    data = trace_data(store, trace_id)
    engine = for_needs(lm, estimator.needs, estimator.name, status=status or _announce)
    estimator, data, extra = _planned(store, trace_id, estimator, data, control)
    params = {**run_params(store, trace_id, estimator, lm), **extra, **(extra_params or {})}
    wanted = resolve_positions(positions, estimator.default_positions, data.entropies)
    run_id, done = store.open_mi_run(trace_id, estimator.name, params, model_id)
    todo = [p for p in wanted if p not in done]
    finished = len(wanted) - len(todo)
    if progress:
        progress(finished, len(wanted))
    info: dict[str, Any] = {}
    if engine is not lm:
        info["engine"] = f"{backend_of(engine)} ({engine.name}, {engine.dtype}; the same file)"
    result = "complete"
    estimator.cancel = cancel
    if budget is not None:
        if not hasattr(estimator, "budget"):
            raise UsageError(f"a token budget is for the rollout estimator, not {estimator.name}")
        estimator.budget = budget  # type: ignore[attr-defined]
    extra_details = position_details or {}
    try:
        for chunk in estimator.run(engine, data, todo):
            _store_children(store, trace_id, chunk.children, estimator, model_id, data)
            store.add_mi_values(
                run_id,
                [(pos, val, _with(chunk.details.get(pos), extra_details.get(pos)))
                 for pos, val in chunk.values.items()],
            )
            info.update(chunk.info)
            finished += len(chunk.values)
            if progress:
                progress(finished, len(wanted))
            if cancel is not None and cancel.is_set() and finished < len(wanted):
                result = "stopped"
                break
    except KeyboardInterrupt:
        store.finish_mi_run(run_id, "stopped", info=info or None)
        raise
    except Exception as e:
        store.finish_mi_run(run_id, "failed", info=info or None, error=str(e))
        raise
    if result == "complete" and finished < len(wanted):
        result = "stopped"
    store.finish_mi_run(run_id, result, info=info or None)
    return MIRunSummary(run_id, trace_id, estimator.name, wanted, len(todo), result)


# ---------------------------------------------------------------------- many runs
@dataclass
class MIJob:
    """One estimator on one trace, as a caller asks for it (`positions`, `extra_params`
    and `position_details` as for `run_estimator`)."""

    trace_id: int
    estimator: Estimator
    positions: str | Sequence[int] | None = None
    extra_params: dict[str, Any] | None = None
    position_details: Mapping[int, dict[str, Any]] | None = None


@dataclass
class MIOutcome:
    """What became of a job. `status`: complete | stopped (cancelled, or the token
    budget ran out: it resumes when run again) | failed (the run raised; stored as
    failed, `reason` says why) | done (a complete run was already stored) | skipped
    (it cannot run, `reason` says why; nothing stored). `other_model`: skipped because
    the trace was made by another model than the loaded one."""

    job: MIJob
    status: str
    reason: str = ""
    summary: MIRunSummary | None = None
    other_model: bool = False

    @property
    def label(self) -> str:
        """"complete", "already complete", "skipped (why)", "failed (why)"."""
        text = "already complete" if self.status == "done" else self.status
        return f"{text} ({self.reason})" if self.reason else text

    @property
    def line(self) -> str:
        return f"trace {self.job.trace_id} {self.job.estimator.name}: {self.label}"


@dataclass
class MIRuns:
    """Every job's outcome, in the order they were decided; `interrupted`: `cancel` was
    set, so jobs may be left without an outcome."""

    outcomes: list[MIOutcome] = field(default_factory=list)
    interrupted: bool = False

    def count(self, *statuses: str) -> int:
        return sum(o.status in statuses for o in self.outcomes)


def jobs_for(trace_ids: Sequence[int], estimators: Sequence[Estimator],
             positions: str | Sequence[int] | None = None) -> list[MIJob]:
    """Every estimator on every trace, trace by trace."""
    return [MIJob(tid, est, positions) for tid in trace_ids for est in estimators]


@dataclass
class _Plan:
    reason: str | None  # why the job cannot run; None: it can
    estimator: Estimator  # with a control's change applied
    data: TraceData | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the control's parameters
    other_model: bool = False


def _prepare(store: Store, job: MIJob, control: str | None, superseded: bool,
             own: LoadedModel | None = None) -> _Plan:
    """Everything about a job decided without running a model; with `own`, a trace
    made by another model than `own` is refused."""
    estimator = job.estimator
    try:
        info = store.trace(job.trace_id)
        if info.status == "superseded" and not superseded:
            return _Plan("superseded: a stopped copy that a resumed batch made again",
                         estimator)
        if own is not None and info.model_id is not None and not made_by(store, info, own):
            return _Plan(f"made by {info.model_name}, not by the loaded model {own.name}: "
                         "MI needs the trace's own model", estimator, other_model=True)
        data = trace_data(store, job.trace_id)  # refuses running and empty traces
        estimator, data, extra = _planned(store, job.trace_id, estimator, data, control)
        resolve_positions(job.positions, estimator.default_positions, data.entropies)
    except (ModelError, StoreError, ForkviewError) as e:
        return _Plan(one_line(e), estimator)
    check = getattr(estimator, "check", None)  # an Estimator's; a duck-typed one may lack it
    return _Plan(check(data) if check is not None else None, estimator, data, extra)


def cannot_run(store: Store, job: MIJob, *, control: str | None = None,
               superseded: bool = True) -> str | None:
    """Why `job` cannot run, read only and without a model (None: it can): the trace is
    running, empty or (unless `superseded`) superseded, a control has nothing to compare
    with, a position is out of range, or the estimator's `check` refuses the trace."""
    return _prepare(store, job, control, superseded).reason


def run_many(
    lm: LoadedModel,
    store: Store,
    jobs: Sequence[MIJob],
    *,
    model_id: int | None = None,
    own_model: bool = False,
    superseded: bool = True,
    control: str | None = None,
    budget: Any = None,
    cancel: threading.Event | None = None,
    on_start: Callable[[int], None] | None = None,
    on_run: Callable[[MIJob, int, int], None] | None = None,
    on_progress: Callable[[MIJob, int, int], None] | None = None,
    on_outcome: Callable[[MIOutcome], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> MIRuns:
    """Run estimators on saved traces: the one path of `forkview annotate --mi`,
    `forkview mi`, batches, `forkview rescore --mi`, `forkview import --mi` and the
    explorer's m. The policy, decided for every job before any is computed:

    - the trace: running or empty ones are skipped, superseded ones too unless
      `superseded` (the caller named them);
    - the model: with `own_model`, a trace made by another model than `lm` is skipped
      (`other_model`); otherwise such a run is kept beside the trace's own
      (`run_params` marks it with the model);
    - the estimator: `Estimator.check` says why it cannot run on the trace, and the
      job is skipped with that reason;
    - resume: a complete run with the same parameters holding every wanted position is
      "done"; a stopped or failed one is resumed by `run_estimator`.

    Then each remaining job runs (`run_estimator`, with `control`, `budget` and
    `cancel`); a ModelError, StoreError or ForkviewError in one is that job's "failed"
    outcome and the others go on: one trace never stops the rest. `cancel` set, or
    `budget` exhausted, ends it between jobs (`interrupted` when cancelled).
    KeyboardInterrupt propagates, with what was computed stored.

    Callers keep their own output through the callbacks: `on_outcome` as each job is
    decided (skipped and done first, then each run as it ends), `on_start` once with
    the number of runs to compute, `on_run(job, step, steps)` before each and
    `on_progress(job, finished, total)` as its positions are stored."""
    if model_id is None:
        from forkview.pipeline import model_row_id

        model_id = model_row_id(store, lm)
    result = MIRuns()

    def decide(outcome: MIOutcome) -> None:
        result.outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)

    todo = []
    for job in jobs:
        plan = _prepare(store, job, control, superseded, lm if own_model else None)
        if plan.reason is not None or plan.data is None:
            decide(MIOutcome(job, "skipped", plan.reason or "cannot run",
                             other_model=plan.other_model))
            continue
        params = {**run_params(store, job.trace_id, plan.estimator, lm), **plan.extra,
                  **(job.extra_params or {})}
        if _covered(store, job.trace_id, plan.estimator, params, job.positions, plan.data):
            decide(MIOutcome(job, "done"))
            continue
        todo.append(job)
    if on_start:
        on_start(len(todo))
    for step, job in enumerate(todo, 1):
        if cancel is not None and cancel.is_set():
            break
        if budget is not None and budget.exhausted:
            break
        if on_run:
            on_run(job, step, len(todo))
        progress = None
        if on_progress:
            def progress(finished: int, total: int, job: MIJob = job) -> None:
                on_progress(job, finished, total)
        try:
            summary = run_estimator(
                lm, store, job.trace_id, job.estimator, job.positions, model_id=model_id,
                cancel=cancel, progress=progress, control=control,
                extra_params=job.extra_params, position_details=job.position_details,
                budget=budget, status=on_status)
        except (ModelError, StoreError, ForkviewError) as e:
            decide(MIOutcome(job, "failed", one_line(e)))
            continue
        decide(MIOutcome(job, summary.status, summary=summary))
    result.interrupted = cancel is not None and cancel.is_set()
    return result
