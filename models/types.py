"""Plain data that crosses the model -> store -> screen seam.

This module imports neither torch nor Textual: the store and the browser use these
types to read and write traces without loading a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Alternative:
    """One of the top-k candidates at a step, under the T = 1 distribution."""

    token_id: int
    text: str
    prob: float


@dataclass
class TokenStep:
    """Everything forkview records for one generated (or teacher-forced) token.

    All probabilities refer to the model's distribution at T = 1 over the full
    vocabulary, taken from the forward pass that emitted this token (science.md §1),
    except ``sampling_entropy``, which is the entropy of the distribution actually
    sampled from (after temperature / top-k / top-p; 0 for greedy).
    """

    position: int  # 0 = first generated token
    token_id: int
    text: str  # text piece; pieces of a trace concatenate to its decoded text
    logprob: float  # natural log of p(token) at T = 1
    rank: int  # 1 = most probable token at T = 1
    entropy: float  # nats, full vocabulary, T = 1
    sampling_entropy: float  # nats, the distribution sampled from
    top: list[Alternative] = field(default_factory=list)
    hidden: Any = None  # optional hidden state (numpy array); never stored in SQLite

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("hidden")
        return d


# N samples at T = 0 would be N identical copies: sampling several continuations (a
# batch's samples per prompt, `forkview fork --sample` from a greedy trace) draws at
# T = 1 unless a temperature is given.
SAMPLE_TEMPERATURE = 1.0


def forkview_version() -> str:
    """The installed forkview's version, as traces, the database and reports record it."""
    try:
        from importlib.metadata import version

        return version("forkview")
    except Exception:
        return "0+unknown"


@dataclass(frozen=True)
class GenerationParams:
    """Every knob that decides a trace; stored with it so it can be replayed."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_alternatives: int = 10
    raw: bool = False  # True: no chat template
    system: str | None = None  # system message put before the prompt (chat template)
    enable_thinking: bool | None = None  # passed to the chat template when not None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d
