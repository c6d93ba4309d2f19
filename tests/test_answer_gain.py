"""Teacher-forced answer gain (models/answer_gain.py)."""

from __future__ import annotations

import itertools
import statistics

import pytest
import torch

from models.answer_gain import DEFAULT_CUE, answer_gain, tokenise_cue_answer
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
    res = answer_gain(tiny_lm, prompt, tokens, "8", chunk=chunk)
    n = len(tokens)
    tail = res.params["cue_token_ids"] + res.params["answer_token_ids"]
    a = len(res.params["answer_token_ids"])
    want = [direct_logp(tiny_lm, prompt + tokens[:k], tail, a) for k in range(n + 1)]
    assert len(res.logp_answer) == n + 1 and len(res.values) == n
    assert res.logp_answer == pytest.approx(want, abs=1e-4)
    assert res.values == pytest.approx([want[t + 1] - want[t] for t in range(n)], abs=1e-4)
    assert sum(res.values) == pytest.approx(want[n] - want[0], abs=1e-4)
    assert res.params["cue"] == DEFAULT_CUE and res.params["answer"] == "8"


@pytest.mark.parametrize("chunk", [1, 3])
def test_empty_cue_and_longer_answer(tiny_lm, case, chunk):
    prompt, tokens = case
    res = answer_gain(tiny_lm, prompt, tokens[:6], "3 + 5 = 8", cue="", chunk=chunk)
    assert res.params["cue_token_ids"] == []
    tail = res.params["answer_token_ids"]
    assert len(tail) > 1
    want = [direct_logp(tiny_lm, prompt + tokens[:k], tail, len(tail)) for k in range(7)]
    assert res.logp_answer == pytest.approx(want, abs=1e-4)


def test_stride_reports_block_gains(tiny_lm, case):
    prompt, tokens = case
    n = len(tokens)
    full = answer_gain(tiny_lm, prompt, tokens, "8")
    res = answer_gain(tiny_lm, prompt, tokens, "8", stride=4)
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
    full = answer_gain(tiny_lm, prompt, tokens, "8")
    res = answer_gain(tiny_lm, prompt, tokens, "8", positions=[5, 0, 5])
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
    others = [abs(v) for i, v in enumerate(res.values) if i not in digits]
    peak = max(res.values[i] for i in digits)
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
