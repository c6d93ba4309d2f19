"""Text about a trace's family that the tree and the compare view both show (kept
apart so neither screen imports the other): traces' whole responses read once, and
what a branch forced at its fork."""

from __future__ import annotations

from collections.abc import Callable

from models.types import TokenStep
from store import Store, StoreError


class FullTokens:
    """Traces' whole responses, read once per screen: a branch's label needs its
    parent's token at the fork, and many branches share a parent."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.cache: dict[int, list[TokenStep]] = {}

    def __call__(self, trace_id: int) -> list[TokenStep]:
        if trace_id not in self.cache:
            try:
                self.cache[trace_id] = self.store.full_tokens(trace_id)
            except StoreError:  # deleted meanwhile: no label text
                self.cache[trace_id] = []
        return self.cache[trace_id]

    def clear(self) -> None:
        self.cache.clear()


def forced_label(store: Store, trace_id: int, parent_id: int | None, position: int | None,
                 forced: list[int] | None,
                 parent_steps: Callable[[int], list[TokenStep]]) -> str:
    """The forced token(s) of a branch as text ("resampled" when the token at the fork
    was drawn anew): from the parent's token or recorded alternatives at the fork, else
    (typed text) from the branch's own first tokens."""
    if forced is None:
        return ""
    if not forced:
        return "resampled"
    pos = position or 0
    if len(forced) == 1 and parent_id is not None:
        steps = parent_steps(parent_id)
        if pos < len(steps):
            step = steps[pos]
            if step.token_id == forced[0]:
                return repr(step.text)
            for alt in step.top:
                if alt.token_id == forced[0]:
                    return repr(alt.text)
    try:
        own = store.tokens(trace_id)[: len(forced)]
    except StoreError:
        own = []
    if len(own) == len(forced):
        return repr("".join(s.text for s in own))
    return f"ids {forced}"
