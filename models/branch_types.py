"""A branch request and its output, and the checks every engine applies before growing
branches (models/branch.py on transformers, models/llama_backend.py on llama.cpp).
No torch here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from models.errors import ModelError
from models.types import GenerationParams, TokenStep


@dataclass(frozen=True)
class BranchRequest:
    """One branch to grow: the token ids forced from the fork position on (empty: the
    fork token is sampled too) and its generation parameters (``max_new_tokens``
    counts the tokens generated after the forced ones)."""

    forced: tuple[int, ...]
    params: GenerationParams


@dataclass
class BranchOutput:
    forced: list[int]
    params: GenerationParams  # with the seed actually used
    steps: list[TokenStep] = field(default_factory=list)
    stop_reason: str = ""  # eos | length | stop_string | context | interrupted

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def token_ids(self) -> list[int]:
        return [s.token_id for s in self.steps]


def check_requests(lm: Any, prompt_ids: Sequence[int], token_ids: Sequence[int],
                   position: int, requests: Sequence[BranchRequest],
                   vocab: int | None) -> None:
    """ModelError (one line) for a branch request no engine can grow."""
    if not prompt_ids:
        raise ModelError("the prompt is empty")
    if not 0 <= position <= len(token_ids):
        raise ModelError(f"position {position} is out of range (the trace has "
                         f"{len(token_ids)} tokens: 0..{len(token_ids) - 1})")
    if not requests:
        raise ModelError("no branch to grow")
    first = requests[0].params
    for r in requests:
        if r.params.raw != first.raw or r.params.top_alternatives != first.top_alternatives:
            raise ModelError("branches grown together must share their annotation settings")
        if (r.params.temperature, r.params.top_k, r.params.top_p) != (
                first.temperature, first.top_k, first.top_p):
            raise ModelError("branches grown together must share temperature, top-k and top-p")
    for r in requests:
        bad = [t for t in r.forced if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise ModelError(f"token id {bad[0]} is not in the model's vocabulary")
    prefix = len(prompt_ids) + position
    if lm.context_length and prefix + 1 > lm.context_length:
        raise ModelError(f"position {position} is past the model's context "
                         f"({lm.context_length} tokens)")
