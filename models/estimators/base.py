"""The estimator plug-in contract.

An estimator has a name, default parameters, a declaration of what it needs
("hidden" states, a "reference" answer, "rollouts"), and a `run` that yields values per
token position in chunks, so a caller can store them as they come and a re-run can skip
the positions already stored. Values at position t belong to the forward step that
emitted token t, the same alignment as entropy (science.md §5).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from models.errors import ModelError


@dataclass
class TraceData:
    """What an estimator may read about a saved trace (no database types here)."""

    prompt_ids: list[int]
    token_ids: list[int]
    entropies: list[float]
    text: str
    reference_answer: str | None = None
    reference_solution: str | None = None


@dataclass
class ChildTrace:
    """A continuation an estimator sampled from a fork of the trace (rollouts)."""

    fork_position: int
    forced_token_ids: list[int]
    token_ids: list[int]  # from the fork position on (forced tokens first)
    text: str
    answer: str | None
    answer_method: str | None
    stop_reason: str
    steps: list[Any] | None = None  # TokenSteps at positions fork_position, ...
    seed: int | None = None


@dataclass
class EstimatorChunk:
    """Values for some positions, plus details (JSON-able), run-level findings and any
    continuations to keep as child traces."""

    values: dict[int, float | None]
    details: dict[int, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    children: list[ChildTrace] = field(default_factory=list)


# Short names of parameters in labels ("hsic σ=50"); an estimator adds its own.
SHORT_NAMES: dict[str, str] = {"reference": "ref", "max_new_tokens": "max",
                               "temperature": "T", "keep_tokens": "keep"}


class Estimator(ABC):
    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()
    defaults: ClassVar[dict[str, Any]] = {}
    default_positions: ClassVar[str] = "all"  # all | stratified
    # How its runs are labelled (the explorer's legend, panel and pickers): the headline
    # parameters are always shown; the others only where they differ from `defaults`.
    headline: ClassVar[tuple[str, ...]] = ()
    short_names: ClassVar[dict[str, str]] = {}

    def __init__(self, params: Mapping[str, Any] | None = None):
        merged = dict(self.defaults)
        for key, value in (params or {}).items():
            if key not in self.defaults:
                known = ", ".join(sorted(self.defaults)) or "none"
                raise ModelError(f"unknown parameter '{key}' for {self.name} (known: {known})")
            merged[key] = value
        self.params = self.validate(merged)
        # Set by the caller to stop a long run between positions (rollouts).
        self.cancel: Any = None

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Check and normalise the full parameter set; raise ModelError on bad values."""
        return params

    def check(self, trace: TraceData) -> str | None:
        """Why this estimator, with its parameters, cannot run on `trace` (one line), or
        None when it can: the preconditions `run` would otherwise raise ModelError for
        before doing any work, checked without a model, so a caller skips the trace
        with this reason instead of leaving a failed run (forkview/mi.py `run_many`)."""
        return None

    @abstractmethod
    def run(self, lm: Any, trace: TraceData, positions: Sequence[int]) -> Iterator[EstimatorChunk]:
        """Yield values for `positions` (already without the ones stored earlier)."""


REGISTRY: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    REGISTRY[cls.name] = cls
    return cls


def get_estimator(name: str, params: Mapping[str, Any] | None = None) -> Estimator:
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"unknown estimator '{name}' (known: {', '.join(sorted(REGISTRY))})"
        ) from None
    return cls(params)


def _coerce(text: str, default: Any) -> Any:
    if isinstance(default, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def parse_params(name: str, pairs: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings from the command line, typed by the estimator's defaults.
    A value that doesn't parse as the default's type stays a string (e.g.
    bandwidth=median); the estimator's `validate` decides whether that is allowed."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise ModelError(f"unknown estimator '{name}' (known: {', '.join(sorted(REGISTRY))})")
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ModelError(f"bad parameter '{pair}': use key=value")
        if key not in cls.defaults:
            known = ", ".join(sorted(cls.defaults)) or "none"
            raise ModelError(f"unknown parameter '{key}' for {name} (known: {known})")
        try:
            out[key] = _coerce(value, cls.defaults[key])
        except ValueError:
            if isinstance(cls.defaults[key], bool):
                raise ModelError(f"parameter {key} of {name} must be true or false, "
                                 f"got '{value}'") from None
            out[key] = value
    return out


def finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


REFERENCES = ("auto", "solution", "answer", "self")


MISSING_REFERENCE = {
    "auto": "no reference answer for this prompt and no answer extractable from the "
            "trace's text",
    "solution": "no reference solution for this prompt",
    "answer": "no reference answer for this prompt",
    "self": "no answer extractable from the trace's text",
}


def find_reference(trace: TraceData, which: str) -> tuple[str, str] | None:
    """(text, kind): the reference text `which` (auto | solution | answer | self) picks
    for this trace and where it came from; None when there is none."""
    from models.answers import extract_answer

    if which in ("auto", "solution") and trace.reference_solution:
        return trace.reference_solution, "solution"
    if which in ("auto", "answer") and trace.reference_answer:
        return trace.reference_answer, "answer"
    if which in ("auto", "self"):
        got = extract_answer(trace.text)
        if got is not None:
            return got.value, "self"
    return None


def missing_reference(trace: TraceData, which: str) -> str | None:
    """Why `which` gives no reference for this trace (MISSING_REFERENCE), or None."""
    return None if find_reference(trace, which) is not None else MISSING_REFERENCE[which]


def pick_reference(trace: TraceData, which: str) -> tuple[str, str]:
    """(text, kind): the text h_y is computed from, and where it came from; ModelError
    when there is none."""
    found = find_reference(trace, which)
    if found is None:
        raise ModelError(MISSING_REFERENCE[which])
    return found
