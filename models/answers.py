"""Final answers: extracting one from a model's text, and judging it against a reference.

Extractors are plain functions ``text -> str | None`` kept in a registry; adding one is
a function and ``@register_extractor("name")``. ``extract_answer`` tries them in order
(default: boxed, final_answer, last_number) and says which one answered.

``answers_equivalent`` compares two answer strings: a normalised exact match first
(case, spaces, "$", a trailing period, thousands commas, "15.0" == "15", "1/2" ==
"0.5"), then math-verify (``parse`` + ``verify``, sympy-based) for everything else
(LaTeX fractions, expressions, sets). math-verify and sympy are imported on first use
only (they take seconds to import), need no network, and their signal-based timeouts
are used in the main thread only: signal.alarm cannot be set from a worker thread
(the TUI's), where inputs are instead capped in length before sympy sees them.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

Extractor = Callable[[str], "str | None"]

EXTRACTORS: dict[str, Extractor] = {}
DEFAULT_METHODS: tuple[str, ...] = ("boxed", "final_answer", "last_number")

# math-verify settings: seconds per parse / comparison (main thread), and the longest
# answer handed to sympy at all (a pathological expression can take minutes).
MATH_TIMEOUT_S = 5
MAX_MATH_CHARS = 300


@dataclass(frozen=True)
class ExtractedAnswer:
    value: str  # the answer as found, trimmed (last_number drops thousands commas)
    method: str  # the extractor that found it


def register_extractor(name: str) -> Callable[[Extractor], Extractor]:
    """Decorator: make ``fn`` available to ``extract_answer`` as ``name``."""

    def deco(fn: Extractor) -> Extractor:
        EXTRACTORS[name] = fn
        return fn

    return deco


def extract_answer(
    text: str, methods: Iterable[str] = DEFAULT_METHODS
) -> ExtractedAnswer | None:
    """The first non-empty answer any of ``methods`` finds in ``text``, tried in order."""
    methods = tuple(methods)
    unknown = [m for m in methods if m not in EXTRACTORS]
    if unknown:
        raise ValueError(f"unknown answer extractor {unknown[0]!r}: "
                         f"known are {', '.join(sorted(EXTRACTORS))}")
    for name in methods:
        value = EXTRACTORS[name](text or "")
        if value is not None and value.strip():
            return ExtractedAnswer(value=value.strip(), method=name)
    return None


# ---------------------------------------------------------------- cut-off responses
# A response stopped by max_new_tokens or by the model's context has not finished: the
# last number it happens to have written is not its answer. The one rule, used for
# generated traces and branches (forkview.pipeline.record_answer) and for rollout
# continuations (models.rollout): such a response keeps only an answer it states
# explicitly (EXPLICIT_METHODS: \boxed{}, "final answer" / "####"; an extractor that
# returns a bare string states nothing), else it has no answer, recorded with the
# answer method CUT_OFF and never scored (correct stays None).
CUT_OFF_REASONS = ("length", "context")  # stop reasons of an unfinished response
EXPLICIT_METHODS = ("boxed", "final_answer")  # extractor methods that state an answer
CUT_OFF_ANSWERS = ("explicit", "none", "any")  # what a cut-off response may answer
CUT_OFF = "cut_off"  # answer_method of a cut-off response without an accepted answer


def is_cut_off(stop_reason: str | None) -> bool:
    """Whether a response with this stop reason was cut off (length / context)."""
    return stop_reason in CUT_OFF_REASONS


def accept_answer(found: ExtractedAnswer | str | None, *, cut_off: bool,
                  policy: str = "explicit") -> tuple[str | None, str | None, str | None]:
    """(answer, method, dropped answer) of a response whose extractor found ``found``.

    A finished response keeps what was found. A cut-off one (``cut_off``), under
    ``policy`` (CUT_OFF_ANSWERS): "explicit" keeps only an answer of EXPLICIT_METHODS,
    "none" never an answer, "any" whatever was found. A cut-off response left without
    an answer has the method CUT_OFF; an answer it did not keep is the dropped answer.
    """
    if policy not in CUT_OFF_ANSWERS:
        raise ValueError(f"cut_off_answers must be one of {', '.join(CUT_OFF_ANSWERS)}, "
                         f"not {policy!r}")
    if found is None:
        answer, method = None, None
    elif isinstance(found, str):
        answer, method = (found.strip() or None), None
    else:
        value = found.value.strip() if found.value else ""
        answer, method = (value, found.method) if value else (None, None)
    if not cut_off:
        return answer, method, None
    if answer is not None and (
            policy == "none" or (policy == "explicit" and method not in EXPLICIT_METHODS)):
        return None, CUT_OFF, answer
    return answer, (method if answer is not None else CUT_OFF), None


# ---------------------------------------------------------------- extractors

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s${][^\s$]*)")  # "\boxed 5" (no braces)


def _balanced(text: str, start: int) -> int | None:
    """Index of the brace closing the one just before ``start``; None if unbalanced.

    Escaped braces (\\{ \\}) are content, not structure.
    """
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


@register_extractor("boxed")
def boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), nesting kept."""
    found: tuple[int, str] | None = None
    for m in _BOXED.finditer(text):
        end = _balanced(text, m.end())
        if end is not None:
            found = (m.start(), text[m.end():end])
    for m in _BOXED_BARE.finditer(text):
        if found is None or m.start() > found[0]:
            found = (m.start(), m.group(1))
    return _clean(found[1]) if found else None


_FINAL = re.compile(r"final\s+answer\s*(?:is\b\s*:?|:)|####", re.IGNORECASE)


@register_extractor("final_answer")
def final_answer(text: str) -> str | None:
    """The rest of the line after the last "final answer:" / "final answer is" / "####".

    Markers are searched one by one (not line by line), so in Minerva's "Final Answer:
    The final answer is $5$. I hope it is correct." the second marker wins.
    """
    values = [text[m.end():].split("\n", 1)[0] for m in _FINAL.finditer(text)]
    values = [v for v in values if v.strip()]
    return _clean(values[-1]) if values else None


_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?(?![\d,]*\d)"
    r"|(?<![\w.])-?\.\d+"
)


@register_extractor("last_number")
def last_number(text: str) -> str | None:
    """The last integer, decimal or fraction a/b in the text; "1,234" gives "1234"."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return re.sub(r"\s+", "", found[-1]).replace(",", "")


_MATH_WRAP = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _clean(value: str) -> str:
    """Trim what surrounds an answer: markdown bold, $...$, a trailing period or sentence."""
    v = value.strip(" \t*")  # markdown bold around or inside: "** **42**"
    for left, right in _MATH_WRAP:
        if v.startswith(left):
            end = v.find(right, len(left))
            if end > 0:
                v = v[len(left):end]
            break
    v = re.split(r"\.\s+(?=[A-Z])", v)[0]  # "5. I hope it is correct."
    return v.strip().rstrip(".").strip()


# ---------------------------------------------------------------- equivalence


def normalise_answer(value: str) -> str:
    """Canonical text for an exact comparison; plain numbers become exact fractions."""
    v = value.strip().casefold()
    v = v.replace("$", "").replace("\\!", "").replace("\\,", "")
    v = re.sub(r"\s+", " ", v).strip().rstrip(".").strip()
    num = _as_number(v)
    return str(num) if num is not None else v


_WORDS = re.compile(r"[^\W\d_]{2,}(?: [^\W\d_]+)*")
_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:/\d+)?")


def _as_number(v: str) -> Fraction | None:
    s = v.replace(" ", "")
    if not s or not any(ch.isdigit() for ch in s) or not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def answers_equivalent(a: str, b: str) -> bool:
    """Whether answer ``a`` means the same as reference answer ``b``.

    Normalised exact match (and exact numeric equality), else math-verify with ``b``
    as the gold answer. When math-verify cannot parse either side the answers differ.
    """
    na, nb = normalise_answer(a), normalise_answer(b)
    if na == nb:
        return True
    if _as_number(na) is not None and _as_number(nb) is not None:
        return False  # two plain numbers, exactly compared
    if not na or not nb or max(len(a), len(b)) > MAX_MATH_CHARS:
        return False
    if _WORDS.fullmatch(na) and _WORDS.fullmatch(nb):
        return False  # plain words ("paris"): sympy would read them as products of symbols
    return _math_verify(a, b)


def _math_verify(pred: str, gold: str) -> bool:
    parse, verify = _math_verify_api()
    limit: int | None = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() \
        else None
    try:
        g = parse(_as_math(gold), parsing_timeout=limit)
        p = parse(_as_math(pred), parsing_timeout=limit)
        if not g or not p:
            return False
        return bool(verify(g, p, timeout_seconds=limit))
    except Exception:  # math-verify is best effort: a failure means "not shown equal"
        return False


def _as_math(value: str) -> str:
    """math-verify finds LaTeX inside delimiters; give bare LaTeX some."""
    v = value.strip()
    return v if "$" in v or "\\(" in v or "\\[" in v or "\\boxed" in v else f"${v}$"


_MV: tuple[Any, Any] | None = None


def _math_verify_api() -> tuple[Any, Any]:
    global _MV
    if _MV is None:
        from math_verify import parse, verify

        # It warns once through logging when timeouts are off (worker threads); the
        # length cap above is our guard there, so keep the TUI's screen clean.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _MV = (parse, verify)
    return _MV


def is_correct(
    predicted: str, reference: str, methods: Iterable[str] = DEFAULT_METHODS
) -> bool | None:
    """Whether the answer extracted from ``predicted`` matches ``reference``.

    None when no answer can be extracted from ``predicted``. A reference that holds a
    worked solution (a \\boxed{} answer, or GSM8K's "#### 72") is reduced to that answer.
    """
    got = extract_answer(predicted, methods)
    if got is None:
        return None
    ref = extract_answer(reference, ("boxed", "final_answer"))
    return answers_equivalent(got.value, ref.value if ref else reference.strip())
