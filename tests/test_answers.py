"""Final-answer extraction and correctness, on outputs shaped like real model outputs."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from models.answers import (
    CUT_OFF,
    DEFAULT_METHODS,
    EXTRACTORS,
    ExtractedAnswer,
    accept_answer,
    answers_equivalent,
    extract_answer,
    is_correct,
    is_cut_off,
    normalise_answer,
    register_extractor,
)

REPO = Path(__file__).resolve().parents[1]

GSM8K_REFERENCE = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


@pytest.mark.parametrize(
    ("text", "value", "method"),
    [
        ("She has 3 + 12 = 15 apples left.\n#### 15", "15", "final_answer"),
        ("The answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", "boxed"),
        ("So $x \\in \\boxed{\\left\\{1, 2\\right\\}}$, done.", "\\left\\{1, 2\\right\\}", "boxed"),
        ("First \\boxed{3}, then on reflection \\boxed{4}.", "4", "boxed"),
        ("\\boxed{5} was it; the cut-off \\boxed{\\frac{7}{", "5", "boxed"),
        ("Therefore the result is $\\boxed 9$.", "9", "boxed"),
        ("so \\fbox{12} it is", "12", "boxed"),
        ("Final answer: 1,234", "1,234", "final_answer"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5", "final_answer"),
        ("**Final Answer:** **42**\n\nLet me know!", "42", "final_answer"),
        ("The final answer is: $\\dfrac{3}{4}$", "\\dfrac{3}{4}", "final_answer"),
        ("Hence final answer is 7.\nIt took a while.", "7", "final_answer"),
        ("She earned 1,250,000.50 dollars in total, after 3 years.", "3", "last_number"),
        ("In total they paid $1,234.", "1234", "last_number"),
        ("That is 2.5 hours", "2.5", "last_number"),
        ("so each gets 3/4 of the pie", "3/4", "last_number"),
        ("the temperature fell to -5", "-5", "last_number"),
        ("read pages 10-20", "20", "last_number"),
        ("a loss of .5 points", ".5", "last_number"),
    ],
)
def test_extracts_realistic_answers(text, value, method):
    assert extract_answer(text) == ExtractedAnswer(value=value, method=method)


@pytest.mark.parametrize("text", ["", "I am not sure how to solve this.", "\\boxed{", "####  "])
def test_nothing_to_extract_gives_none(text):
    assert extract_answer(text) is None


def test_default_order_and_custom_methods():
    assert DEFAULT_METHODS == ("boxed", "final_answer", "last_number")
    text = "We get \\boxed{8}.\n#### 9\nThat took 10 steps."
    assert extract_answer(text).method == "boxed"
    assert extract_answer(text, ("final_answer", "boxed")).value == "9"
    assert extract_answer(text, ("last_number",)).value == "10"
    assert extract_answer("no box here", ("boxed",)) is None
    with pytest.raises(ValueError, match="unknown answer extractor 'regex'"):
        extract_answer(text, ("boxed", "regex"))


def test_a_new_extractor_is_one_function_and_a_registration():
    @register_extractor("option_letter")
    def option_letter(text: str) -> str | None:
        import re

        m = re.search(r"\(([A-E])\)\s*$", text.strip())
        return m.group(1) if m else None

    try:
        got = extract_answer("Comparing them, the best choice is (C)", ("option_letter",))
        assert got == ExtractedAnswer("C", "option_letter")
        assert extract_answer("nothing", ("option_letter", "last_number")) is None
    finally:
        del EXTRACTORS["option_letter"]


@pytest.mark.parametrize(
    ("value", "canonical"),
    [(" 15.0 ", "15"), ("$1,234$", "1234"), ("1/2", "1/2"), ("0.50", "1/2"),
     ("The  Moon.", "the moon"), ("-3", "-3")],
)
def test_normalisation(value, canonical):
    assert normalise_answer(value) == canonical


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("1234", "1,234", True),
        ("15.0", "15", True),
        ("$15$", "15.", True),
        (" Paris ", "paris", True),
        ("Paris", "London", False),
        ("10", "12", False),
        ("0.333", "1/3", False),  # plain numbers compare exactly
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{3}{4}", "3/4", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("x = 3", "3", True),
        ("\\left\\{1, 2\\right\\}", "\\{2, 1\\}", True),
        ("\\frac{1}{3}", "\\frac{1}{4}", False),
    ],
)
def test_answers_equivalent(a, b, same):
    assert answers_equivalent(a, b) is same


def test_is_correct_on_realistic_outputs():
    assert is_correct("The answer is \\boxed{\\frac{1}{2}}", "0.5") is True
    assert is_correct("Final answer: 1,234", "1234") is True
    assert is_correct("Adding them gives 70 clips.\n#### 70", GSM8K_REFERENCE) is False
    assert is_correct("48 + 24 = 72, so she sold 72 clips.", GSM8K_REFERENCE) is True
    assert is_correct("I do not know.", "3") is None
    assert is_correct("x = \\boxed{-2}", "Solving, $x = \\boxed{-2}$.") is True


def test_math_verify_works_from_a_worker_thread():
    # signal.alarm (math-verify's timeout) is main-thread only; the TUI calls from workers.
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(answers_equivalent("\\frac{2}{4}", "0.5")))
    t.start()
    t.join(timeout=60)
    assert out == [True]


def test_importing_answers_does_not_import_sympy():
    code = ("import sys, models.answers as a; "
            "a.extract_answer('#### 5'); a.answers_equivalent('15.0', '15'); "
            "print('sympy' in sys.modules, 'math_verify' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    assert res.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------- cut-off responses
def test_cut_off_rule_keeps_only_explicit_answers():
    last = ExtractedAnswer("41", "last_number")
    boxed = ExtractedAnswer("42", "boxed")
    # A finished response keeps what was found; a cut-off one only an explicit answer.
    assert accept_answer(last, cut_off=False) == ("41", "last_number", None)
    assert accept_answer(last, cut_off=True) == (None, CUT_OFF, "41")
    assert accept_answer(boxed, cut_off=True) == ("42", "boxed", None)
    assert accept_answer(ExtractedAnswer("7", "final_answer"), cut_off=True) == (
        "7", "final_answer", None)
    assert accept_answer(None, cut_off=True) == (None, CUT_OFF, None)
    assert accept_answer(None, cut_off=False) == (None, None, None)
    # A bare string states nothing explicitly; the other policies.
    assert accept_answer(" 5 ", cut_off=False) == ("5", None, None)
    assert accept_answer("5", cut_off=True) == (None, CUT_OFF, "5")
    assert accept_answer(last, cut_off=True, policy="any") == ("41", "last_number", None)
    assert accept_answer(boxed, cut_off=True, policy="none") == (None, CUT_OFF, "42")
    with pytest.raises(ValueError, match="cut_off_answers"):
        accept_answer(last, cut_off=True, policy="some")
    assert [is_cut_off(r) for r in ("length", "context", "eos", "stop_string", None)] == [
        True, True, False, False, False]


def test_a_cut_off_trace_is_never_scored_false(tmp_path: Path):
    from forkview.pipeline import record_answer
    from models.types import GenerationParams
    from store import Store

    store = Store.open(tmp_path / "t.db")
    model = store.upsert_model(name="m", spec="m", kind="dir", dtype="float32", device="cpu")
    prompt = store.add_prompt("Tom has 40 apples and buys 2 more. How many?",
                              reference_answer="42")

    def trace(stop_reason: str) -> int:
        tid = store.start_trace(model_id=model, prompt_id=prompt, prompt_token_ids=[1],
                                params=GenerationParams(max_new_tokens=8))
        with store.writer(tid) as w:
            w.finish("complete", stop_reason)
        return tid

    def stored(tid: int) -> tuple:
        info = store.trace(tid)
        return info.answer, info.answer_method, info.correct

    bare = "Tom starts with 40 apples. Then he buys 2, so 40 + 1"  # cut mid-sum
    for reason in ("length", "context"):
        tid = trace(reason)
        assert record_answer(store, tid, bare, "42", stop_reason=reason) == (None, None)
        assert stored(tid) == (None, "cut_off", None)  # no answer, not "wrong"
        # An answer stated explicitly before the cut is kept and scored.
        assert record_answer(store, tid, "40 + 2 = \\boxed{42}. Let me check", "42",
                             stop_reason=reason) == ("42", True)
        assert stored(tid) == ("42", "boxed", True)
        record_answer(store, tid, "Final answer: 41. Let me check", "42", stop_reason=reason)
        assert stored(tid) == ("41", "final_answer", False)
    # A finished response (EOS, a stop string) is read as before: its last number.
    for reason in ("eos", "stop_string"):
        tid = trace(reason)
        assert record_answer(store, tid, bare, "42", stop_reason=reason) == ("1", False)
        assert stored(tid) == ("1", "last_number", False)
    store.close()
