"""`rollout`: outcome MI at a token from sampled continuations (science.md §3; the
batched, cache-reusing computation lives in models/rollout.py).

Each continuation is handed back as a child trace (fork position, forced token, its
tokens from the fork on, extracted answer) for the caller to store, so the forks
view can show them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from models.errors import ModelError
from models.estimators.base import (
    ChildTrace,
    Estimator,
    EstimatorChunk,
    TraceData,
    register,
)


@register
class RolloutEstimator(Estimator):
    name = "rollout"
    needs = frozenset({"rollouts"})
    default_positions = "stratified"
    defaults: ClassVar[dict[str, Any]] = {
        "samples": 8,
        "min_prob": 0.05,
        "max_new_tokens": 256,
        "temperature": 1.0,
        "seed": 0,
        "miller_madow": True,
        "answer_scope": "response",  # or "continuation" (w + continuation only)
        "keep_tokens": True,  # store each continuation's tokens (False: trace rows only)
    }

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        if int(params["samples"]) < 1:
            raise ModelError(f"samples must be at least 1, got {params['samples']}")
        if not 0 < float(params["min_prob"]) < 1:
            raise ModelError(f"min_prob must be in (0, 1), got {params['min_prob']}")
        if int(params["max_new_tokens"]) < 1:
            raise ModelError(f"max_new_tokens must be at least 1, got {params['max_new_tokens']}")
        if not float(params["temperature"]) > 0:
            raise ModelError(f"temperature must be positive, got {params['temperature']}")
        if params["answer_scope"] not in ("response", "continuation"):
            raise ModelError("answer_scope must be response or continuation")
        return params

    def run(self, lm: Any, trace: TraceData, positions: Sequence[int]) -> Iterator[EstimatorChunk]:
        from models.rollout import rollout_positions

        p = self.params
        results = rollout_positions(
            lm, trace.prompt_ids, trace.token_ids, positions,
            samples=int(p["samples"]), min_prob=float(p["min_prob"]),
            max_new_tokens=int(p["max_new_tokens"]), temperature=float(p["temperature"]),
            seed=int(p["seed"]), miller_madow=bool(p["miller_madow"]),
            answer_scope=p["answer_scope"], annotate=bool(p["keep_tokens"]),
            cancel=self.cancel,
        )
        for r in results:
            detail = {
                "entropy": r.entropy,
                "value_plugin": r.value_plugin,
                "value_miller_madow": r.value_miller_madow,
                "classes": r.classes,
                "mixture": r.mixture,
                "alternatives": [
                    {"token_id": a.token_id, "text": a.text, "prob": a.prob,
                     "weight": a.weight, "emitted": a.emitted, "counts": a.counts}
                    for a in r.alternatives
                ],
            }
            children = [
                ChildTrace(fork_position=r.position, forced_token_ids=[a.token_id],
                           token_ids=c.token_ids, text=c.text, answer=c.answer,
                           answer_method=c.answer_method, stop_reason=c.stop_reason,
                           steps=c.steps, seed=r.params.get("position_seed"))
                for a in r.alternatives for c in a.continuations
            ]
            info = {k: v for k, v in r.params.items() if k != "position_seed"}
            yield EstimatorChunk(values={r.position: r.value}, details={r.position: detail},
                                 info=info, children=children)
