"""The thinking part of a reasoning model's response: which token positions it spans.

Reasoning models (Qwen3, QwQ, DeepSeek-R1 and its distills) write their reasoning between
`<think>` and `</think>` before the answer. MI-Peaks analyses that part; forkview stores
its span per trace (traces.think_start, think_end, answer_start) and `forkview report
--span think|answer` restricts the analysis to it.

Pure Python (no torch, no tokenizer): the span is found on the trace's token pieces,
which concatenate to the response text (models/decoding.py, Detokenizer).

The rule, on character offsets of the concatenated pieces (a marker may be split over
several tokens, or share a token with other text):

- the thinking content runs from just after the opening marker (or from the start of the
  response when the prompt already opened it: DeepSeek-R1 distill templates end the
  generation prompt with `<think>\\n`) to the start of the first closing marker after it;
  without a closing marker (a response cut off while thinking) to the end of the
  response, flagged unterminated;
- a token belongs to the thinking part when it holds at least one character of the
  content, so a token that straddles a marker and content counts as thinking; a token
  made only of marker characters belongs to neither part;
- a token with an empty piece (bytes the detokenizer held back until a later token
  completed the character) goes with the next token that has text;
- the answer starts at the first token after the thinking part that holds a character
  after the closing marker (a token holding both thinking and answer text is thinking);
  when nothing follows the closing marker it starts at the end (an empty answer);
- empty thinking content (`<think></think>`) gives an empty span, start = end = the
  token that holds the first character of the closing marker.

Only the first thinking part counts (the first opening marker, the first closing marker
after it). Markers must appear in the pieces' text: a tokenizer that makes `<think>` a
special token skipped when decoding would hide it (Qwen3's and DeepSeek-R1's are not
special).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class ThinkSpan:
    """Token positions [start, end) of the thinking content; `answer_start` the first
    position of the answer after it (None when unterminated: there is no answer)."""

    start: int
    end: int
    answer_start: int | None
    terminated: bool = True

    def __len__(self) -> int:
        return self.end - self.start


def prompt_opens_thinking(prompt_text: str, *, open_marker: str = THINK_OPEN,
                          close_marker: str = THINK_CLOSE) -> bool:
    """Whether a rendered prompt ends inside a thinking part: its last opening marker
    has no closing marker after it (a DeepSeek-R1 distill generation prompt ends with
    `<think>\\n`; Qwen3's with thinking disabled closes it: `<think>\\n\\n</think>\\n\\n`)."""
    at = prompt_text.rfind(open_marker)
    return at >= 0 and prompt_text.find(close_marker, at + len(open_marker)) < 0


def find_think_span(pieces: Sequence[str], *, prompt_text: str | None = None,
                    opened: bool | None = None, open_marker: str = THINK_OPEN,
                    close_marker: str = THINK_CLOSE) -> ThinkSpan | None:
    """The thinking span of a response given as token pieces, or None when it has no
    thinking part (see the module docstring for the rule).

    `opened`: whether the prompt already opened the thinking part; else decided from
    `prompt_text` (`prompt_opens_thinking`); with neither, inferred from the response:
    a closing marker with no opening marker before it means the response started
    inside the thinking part.
    """
    if not open_marker or not close_marker:
        raise ValueError("thinking markers must not be empty")
    n = len(pieces)
    text = "".join(pieces)
    if opened is None and prompt_text is not None:
        opened = prompt_opens_thinking(prompt_text, open_marker=open_marker,
                                       close_marker=close_marker)
    if opened is None:
        close_at, open_at = text.find(close_marker), text.find(open_marker)
        opened = close_at >= 0 and (open_at < 0 or close_at < open_at)
    if opened:
        c0 = 0
    else:
        at = text.find(open_marker)
        if at < 0:
            return None
        c0 = at + len(open_marker)
    close = text.find(close_marker, c0)
    terminated = close >= 0
    c1 = close if terminated else len(text)
    # starts[i]: offset of token i's first character; ends[i]: one past its last, where
    # an empty piece takes the range of the next token that has text.
    starts, ends = [0] * n, [0] * n
    off = 0
    for i, p in enumerate(pieces):
        starts[i] = off
        off += len(p)
        ends[i] = off
    nxt = len(text)
    nxt_start = len(text)
    for i in range(n - 1, -1, -1):
        if pieces[i]:
            nxt, nxt_start = ends[i], starts[i]
        else:
            starts[i], ends[i] = nxt_start, nxt

    def first_ending_after(c: int, lo: int = 0) -> int:
        # first token at or after lo whose (effective) range ends after offset c
        i = lo
        while i < n and ends[i] <= c:
            i += 1
        return i

    start = first_ending_after(c0)
    if terminated:
        # tokens that begin before c1 (and end after c0) hold thinking characters
        end = max(start, bisect_right(starts, c1 - 1) if c1 > c0 else start)
        answer = first_ending_after(c1 + len(close_marker), end)
    else:
        end, answer = n, None
    return ThinkSpan(start, end, answer, terminated)
