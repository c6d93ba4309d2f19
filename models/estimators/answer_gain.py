"""`answer-gain`: pointwise information gain of each token about the answer,
g_t = log p(a | x_<=t, cue) - log p(a | x_<t, cue), teacher-forced (science.md §4;
the computation, with KV-cache reuse, lives in models/answer_gain.py).

`boundary=word` (default) inserts the cue only between words: a word or number split
into several tokens gets its whole gain at its last token and no value (None) at the
others. `boundary=token` inserts it after every token, g_t at each position."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from models.errors import ModelError
from models.estimators.base import (
    Estimator,
    EstimatorChunk,
    TraceData,
    missing_reference,
    pick_reference,
    register,
)


@register
class AnswerGainEstimator(Estimator):
    name = "answer-gain"
    # "transformers": its batched cue passes are written for a transformers model.
    needs = frozenset({"reference", "transformers"})
    defaults: ClassVar[dict[str, Any]] = {
        "cue": "\nFinal answer: ",
        "stride": 1,
        "boundary": "word",  # word | token: where the cue may be inserted
        "reference": "auto",  # auto | answer | self (a worked solution is no answer)
    }

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        if int(params["stride"]) < 1:
            raise ModelError(f"stride must be at least 1, got {params['stride']}")
        if params["reference"] not in ("auto", "answer", "self"):
            raise ModelError(f"reference must be auto, answer or self, "
                             f"got '{params['reference']}'")
        if params["boundary"] not in ("word", "token"):  # models.answer_gain.BOUNDARIES
            raise ModelError(f"boundary must be word or token, got '{params['boundary']}'")
        params["cue"] = str(params["cue"]).replace("\\n", "\n")
        return params

    @staticmethod
    def _without_solution(trace: TraceData) -> TraceData:
        # The reference *answer* (never the worked solution) is what is forced.
        return TraceData(trace.prompt_ids, trace.token_ids, trace.entropies, trace.text,
                         reference_answer=trace.reference_answer)

    def check(self, trace: TraceData) -> str | None:
        return missing_reference(self._without_solution(trace), self.params["reference"])

    def run(self, lm: Any, trace: TraceData, positions: Sequence[int]) -> Iterator[EstimatorChunk]:
        from models.answer_gain import answer_gain

        if not positions:
            return
        p = self.params
        answer, kind = pick_reference(self._without_solution(trace), p["reference"])
        all_positions = len(positions) == len(trace.token_ids)
        result = answer_gain(
            lm, trace.prompt_ids, trace.token_ids, answer, cue=p["cue"],
            stride=int(p["stride"]), boundary=p["boundary"],
            positions=None if (all_positions or int(p["stride"]) > 1) else sorted(positions),
        )
        wanted = set(positions)
        info = dict(result.params)
        info.update(reference_kind=kind, self_reference=kind == "self")
        yield EstimatorChunk(
            values={t: v for t, v in enumerate(result.values) if t in wanted},
            info=info,
        )
