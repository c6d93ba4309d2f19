"""model -> annotated trace -> store: the one path every front end uses.

No Textual here: the CLI, the explorer and the sample-database script all call
`annotate_prompt`, so a trace is saved the same way whichever way it was made.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from models.types import GenerationParams, TokenStep
from store import Store

if TYPE_CHECKING:
    from models.loading import LoadedModel


@dataclass
class AnnotationResult:
    trace_id: int
    prompt_ids: list[int]
    params: GenerationParams
    steps: list[TokenStep] = field(default_factory=list)
    status: str = "running"
    stop_reason: str | None = None
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)


def model_row_id(store: Store, lm: LoadedModel) -> int:
    return store.upsert_model(
        name=lm.name, spec=lm.spec, kind=lm.kind, dtype=lm.dtype, device=lm.device,
        content_hash=lm.content_hash, revision=lm.revision, tokenizer_hash=lm.tokenizer_hash,
    )


def annotate_prompt(
    lm: LoadedModel,
    store: Store,
    prompt: str,
    params: GenerationParams,
    *,
    answer: str | None = None,
    solution: str | None = None,
    source_set: str | None = None,
    source_id: str | None = None,
    cancel: threading.Event | None = None,
    on_start: Callable[[AnnotationResult], None] | None = None,
    on_step: Callable[[TokenStep], None] | None = None,
) -> AnnotationResult:
    """Generate, annotate and save one trace.

    Tokens reach the database as they are generated. Cancelling (the event, Ctrl-C,
    or an exception from a callback) leaves the trace with its tokens so far, marked
    `stopped` (or `failed` for errors); the exception is re-raised.
    """
    from models.generate import StopInfo, encode_prompt, resolve_seed, stream_annotated

    prompt_ids = encode_prompt(lm, prompt, raw=params.raw)
    params = resolve_seed(params)
    trace_id = store.start_trace(
        model_id=model_row_id(store, lm),
        prompt_id=store.add_prompt(prompt, reference_answer=answer,
                                   reference_solution=solution, source_set=source_set,
                                   source_id=source_id),
        prompt_token_ids=prompt_ids,
        params=params,
    )
    result = AnnotationResult(trace_id=trace_id, prompt_ids=prompt_ids, params=params)
    if on_start:
        on_start(result)
    info = StopInfo()
    t0 = time.perf_counter()
    with store.writer(trace_id) as writer:
        for step in stream_annotated(lm, prompt_ids, params, cancel=cancel, stop_info=info):
            writer.add(step)
            result.steps.append(step)
            if on_step:
                on_step(step)
        result.status = "stopped" if info.reason == "interrupted" else "complete"
        result.stop_reason = info.reason or None
        writer.finish(result.status, result.stop_reason)
    result.seconds = time.perf_counter() - t0
    record_answer(store, trace_id, result.text, answer)
    return result


def record_answer(store: Store, trace_id: int, text: str,
                  reference: str | None) -> tuple[str | None, bool | None]:
    """Store the trace's extracted final answer and, given a reference, whether it is
    correct (math-verify equivalence; see models.answers). Returns (answer, correct)."""
    from models.answers import extract_answer, is_correct

    got = extract_answer(text)
    correct = is_correct(text, reference) if (got is not None and reference) else None
    answer = got.value if got else None
    store.set_answer(trace_id, answer, got.method if got else None, correct)
    return answer, correct
