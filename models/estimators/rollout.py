"""`rollout`: outcome MI at a token from sampled continuations (science.md §3; the
batched, cache-reusing computation lives in models/rollout.py).

Each continuation is handed back as a child trace (fork position, forced token, its
tokens from the fork on, extracted answer) for the caller to store, so the forks
view can show them.

Per-position details (``RolloutResult.details``; what ``store.mi_details`` returns):
entropy, value_plugin, value_miller_madow, classes (None = the "no answer" class),
mixture, alternatives [{token_id, text, prob, weight, emitted, counts, n_cut_off}], and
since the second version n_choices (kept alternatives; < 2: ``no_choice`` is True and
the stored value is 0.0 by construction, to be left out of comparisons with entropy),
choice_entropy (H(p~), nats), value_normalised (value / choice_entropy, None when that
is 0), mixture_n_eff (the mixture's Miller-Madow sample size), n_no_answer, n_cut_off
and no_answer_class (index into classes, or None). Details of runs made before then
lack these keys; their params lack mixture_n and cut_off_answers.

Since the third version, "counterfactual": keep vs redraw at the position (p_change,
p_change_baseline, importance, tv, accuracy_keep, accuracy_redraw, accuracy_change,
n_keep, n_redraw, unbiased; models/rollout.py, ``counterfactual``), the accuracies
against the trace's reference answer (None without one). Runs drawn by
``--positions categories`` add "category" to each position's details (forkview/mi.py).

Two attributes, like ``cancel``, are set by the caller and are not parameters:
``budget`` (a ``models.rollout.TokenBudget`` shared by the positions of a command:
the run ends before a position whose worst case would pass it) and ``hooks`` (extra
keyword arguments for ``rollout_positions``, e.g. ``answer_ids``: scripted outcomes).
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
    # "transformers": its batched continuations use a transformers KV cache.
    needs = frozenset({"rollouts", "transformers"})
    default_positions = "stratified"
    headline: ClassVar[tuple[str, ...]] = ("samples", "min_prob")
    short_names: ClassVar[dict[str, str]] = {"samples": "S", "min_prob": "p>",
                                             "miller_madow": "MM", "answer_scope": "scope"}
    defaults: ClassVar[dict[str, Any]] = {
        "samples": 8,
        "min_prob": 0.05,
        # Sampled tokens after the forced one. A continuation must finish the response:
        # the bundled arith problems' EOS-ended responses from the default 135M model run
        # 18-160 tokens (mean 108) and most traces are longer than 160, so a fork early
        # in a trace needs well over 128; sample_db's 32 left 1666 of 2020 cut off.
        "max_new_tokens": 256,
        "temperature": 1.0,
        "seed": 0,
        "miller_madow": True,
        "answer_scope": "response",  # or "continuation" (w + continuation only)
        "mixture_n": "kish",  # mixture's Miller-Madow N: S / sum p~^2 ("total": S x alts)
        "cut_off_answers": "explicit",  # cut-off rows keep only boxed / final-answer answers
        "keep_tokens": True,  # store each continuation's tokens (False: trace rows only)
    }

    def __init__(self, params: Any = None):
        super().__init__(params)
        self.budget: Any = None  # models.rollout.TokenBudget, set by the caller
        self.hooks: dict[str, Any] = {}  # extra keyword arguments for rollout_positions

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
        if params["mixture_n"] not in ("kish", "total"):
            raise ModelError(f"mixture_n must be kish or total, got {params['mixture_n']}")
        if params["cut_off_answers"] not in ("explicit", "none", "any"):
            raise ModelError("cut_off_answers must be explicit, none or any, got "
                             f"{params['cut_off_answers']}")
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
            mixture_n=p["mixture_n"], cut_off_answers=p["cut_off_answers"],
            reference_answer=trace.reference_answer, budget=self.budget,
            cancel=self.cancel, **self.hooks,
        )
        for r in results:
            detail = r.details()
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
