"""Teacher-forced answer gain (models/answer_gain.py)."""

from __future__ import annotations

import itertools
import statistics

import pytest
import torch

from models.answer_gain import (
    DEFAULT_CUE,
    answer_gain,
    cut_points,
    token_texts,
    tokenise_cue_answer,
)
from models.errors import ModelError
from models.estimators import get_estimator
from models.estimators.base import TraceData
from models.generate import encode_prompt


def trace_ids(lm, text: str) -> list[int]:
    return lm.tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def direct_logp(lm, prefix: list[int], tail: list[int], n_answer: int) -> float:
    """log p(answer | prefix + cue) from one fresh forward pass, no cache."""
    ids = torch.tensor([prefix + tail])
    logits = lm.model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prefix) + len(tail) - n_answer
    return sum(float(logp[i - 1, ids[0, i]]) for i in range(start, ids.shape[1]))


@pytest.fixture(scope="module")
def case(tiny_lm):
    prompt = encode_prompt(tiny_lm, "Tom has 3 apples and buys 5 more.")
    tokens = trace_ids(tiny_lm, "The answer is 8. Let me think: 3 + 5 = 8.")
    return prompt, tokens


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_matches_fresh_forward_passes(tiny_lm, case, chunk):
    prompt, tokens = case
    res = answer_gain(tiny_lm, prompt, tokens, "8", chunk=chunk, boundary="token")
    n = len(tokens)
    tail = res.params["cue_token_ids"] + res.params["answer_token_ids"]
    a = len(res.params["answer_token_ids"])
    want = [direct_logp(tiny_lm, prompt + tokens[:k], tail, a) for k in range(n + 1)]
    assert len(res.logp_answer) == n + 1 and len(res.values) == n
    assert res.logp_answer == pytest.approx(want, abs=1e-4)
    assert res.values == pytest.approx([want[t + 1] - want[t] for t in range(n)], abs=1e-4)
    assert sum(res.values) == pytest.approx(want[n] - want[0], abs=1e-4)
    assert res.params["cue"] == DEFAULT_CUE and res.params["answer"] == "8"
    assert res.params["boundary"] == "token"


@pytest.mark.parametrize("chunk", [1, 3])
def test_empty_cue_and_longer_answer(tiny_lm, case, chunk):
    prompt, tokens = case
    res = answer_gain(tiny_lm, prompt, tokens[:6], "3 + 5 = 8", cue="", chunk=chunk,
                      boundary="token")
    assert res.params["cue_token_ids"] == []
    tail = res.params["answer_token_ids"]
    assert len(tail) > 1
    want = [direct_logp(tiny_lm, prompt + tokens[:k], tail, len(tail)) for k in range(7)]
    assert res.logp_answer == pytest.approx(want, abs=1e-4)


def test_stride_reports_block_gains(tiny_lm, case):
    prompt, tokens = case
    n = len(tokens)
    full = answer_gain(tiny_lm, prompt, tokens, "8", boundary="token")
    res = answer_gain(tiny_lm, prompt, tokens, "8", stride=4, boundary="token")
    grid = sorted({*range(0, n + 1, 4), n})
    assert [k for k, v in enumerate(res.logp_answer) if v is not None] == grid
    ends = [k - 1 for k in grid[1:]]
    assert [t for t, v in enumerate(res.values) if v is not None] == ends
    for lo, hi in itertools.pairwise(grid):
        assert res.values[hi - 1] == pytest.approx(full.logp_answer[hi] - full.logp_answer[lo],
                                                   abs=1e-4)
        assert res.values[hi - 1] == pytest.approx(sum(full.values[lo:hi]), abs=1e-4)
    assert sum(v for v in res.values if v is not None) == pytest.approx(
        full.logp_answer[n] - full.logp_answer[0], abs=1e-4)
    assert res.params["stride"] == 4 and "block" in res.params["value_at"]


def test_positions_compute_exactly_those(tiny_lm, case):
    prompt, tokens = case
    full = answer_gain(tiny_lm, prompt, tokens, "8", boundary="token")
    res = answer_gain(tiny_lm, prompt, tokens, "8", positions=[5, 0, 5], boundary="token")
    assert [t for t, v in enumerate(res.values) if v is not None] == [0, 5]
    assert [k for k, v in enumerate(res.logp_answer) if v is not None] == [0, 1, 5, 6]
    assert res.values[0] == pytest.approx(full.values[0], abs=1e-4)
    assert res.values[5] == pytest.approx(full.values[5], abs=1e-4)
    assert res.params["positions"] == [5, 0, 5]


@pytest.mark.parametrize("kw, match", [
    ({"answer": "  "}, "the answer is empty"),
    ({"positions": [-1]}, "position -1 is out of range"),
    ({"positions": [99]}, "position 99 is out of range"),
    ({"stride": 0}, "stride"),
    ({"stride": 2, "positions": [1]}, "either a stride or positions"),
    ({"tokenisation": "bpe"}, "tokenisation"),
    ({"chunk": 0}, "chunk"),
    ({"boundary": "byte"}, "boundary must be one of word, token"),
])
def test_bad_input(tiny_lm, case, kw, match):
    prompt, tokens = case
    args = {"answer": "8", **kw}
    with pytest.raises(ValueError, match=match) as err:
        answer_gain(tiny_lm, prompt, tokens, args.pop("answer"), **args)
    assert "\n" not in str(err.value)


def test_tokenisation_span_is_exact(tiny_lm):
    tok = tiny_lm.tokenizer

    def dec(ids):
        return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    for answer in ["8", "apples", "42"]:
        cue_ids, ans_ids, how = tokenise_cue_answer(tok, DEFAULT_CUE, answer)
        assert dec(cue_ids) + dec(ans_ids) == DEFAULT_CUE + answer
        if how == "joint":
            assert dec(cue_ids) == DEFAULT_CUE and dec(ans_ids) == answer
        elif how.startswith("joint"):
            assert dec(ans_ids) == " " + answer
        sep = tokenise_cue_answer(tok, DEFAULT_CUE, answer, "separate")
        assert sep == (tok(DEFAULT_CUE, add_special_tokens=False)["input_ids"],
                       tok(answer, add_special_tokens=False)["input_ids"], "separate")


@pytest.mark.integration
def test_forcing_the_answer_text_gives_a_large_gain(real_lm):
    prompt = encode_prompt(real_lm, "What is 17 + 25?")
    tokens = trace_ids(real_lm, "The answer is 42.")
    res = answer_gain(real_lm, prompt, tokens, "42")
    pieces = [real_lm.tokenizer.decode([t]) for t in tokens]
    digits = [i for i, p in enumerate(pieces) if p.strip() in ("4", "2", "42")]
    assert digits, pieces
    assert res.values[digits[-1]] is not None  # the number's gain sits at its last digit
    others = [abs(v) for i, v in enumerate(res.values) if i not in digits and v is not None]
    peak = max(res.values[i] for i in digits if res.values[i] is not None)
    assert peak > 1.0
    assert peak > 5 * statistics.median(others)
    assert res.logp_answer[-1] > res.logp_answer[0]


def test_chunked_with_eager_attention(tiny_model_dir, tiny_lm, case):
    """The 4D mask of the chunked path also holds for the eager attention kernel."""
    from transformers import AutoModelForCausalLM

    from models.loading import wrap_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    lm = wrap_model(model, tiny_lm.tokenizer, name="tiny-eager")
    prompt, tokens = case
    chunked = answer_gain(lm, prompt, tokens, "8", chunk=16)
    serial = answer_gain(tiny_lm, prompt, tokens, "8", chunk=1)
    assert chunked.logp_answer == pytest.approx(serial.logp_answer, abs=1e-4)


# ---------------------------------------------------------------- word boundaries


@pytest.mark.parametrize("pieces, cuts", [
    (["The", " answer", " is", " 4", "2", ".", "\n"], [0, 1, 2, 3, 5, 6, 7]),
    (["Th", "e", " answer", " is", " ", "1", "2", "3", "4", "."], [0, 2, 3, 4, 5, 9, 10]),
    (["x", "2", "4", "a", "b", "_", "c"], [0, 1, 3, 5, 6, 7]),  # letter|digit cuts
    (["3", ".", "14", " don", "'t", "\n", "\n"], [0, 1, 2, 3, 4, 5, 6, 7]),
    (["Caf", "", "é", " ok", "", ""], [0, 3, 4, 6]),  # a split character is never cut
    (["8", ".", ""], [0, 1, 2, 3]),  # a trailing special token is a block of its own
    (["日本", "語", "。"], [0, 2, 3]),
    ([], [0]),
])
def test_cut_points_on_token_texts(pieces, cuts):
    assert cut_points(pieces) == cuts
    assert cut_points(pieces, "word") == cuts
    assert cut_points(pieces, "token") == list(range(len(pieces) + 1))


def test_cut_points_bad_boundary():
    with pytest.raises(ValueError, match="boundary must be one of word, token"):
        cut_points(["a"], "letters")


def test_token_texts_never_cut_inside_a_character(tiny_lm):
    tok = tiny_lm.tokenizer
    text = "Café naïve 😀 done"
    ids = trace_ids(tiny_lm, text)
    singles = [tok.decode([i]) for i in ids]
    assert singles == ["Ca", "fé", " naï", "ve", " \ufffd", "\ufffd", "\ufffd", " do", "n", "e"]
    pieces = token_texts(tok, ids)
    assert "".join(pieces) == text
    assert pieces[4:7] == ["", "", " 😀"]
    assert cut_points(pieces) == [0, 2, 4, 7, 10]


@pytest.fixture(scope="module")
def number_case(tiny_lm):
    """A response whose number 1234 the tokenizer splits into one token per digit."""
    prompt = encode_prompt(tiny_lm, "Tom has 3 apples and buys 5 more.")
    tokens = trace_ids(tiny_lm, "The answer is 1234. So 3 + 5 = 8.")
    pieces = [tiny_lm.tokenizer.decode([t]) for t in tokens]
    d = pieces.index("1")
    assert pieces[:2] == ["Th", "e"] and pieces[d - 1:d + 5] == [" ", "1", "2", "3", "4", "."]
    return prompt, tokens, d


def test_word_boundary_reports_whole_numbers(tiny_lm, number_case):
    prompt, tokens, d = number_case
    n = len(tokens)
    word = answer_gain(tiny_lm, prompt, tokens, "8")
    token = answer_gain(tiny_lm, prompt, tokens, "8", boundary="token")
    assert word.params["boundary"] == "word" and token.params["boundary"] == "token"
    cuts = cut_points(token_texts(tiny_lm.tokenizer, tokens))
    assert cuts[0] == 0 and cuts[-1] == n
    # Inside "1234" and "The" nothing is reported; the last digit carries the number.
    assert word.values[d:d + 3] == [None] * 3 and word.values[0] is None
    assert d in cuts and d + 4 in cuts and not {d + 1, d + 2, d + 3} & set(cuts)
    assert [t for t, v in enumerate(word.values) if v is not None] == [k - 1 for k in cuts[1:]]
    assert [k for k, v in enumerate(word.logp_answer) if v is not None] == cuts
    full = token.logp_answer
    assert word.values[d + 3] == pytest.approx(full[d + 4] - full[d], abs=1e-4)
    assert word.values[d + 3] == pytest.approx(sum(token.values[d:d + 4]), abs=1e-4)
    assert word.values[1] == pytest.approx(token.values[0] + token.values[1], abs=1e-4)
    for lo, hi in itertools.pairwise(cuts):
        assert word.values[hi - 1] == pytest.approx(full[hi] - full[lo], abs=1e-4)
    total = sum(v for v in word.values if v is not None)
    assert total == pytest.approx(full[n] - full[0], abs=1e-4)
    assert total == pytest.approx(sum(token.values), abs=1e-4)
    assert "word" in word.params["value_at"]


def test_word_boundary_with_stride_and_positions(tiny_lm, number_case):
    prompt, tokens, d = number_case
    n = len(tokens)
    cuts = cut_points(token_texts(tiny_lm.tokenizer, tokens))
    full = answer_gain(tiny_lm, prompt, tokens, "8", boundary="token").logp_answer
    res = answer_gain(tiny_lm, prompt, tokens, "8", stride=3)
    grid = [k for k, v in enumerate(res.logp_answer) if v is not None]
    assert grid[0] == 0 and grid[-1] == n and set(grid) <= set(cuts)
    assert all(hi - lo >= 3 for lo, hi in itertools.pairwise(grid[:-1]))
    assert [t for t, v in enumerate(res.values) if v is not None] == [k - 1 for k in grid[1:]]
    for lo, hi in itertools.pairwise(grid):
        assert res.values[hi - 1] == pytest.approx(full[hi] - full[lo], abs=1e-4)
    # positions: only the blocks that end at a listed position are scored.
    res = answer_gain(tiny_lm, prompt, tokens, "8", positions=[d + 1, d + 3])
    assert [t for t, v in enumerate(res.values) if v is not None] == [d + 3]
    assert [k for k, v in enumerate(res.logp_answer) if v is not None] == [d, d + 4]
    assert res.values[d + 3] == pytest.approx(full[d + 4] - full[d], abs=1e-4)


@pytest.mark.parametrize("kw", [{}, {"stride": 3}, {"positions": [0, 4, 9]}])
def test_token_boundary_is_the_per_token_path(tiny_lm, number_case, kw):
    """boundary="token" scores every prefix like the per-token estimator always did:
    the same grid as before and values equal to fresh forward passes."""
    prompt, tokens, _ = number_case
    n = len(tokens)
    res = answer_gain(tiny_lm, prompt, tokens, "8", boundary="token", **kw)
    tail = res.params["cue_token_ids"] + res.params["answer_token_ids"]
    a = len(res.params["answer_token_ids"])
    stride = kw.get("stride", 1)
    if "positions" in kw:
        ends = kw["positions"]
        grid = sorted({k for t in ends for k in (t, t + 1)})
    else:
        grid = sorted({*range(0, n + 1, stride), n})
        ends = [k - 1 for k in grid[1:]]
    assert [k for k, v in enumerate(res.logp_answer) if v is not None] == grid
    assert [t for t, v in enumerate(res.values) if v is not None] == ends
    want = {k: direct_logp(tiny_lm, prompt + tokens[:k], tail, a) for k in grid}
    assert [res.logp_answer[k] for k in grid] == pytest.approx([want[k] for k in grid],
                                                               abs=1e-4)


def test_estimator_passes_boundary_through(tiny_lm, number_case, tmp_path):
    from forkview.mi import run_estimator
    from forkview.pipeline import annotate_prompt
    from models.types import GenerationParams
    from store import Store

    assert get_estimator("answer-gain").params["boundary"] == "word"
    with pytest.raises(ModelError, match="boundary must be word or token"):
        get_estimator("answer-gain", {"boundary": "bytes"})
    prompt, tokens, _ = number_case
    n = len(tokens)
    data = TraceData(prompt, tokens, [0.0] * n, tiny_lm.tokenizer.decode(tokens),
                     reference_answer="8")
    for boundary in ("word", "token"):
        est = get_estimator("answer-gain", {"boundary": boundary})
        (chunk,) = est.run(tiny_lm, data, list(range(n)))
        direct = answer_gain(tiny_lm, prompt, tokens, "8", boundary=boundary)
        assert chunk.info["boundary"] == boundary
        assert chunk.values == pytest.approx(dict(enumerate(direct.values)), abs=1e-4)
    # A stored run carries the parameter.
    store = Store.open(tmp_path / "t.db")
    tid = annotate_prompt(tiny_lm, store, "What is 3 + 5?", GenerationParams(max_new_tokens=8),
                          answer="8").trace_id
    summary = run_estimator(tiny_lm, store, tid, get_estimator("answer-gain"))
    (run,) = store.mi_runs(tid)
    assert run.params["boundary"] == "word" and run.info["boundary"] == "word"
    assert summary.status == "complete"
