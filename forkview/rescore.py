"""Rescoring: a second model reads the very token ids a trace holds.

`forkview rescore --model SPEC (--trace ID ... | --set NAME | --all)` teacher-forces
each trace's prompt ids + response ids through the second model in one forward pass
(`models.generate.score_tokens`) and stores, per position, that model's log-prob, rank,
entropy (nats, T = 1, full vocabulary) and top alternatives in `token_scores`, keyed
by the second model's `models` row. With `--mi`, the estimators run again with the
second model; `forkview.mi.run_params` adds the model to such a run's parameters, so
it is kept beside the trace's own run.

Token ids only mean the same thing to two models with the same tokenizer: rescoring
requires identical tokenizer fingerprints (`forkview.forks.check_tokenizer`, as for
forks) and refuses otherwise, naming both models.

Branches: their response is the parent's tokens before the fork position plus their
own (`Store.full_tokens`); the whole of it is teacher-forced, and the scores stored
under the branch are those of its own positions (from the fork position on), as the
`tokens` table stores them. A trace longer than the second model's context is scored
as far as the context reaches.

Resumable: a trace that already has scores from that model row is skipped (a trace is
scored in one transaction, so it is either scored or not).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forkview.errors import UsageError
from models.errors import ModelError
from store import Store, StoreError, TraceInfo

if TYPE_CHECKING:
    from models.estimators import Estimator
    from models.loading import LoadedModel


@dataclass
class RescoreResult:
    trace_id: int
    status: str  # scored | skipped (already scored) | own (made by this model) | empty
    n_scored: int = 0
    n_tokens: int = 0  # the trace's own positions
    note: str = ""


def select_traces(store: Store, *, trace_ids: Sequence[int] = (), set_name: str | None = None,
                  all_traces: bool = False) -> list[TraceInfo]:
    """The traces a request names: explicit ids (any trace, branches included), or the
    root traces of a prompt set, or every root trace; running traces are left out of
    --set and --all (and refused when named)."""
    if trace_ids:
        infos = [store.trace(t) for t in trace_ids]
        for info in infos:
            if info.status == "running":
                raise StoreError(f"trace {info.id} is still running; rescore it when it ends")
        return infos
    if set_name is not None:
        infos = store.root_traces(source_set=set_name)
        if not infos:
            raise StoreError(f"no traces from prompt set '{set_name}' in {store.path}")
    elif all_traces:
        infos = store.root_traces()
    else:
        raise UsageError("nothing to rescore: name traces, a set or --all")
    return [t for t in infos if t.status != "running"]


def check_tokenizers(store: Store, infos: Sequence[TraceInfo], lm: LoadedModel) -> None:
    """Refuse (one line, both models named) unless every trace's model reads token ids
    as `lm` does."""
    from forkview.forks import ForkError, ForkSource, check_tokenizer

    for info in infos:
        try:
            check_tokenizer(store, ForkSource(info=info, steps=[]), lm)
        except ForkError:
            why = ("has a different tokenizer" if info.model_tokenizer_hash
                   else "has no recorded tokenizer fingerprint to compare")
            raise ModelError(
                f"cannot rescore trace {info.id}: it was made by {info.model_name} "
                f"({info.model_spec}), and {lm.name} ({lm.spec}) {why}; rescoring reads "
                "the same token ids, so it needs identical tokenizers") from None


def rescore_trace(lm: LoadedModel, store: Store, info: TraceInfo, model_id: int) -> RescoreResult:
    """Score one trace's tokens with `lm` and store them under `model_id`."""
    from models.engine import score_tokens

    result = RescoreResult(trace_id=info.id, status="scored")
    if info.model_id == model_id:
        result.status, result.note = "own", "made by this model"
        return result
    if store.scored_models(info.id).get(model_id):
        result.status = "skipped"
        return result
    steps = store.full_tokens(info.id)
    start = info.fork_position or 0
    result.n_tokens = max(0, len(steps) - start)
    ids = [s.token_id for s in steps]
    room = len(ids)
    if lm.context_length:
        room = min(room, lm.context_length - len(info.prompt_token_ids))
    if room <= start or result.n_tokens == 0:
        result.status = "empty"
        result.note = ("no tokens" if result.n_tokens == 0
                       else "its own tokens lie past the model's context")
        return result
    if room < len(ids):
        result.note = f"scored the first {room - start} of {result.n_tokens} tokens (context)"
    scored = score_tokens(lm, info.prompt_token_ids, ids[:room], info.params)
    result.n_scored = store.add_token_scores(info.id, model_id,
                                             [s for s in scored if s.position >= start])
    return result


def rescore(
    lm: LoadedModel,
    store: Store,
    infos: Sequence[TraceInfo],
    *,
    estimators: Sequence[Estimator] = (),
    cancel: threading.Event | None = None,
    on_trace: Callable[[RescoreResult], None] | None = None,
    on_mi: Callable[[int, str, str], None] | None = None,
) -> list[RescoreResult]:
    """Score every trace (skipping those already scored by this model), then run the
    estimators with this model on the root traces it did not make (forkview.mi.run_many:
    runs already complete are left as they are, an interrupted one resumes, a trace an
    estimator cannot run on is skipped with its reason)."""
    from forkview.mi import jobs_for, run_many
    from forkview.pipeline import model_row_id

    check_tokenizers(store, infos, lm)
    model_id = model_row_id(store, lm)
    results = []
    for info in infos:
        if cancel is not None and cancel.is_set():
            break
        r = rescore_trace(lm, store, info, model_id)
        results.append(r)
        if on_trace:
            on_trace(r)
    if cancel is not None and cancel.is_set():
        return results
    # MI with the second model on root traces only, superseded copies left out, as
    # `forkview mi --all` does.
    roots = [info.id for info in infos
             if info.parent_trace_id is None and info.model_id != model_id]
    if estimators and roots:
        run_many(lm, store, jobs_for(roots, estimators), model_id=model_id, cancel=cancel,
                 superseded=False,
                 on_outcome=None if on_mi is None else
                 lambda o: on_mi(o.job.trace_id, o.job.estimator.name, o.label))
    return results
