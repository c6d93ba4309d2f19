"""model -> annotated trace -> store: the one path every front end uses.

No Textual here: the CLI, the explorer and the sample-database script all call
`annotate_prompt`, so a trace is saved the same way whichever way it was made.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from models.engine import backend_of
from models.types import GenerationParams, TokenStep
from store import Store

if TYPE_CHECKING:
    from models.loading import LoadedModel
    from models.thinking import ThinkSpan


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
        backend=backend_of(lm),
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
    from models.decoding import StopInfo, resolve_seed
    from models.engine import stream_annotated
    from models.prompting import encode_prompt

    prompt_ids = encode_prompt(lm, prompt, raw=params.raw, system=params.system,
                               enable_thinking=params.enable_thinking)
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
    record_answer(store, trace_id, result.text, answer, stop_reason=result.stop_reason)
    record_think_span(store, trace_id, lm.tokenizer, prompt_ids,
                      [s.text for s in result.steps])
    return result


def record_think_span(store: Store, trace_id: int, tokenizer: Any,
                      prompt_ids: Sequence[int],
                      pieces: Sequence[str] | None = None) -> ThinkSpan | None:
    """Find and store a finished trace's thinking span (models/thinking.py) from its
    token pieces (read from the store when not given). Whether the prompt already
    opened the thinking part is read from the rendered prompt (its ids decoded, special
    tokens kept; without a tokenizer that decodes, the response alone decides).
    Root traces only: a branch keeps NULL (its own tokens start at its fork position)."""
    from models.thinking import find_think_span

    if pieces is None:
        pieces = [s.text for s in store.tokens(trace_id)]
    prompt_text: str | None = None
    if tokenizer is not None:
        try:
            prompt_text = tokenizer.decode(list(prompt_ids), skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)
        except TypeError:  # a tokenizer without these options (another engine's)
            prompt_text = tokenizer.decode(list(prompt_ids))
    span = find_think_span(pieces, prompt_text=prompt_text)
    store.set_think_span(trace_id, span)
    return span


def record_answer(store: Store, trace_id: int, text: str, reference: str | None, *,
                  stop_reason: str | None) -> tuple[str | None, bool | None]:
    """Store the trace's extracted final answer and, given a reference, whether it is
    correct (math-verify equivalence; see models.answers). Returns (answer, correct).

    A response cut off by its token limit or the context (`stop_reason` length /
    context) keeps only an answer it states explicitly (\\boxed{}, "final answer"):
    else it has no answer (method "cut_off") and is never scored, the rule rollout
    continuations follow (models.answers.accept_answer)."""
    from models.answers import accept_answer, extract_answer, is_correct, is_cut_off

    answer, method, _dropped = accept_answer(extract_answer(text),
                                             cut_off=is_cut_off(stop_reason))
    correct = is_correct(text, reference) if (answer is not None and reference) else None
    store.set_answer(trace_id, answer, method, correct)
    return answer, correct
