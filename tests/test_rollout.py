"""Rollout MI (models/rollout.py) on a synthetic LM whose answer is decided at one known
position, plus a smoke test of the cache handling on a real transformers model."""

from __future__ import annotations

import math
import random
import threading
from types import SimpleNamespace

import pytest
import torch

from models.answers import ExtractedAnswer
from models.estimators import TraceData, get_estimator
from models.generate import cache_kwarg, encode_prompt, score_tokens, stream_annotated
from models.loading import wrap_model
from models.rollout import (
    NO_ANSWER,
    RolloutResult,
    cache_from_output,
    effective_sample_size,
    fork_cache,
    group_answers,
    miller_madow_entropy,
    mutual_information,
    plugin_entropy,
    rollout_position,
    rollout_positions,
    stratified_positions,
)
from models.types import GenerationParams

WORDS = ["<eos>", "Q", "R", "step", "think", "1", "2", "x", "final", "answer:"]
EOS, Q, R, STEP, THINK, ONE, TWO, X, FINAL, ANSWER = range(len(WORDS))
ANS = -1  # placeholder in the script below: "the answer token"
LN2 = math.log(2)


def rule(history: list[int]) -> dict[int, float]:
    """Next-token distribution of the synthetic model given the whole history.

    history[0] is the prompt: Q (the coin at response index 2 decides the answer) or R
    (the answer is a fresh coin, independent of everything before). Response:
    step, {think|step} (fair, irrelevant), {1|2} (fair), [x if think], final, answer:,
    ANS, <eos>. So think-paths are one token longer than step-paths.
    """
    mode, r = history[0], history[1:]
    n = len(r)
    if n == 0:
        return {STEP: 1.0}
    if n == 1:
        return {THINK: 0.5, STEP: 0.5}
    if n == 2:
        return {ONE: 0.5, TWO: 0.5}
    tail = ([X] if r[1] == THINK else []) + [FINAL, ANSWER, ANS, EOS]
    j = n - 3
    if j >= len(tail):
        return {EOS: 1.0}
    if tail[j] == ANS:
        return {r[2]: 1.0} if mode == Q else {ONE: 0.5, TWO: 0.5}
    return {tail[j]: 1.0}


class ToyCache:
    """Keeps the token history; supports what models.rollout needs of a cache."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def get_seq_length(self) -> int:
        return self.tokens.shape[1]

    def crop(self, n: int) -> None:  # transformers 5 semantics: remove -n positions
        assert n <= 0
        if n:
            self.tokens = self.tokens[:, :n]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.tokens = self.tokens.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.tokens = self.tokens[indices]


class ToyLM(torch.nn.Module):
    """Causal LM interface as our code uses it; logits follow `rule` exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.generation_config = SimpleNamespace(eos_token_id=EOS)
        self.calls: list[tuple[int, int]] = []

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0,
                **kwargs):
        self.calls.append(tuple(input_ids.shape))
        cache = past_key_values if past_key_values is not None else ToyCache(input_ids[:, :0])
        cache.tokens = torch.cat([cache.tokens, input_ids], dim=1)
        hist = cache.tokens.tolist()
        q = input_ids.shape[1]
        keep = min(logits_to_keep, q) if logits_to_keep else q
        logits = torch.full((len(hist), keep, len(WORDS)), -1e4)
        for b, h in enumerate(hist):
            for j in range(keep):
                upto = len(h) - keep + j + 1
                for tok, p in rule(h[:upto]).items():
                    logits[b, j, tok] = math.log(p)
        return SimpleNamespace(logits=logits, past_key_values=cache)


@pytest.fixture(scope="module")
def toy():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)},
                                     unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    return wrap_model(ToyLM(), fast, name="toy")


TRACE = [STEP, THINK, ONE, X, FINAL, ANSWER, ONE, EOS]


def run(lm, position, prompt=(Q,), **kw) -> RolloutResult:
    return rollout_position(lm, list(prompt), TRACE, position, **kw)


# ---------------------------------------------------------------- recovering I_t


def test_fair_binary_fork_gives_ln2(toy):
    s = 64
    res = run(toy, 2, samples=s)
    assert sorted(a.token_id for a in res.alternatives) == [ONE, TWO]
    assert [a.weight for a in res.alternatives] == pytest.approx([0.5, 0.5])
    assert res.entropy == pytest.approx(LN2)
    # Each alternative fixes the answer: plug-in is exactly ln 2; Miller-Madow adds
    # (2 - 1) / (2 N_eff) for the mixture, N_eff = S / (0.5^2 + 0.5^2) = 2S = 128 (equal
    # weights: the total count), and nothing for the pure histograms.
    assert res.value_plugin == pytest.approx(LN2, abs=1e-9)
    assert res.value_miller_madow == pytest.approx(LN2 + 1 / (4 * s), abs=1e-9)
    assert res.value == res.value_miller_madow
    assert abs(res.value - LN2) < 0.01
    for alt in res.alternatives:
        assert {c.answer for c in alt.continuations} == {WORDS[alt.token_id]}
    assert sorted(res.classes) == ["1", "2"]
    assert res.mixture == pytest.approx([0.5, 0.5])
    assert res.mixture_n_eff == pytest.approx(2 * s)
    assert res.n_choices == 2 and not res.no_choice
    assert res.choice_entropy == pytest.approx(LN2)
    assert res.value_normalised == pytest.approx(res.value / LN2)
    assert res.n_no_answer == res.n_cut_off == 0 and res.no_answer_class is None
    plain = run(toy, 2, samples=s, miller_madow=False)
    assert plain.value == plain.value_plugin == pytest.approx(LN2)


@pytest.mark.parametrize("position", [0, 3, 4, 5, 6, 7])
def test_deterministic_positions_give_zero(toy, position):
    res = run(toy, position, samples=16)
    assert len(res.alternatives) == 1 and res.alternatives[0].emitted
    assert res.value == pytest.approx(0.0, abs=1e-12)
    assert res.value_plugin == pytest.approx(0.0, abs=1e-12)
    assert res.entropy == pytest.approx(0.0, abs=1e-6)
    # No choice: zero by construction, flagged, and not normalisable.
    assert res.n_choices == 1 and res.no_choice
    assert res.value == res.value_plugin == res.value_miller_madow == 0.0
    assert res.choice_entropy == 0.0 and res.value_normalised is None
    assert res.details()["no_choice"] is True and res.details()["n_choices"] == 1


def test_irrelevant_choice_gives_about_zero(toy):
    # Position 1 is a fair choice (think/step) that does not decide the answer; the
    # answer is decided later by a fair coin, so the true I_1 = 0.
    res = run(toy, 1, samples=64)
    assert len(res.alternatives) == 2
    assert abs(res.value_plugin) < 0.05 and abs(res.value_miller_madow) < 0.05
    assert {c.answer for a in res.alternatives for c in a.continuations} == {"1", "2"}


def test_plugin_bias_and_miller_madow_on_the_model(toy):
    # Mode R: the answer is a coin independent of the choice at position 2 (true I = 0).
    # The plug-in JSD is >= 0, biased up by about (K-1)(M-1)/(2N) = 1/(4S); Miller-Madow
    # removes that first-order term.
    s = 8
    plug, mm = [], []
    for seed in range(30):
        res = rollout_position(toy, [R], TRACE, 2, samples=s, seed=seed)
        plug.append(res.value_plugin)
        mm.append(res.value_miller_madow)
    mean_plug, mean_mm = sum(plug) / len(plug), sum(mm) / len(mm)
    assert min(plug) >= 0
    assert mean_plug > 0.01
    assert abs(mean_mm) < mean_plug / 2


def test_plugin_bias_simulated():
    rng = random.Random(1)
    s, reps = 8, 3000
    plug = mm = 0.0
    for _ in range(reps):
        counts = []
        for _ in range(2):
            heads = sum(rng.random() < 0.5 for _ in range(s))
            counts.append([heads, s - heads])
        plug += mutual_information(counts, [0.5, 0.5], miller_madow=False)
        mm += mutual_information(counts, [0.5, 0.5], miller_madow=True)
    plug, mm = plug / reps, mm / reps
    assert plug == pytest.approx(1 / (4 * s), rel=0.25)  # the known first-order bias
    assert abs(mm) < 0.3 * plug


# ---------------------------------------------------------------- estimator arithmetic


def test_miller_madow_by_hand():
    counts, weights = [[3, 1], [0, 4]], [1, 3]  # weights renormalise to 0.25, 0.75
    h_mix = -(0.1875 * math.log(0.1875) + 0.8125 * math.log(0.8125))
    h_1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    plug = h_mix - 0.25 * h_1
    # Mixture: K = 2 classes over Kish's N_eff = S / sum p~^2 = 4 / (0.0625 + 0.5625)
    # = 6.4 samples (science.md §6; the first version used all 8 samples, which
    # overstates the mixture's sample size when the weights are unequal: 1 / 16 instead
    # of 1 / 12.8); alternative 1: K = 2, N = 4; alternative 2: K = 1 (no correction).
    mm = (h_mix + 1 / 12.8) - 0.25 * (h_1 + 1 / 8) - 0.75 * 0.0
    mm_total = (h_mix + 1 / 16) - 0.25 * (h_1 + 1 / 8)
    assert plug == pytest.approx(0.341994, abs=1e-6)
    assert mm == pytest.approx(0.388869, abs=1e-6)
    assert mm_total == pytest.approx(0.373244, abs=1e-6)
    assert effective_sample_size(weights, [4, 4]) == pytest.approx(6.4)
    assert mutual_information(counts, weights, miller_madow=False) == pytest.approx(plug)
    assert mutual_information(counts, weights) == pytest.approx(mm)
    assert mutual_information(counts, weights, mixture_n="total") == pytest.approx(mm_total)
    assert plugin_entropy([3, 1]) == pytest.approx(h_1)
    assert miller_madow_entropy([3, 1]) == pytest.approx(h_1 + 1 / 8)
    assert miller_madow_entropy([0, 4]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        mutual_information([[0, 0]], [1.0])


def test_effective_sample_size_by_hand():
    # One dominant alternative: N_eff -> S; equal weights: S x M.
    assert effective_sample_size([1.0], [8]) == pytest.approx(8)
    assert effective_sample_size([1, 1, 1, 1], [8] * 4) == pytest.approx(32)
    assert effective_sample_size([0.98, 0.01, 0.01], [8] * 3) == pytest.approx(
        8 / (0.98**2 + 2 * 0.01**2))
    # Unequal sizes: 1 / sum p~^2 / n = 1 / (0.25 / 4 + 0.25 / 12) = 12.
    assert effective_sample_size([1, 1], [4, 12]) == pytest.approx(12)
    # Three alternatives, weights 0.5 / 0.3 / 0.2, S = 5, classes a / b / no answer.
    counts, weights = [[5, 0, 0], [2, 2, 1], [0, 0, 5]], [0.5, 0.3, 0.2]
    mix = [0.5 + 0.3 * 0.4, 0.3 * 0.4, 0.3 * 0.2 + 0.2]
    h_mix = -sum(p * math.log(p) for p in mix)
    h_2 = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))
    n_eff = 5 / (0.25 + 0.09 + 0.04)
    by_hand = (h_mix + 2 / (2 * n_eff)) - 0.3 * (h_2 + 2 / 10)
    assert mutual_information(counts, weights) == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="mixture_n"):
        mutual_information(counts, weights, mixture_n="all")


def test_group_answers_greedy_with_equivalence():
    labels, reps = group_answers(["42", "42.0", None, "x", "1/2", "0.5", None])
    assert reps == ["42", None, "x", "1/2"]
    assert labels == [0, 0, 1, 2, 3, 3, 1]
    # "No answer" never asks the equivalence and never matches an answer.
    labels, reps = group_answers([None, "5"], equivalent=lambda a, b: True)
    assert reps == [NO_ANSWER, "5"] and labels == [0, 1]


# ---------------------------------------------------------------- batching and seeds


def test_one_batch_with_per_row_eos_and_compaction(toy):
    toy.model.calls.clear()
    res = run(toy, 1, samples=4)
    # Prefix [Q, step] encoded once; then the 8 rows step together. Step rows end at
    # the 5th sampled token, leaving 4 of 8 alive: the batch is compacted to 4.
    assert toy.model.calls == [(1, 2)] + [(8, 1)] * 5 + [(4, 1)]
    for alt in res.alternatives:
        for c in alt.continuations:
            coin = c.token_ids[1]
            assert coin in (ONE, TWO)
            body = [X] if alt.token_id == THINK else []
            assert c.token_ids == [alt.token_id, coin, *body, FINAL, ANSWER, coin, EOS]
            assert c.stop_reason == "eos"
            assert c.answer == WORDS[coin] and c.answer_method == "final_answer"
            assert c.text == " ".join(WORDS[t] for t in c.token_ids[:-1])
            assert [s.position for s in c.steps] == list(range(1, 1 + len(c.token_ids)))
            assert c.steps[0].logprob == pytest.approx(math.log(0.5))
            assert c.steps[0].entropy == pytest.approx(LN2)
            assert c.steps[1].logprob == pytest.approx(math.log(0.5))
            assert c.steps[2].logprob == pytest.approx(0.0, abs=1e-6)
    assert res.generated_tokens == 4 * 6 + 4 * 5


def test_prefix_cache_is_used_and_left_unchanged(toy):
    prefix = [Q, *TRACE[:2]]
    out = toy.model(input_ids=torch.tensor([prefix]), use_cache=True)
    cache = out.past_key_values
    toy.model.calls.clear()
    res = rollout_position(toy, [Q], TRACE, 2, samples=4, prefix_cache=cache)
    assert toy.model.calls[0] == (1, 1)  # only the last prefix token is re-fed
    assert cache.tokens.tolist() == [prefix]
    fresh = run(toy, 2, samples=4)
    assert [c.token_ids for a in res.alternatives for c in a.continuations] == \
        [c.token_ids for a in fresh.alternatives for c in a.continuations]
    with pytest.raises(ValueError, match="prefix_cache holds"):
        rollout_position(toy, [Q], TRACE, 3, prefix_cache=cache)


def test_same_seed_same_continuations(toy):
    def conts(seed):
        res = run(toy, 1, samples=8, seed=seed)
        return [c.token_ids for a in res.alternatives for c in a.continuations]

    assert conts(3) == conts(3)
    assert conts(3) != conts(4)


def test_limits_and_answer_scope(toy):
    res = run(toy, 1, samples=2, max_new_tokens=2)
    for a in res.alternatives:
        for c in a.continuations:
            assert len(c.token_ids) == 3 and c.stop_reason == "length"
    # After the answer is written, the continuation alone holds no answer; the
    # response it completes does.
    whole = run(toy, 7, samples=2)
    alone = run(toy, 7, samples=2, answer_scope="continuation")
    assert [c.answer for c in whole.alternatives[0].continuations] == ["1", "1"]
    assert [c.answer for c in alone.alternatives[0].continuations] == [None, None]
    assert whole.classes == ["1"] and alone.classes == [None]
    # An empty EOS set: rows run to max_new_tokens.
    fixed = run(toy, 5, samples=2, max_new_tokens=4, eos_token_ids=())
    assert [len(c.token_ids) for c in fixed.alternatives[0].continuations] == [5, 5]


def test_cut_off_continuations_are_no_answer(toy):
    # Cut off after 2 sampled tokens: "step think 1 x" holds a number but states no
    # answer, so it is "no answer" (the number is kept as dropped_answer).
    res = run(toy, 1, samples=2, max_new_tokens=2)
    conts = [c for a in res.alternatives for c in a.continuations]
    assert all(c.cut_off and c.stop_reason == "length" for c in conts)
    assert all(c.answer is None and c.answer_method == "cut_off" for c in conts)
    assert {c.dropped_answer for c in conts} <= {"1", "2"}
    assert res.classes == [NO_ANSWER] and res.no_answer_class == 0
    assert res.n_no_answer == res.n_cut_off == 4
    assert [a.n_cut_off for a in res.alternatives] == [2, 2]
    assert [a.counts for a in res.alternatives] == [[2], [2]]
    assert res.params["cut_off_answers"] == "explicit"
    # The first version's behaviour: the last number is the answer.
    anyway = run(toy, 1, samples=2, max_new_tokens=2, cut_off_answers="any")
    assert all(c.answer in ("1", "2") and c.answer_method == "last_number"
               for a in anyway.alternatives for c in a.continuations)
    assert anyway.n_no_answer == 0
    # Cut off after an explicit "answer: 1" (no EOS at all): kept under "explicit",
    # dropped under "none".
    fixed = run(toy, 5, samples=2, max_new_tokens=4, eos_token_ids=())
    conts = fixed.alternatives[0].continuations
    assert [(c.cut_off, c.answer, c.answer_method) for c in conts] == \
        [(True, "1", "final_answer")] * 2
    strict = run(toy, 5, samples=2, max_new_tokens=4, eos_token_ids=(),
                 cut_off_answers="none")
    assert [(c.answer, c.dropped_answer) for c in strict.alternatives[0].continuations] == \
        [(None, "1")] * 2
    # A finished row keeps its last-number answer; a bare-string extractor states
    # nothing explicitly, so its answer of a cut-off row is dropped.
    bare = run(toy, 1, samples=2, max_new_tokens=2, extract=lambda text: "7")
    assert bare.n_no_answer == 4
    boxed = run(toy, 1, samples=2, max_new_tokens=2,
                extract=lambda text: ExtractedAnswer("7", "boxed"))
    assert boxed.n_no_answer == 0 and boxed.classes == ["7"]
    with pytest.raises(ValueError, match="cut_off_answers"):
        run(toy, 1, cut_off_answers="some")


def test_no_answer_is_an_outcome_class(toy):
    # An extractor that finds no answer in the responses through "2": those are "no
    # answer", an outcome like "1", so the fork still carries ln 2 about the outcome.
    def only_ones(text):
        return ExtractedAnswer("1", "final_answer") if "answer: 1" in text else None

    res = run(toy, 2, samples=4, extract=only_ones)
    by_token = {a.token_id: a for a in res.alternatives}
    assert res.no_answer_class is not None and res.classes[res.no_answer_class] is NO_ANSWER
    assert by_token[TWO].counts[res.no_answer_class] == 4
    assert by_token[ONE].counts[res.no_answer_class] == 0
    assert all(not c.cut_off and c.answer is None and c.dropped_answer is None
               for c in by_token[TWO].continuations)
    assert res.n_no_answer == 4 and res.n_cut_off == 0 and res.n_choices == 2
    assert res.value_plugin == pytest.approx(LN2)
    assert res.mixture[res.no_answer_class] == pytest.approx(0.5)
    # An explicit alternative the model gives probability 0 is no choice.
    dead = run(toy, 3, samples=2, alternatives=[EOS])
    assert len(dead.alternatives) == 2 and dead.n_choices == 1 and dead.no_choice
    assert dead.value == 0.0 and dead.choice_entropy == 0.0


def test_estimator_details_and_params(toy):
    est = get_estimator("rollout", {"samples": 2, "max_new_tokens": 3, "keep_tokens": False})
    assert est.params["mixture_n"] == "kish" and est.params["cut_off_answers"] == "explicit"
    data = TraceData(prompt_ids=[Q], token_ids=TRACE, entropies=[0.0] * len(TRACE),
                     text=" ".join(WORDS[t] for t in TRACE))
    chunks = {pos: c for c in est.run(toy, data, [2, 4]) for pos in c.values}
    fork, fixed = chunks[2].details[2], chunks[4].details[4]
    assert fork["n_choices"] == 2 and fork["no_choice"] is False
    assert fork["choice_entropy"] == pytest.approx(LN2)
    assert fork["value_normalised"] == pytest.approx(chunks[2].values[2] / LN2)
    assert fork["mixture_n_eff"] == pytest.approx(4.0)
    assert fixed["n_choices"] == 1 and fixed["no_choice"] is True
    assert chunks[4].values[4] == 0.0 and fixed["value_normalised"] is None
    for d in (fork, fixed):
        assert {"n_no_answer", "n_cut_off", "no_answer_class"} <= set(d)
        assert all("n_cut_off" in a for a in d["alternatives"])
    info = chunks[2].info
    assert info["mixture_n"] == "kish" and info["cut_off_answers"] == "explicit"
    assert info["no_answer"] == "class"
    for bad in ({"mixture_n": "all"}, {"cut_off_answers": "some"}):
        with pytest.raises(Exception, match=next(iter(bad))):
            get_estimator("rollout", bad)


def test_explicit_alternatives_and_custom_extractor(toy):
    res = run(toy, 2, samples=2, alternatives=[TWO],
              extract=lambda text: text.split()[-1] if text else None)
    assert {a.token_id for a in res.alternatives} == {ONE, TWO}  # the emitted one is added
    assert {c.answer for a in res.alternatives for c in a.continuations} == {"1", "2"}
    assert res.params["alternatives"] == "explicit"


@pytest.mark.parametrize("kw, match", [
    ({"samples": 0}, "samples"),
    ({"min_prob": 0.0}, "min_prob"),
    ({"temperature": 0.0}, "temperature"),
    ({"answer_scope": "all"}, "answer_scope"),
])
def test_bad_parameters(toy, kw, match):
    with pytest.raises(ValueError, match=match):
        run(toy, 1, **kw)


def test_positions_checks_arguments_first(toy):
    with pytest.raises(TypeError):
        list(rollout_positions(toy, [Q], TRACE, [1], sampels=4))
    with pytest.raises(ValueError, match="samples"):
        list(rollout_positions(toy, [Q], TRACE, [1], samples=0))


@pytest.mark.parametrize("position", [-1, len(TRACE)])
def test_position_out_of_range(toy, position):
    with pytest.raises(ValueError, match="out of range"):
        run(toy, position)
    with pytest.raises(ValueError, match="out of range"):
        list(rollout_positions(toy, [Q], TRACE, [1, position]))


def test_positions_descending_with_one_prefix_encoding(toy):
    toy.model.calls.clear()
    results = list(rollout_positions(toy, [Q], TRACE, [2, 0, 5, 2], samples=4, seed=9))
    assert [r.position for r in results] == [5, 2, 0]
    # The prefix up to position 5 is encoded once; each position re-feeds one token.
    prefix_calls = [c for c in toy.model.calls if c[0] == 1]
    assert prefix_calls[0] == (1, 1 + 5)
    assert all(c == (1, 1) for c in prefix_calls[1:])
    for r in results:
        alone = run(toy, r.position, samples=4, seed=9)
        assert [c.token_ids for a in r.alternatives for c in a.continuations] == \
            [c.token_ids for a in alone.alternatives for c in a.continuations]
        assert r.value == pytest.approx(alone.value)
    assert results[1].value_plugin == pytest.approx(LN2)


def test_cancel_stops_quietly(toy):
    cancel = threading.Event()
    it = rollout_positions(toy, [Q], TRACE, [1, 2, 3], samples=2, cancel=cancel)
    first = next(it)
    cancel.set()
    assert first.position == 3
    assert list(it) == []


# ---------------------------------------------------------------- stratified positions


def test_stratified_positions():
    ent = [0.1, 0.9, 0.5, 0.9, 0.2, 0.0, 0.3, 0.4, 0.05, 0.6]
    pos = stratified_positions(ent, rho=0.2, seed=1)
    assert pos == sorted(pos) and len(pos) == 4 and {1, 3} <= set(pos)
    assert pos == stratified_positions(ent, rho=0.2, seed=1)
    assert any(stratified_positions(ent, rho=0.2, seed=s) != pos for s in range(2, 12))
    # Ties at the threshold are all high; controls are capped by what is left.
    assert stratified_positions([0.5] * 5 + [0.1] * 5, rho=0.2) == list(range(10))
    assert stratified_positions([1.0, 1.0, 1.0, 0.0], rho=0.5) == [0, 1, 2, 3]
    few = stratified_positions([0.3, 0.7, 0.1], rho=0.2)  # ceil(0.6) = 1 high, 1 control
    assert len(few) == 2 and 1 in few
    assert stratified_positions([]) == []
    with pytest.raises(ValueError, match="rho"):
        stratified_positions(ent, rho=0.0)


# ---------------------------------------------------------------- real transformers cache


def test_real_cache_smoke(tiny_lm):
    """With a real Llama and DynamicCache: each continuation's step log-probs equal a
    teacher-forced rescoring from scratch (so repeat, crop and compaction kept the
    right cache rows), and the cropped-prefix path equals the fresh one."""
    prompt = encode_prompt(tiny_lm, "Tom has 3 apples and buys 5 more.")
    trace = [s.token_id for s in stream_annotated(
        tiny_lm, prompt, GenerationParams(max_new_tokens=8, temperature=0.0))]
    vocab = len(tiny_lm.tokenizer)
    # Half the vocabulary as EOS: rows stop at different steps, so the batch compacts.
    eos = set(range(0, vocab, 2))
    kw = dict(samples=3, max_new_tokens=6, seed=5, eos_token_ids=eos,
              alternatives=[trace[4] ^ 1, 7])
    res = rollout_position(tiny_lm, prompt, trace, 4, **kw)
    lengths = {len(c.token_ids) for a in res.alternatives for c in a.continuations}
    assert len(lengths) > 1
    for alt in res.alternatives:
        for c in alt.continuations:
            ref = score_tokens(tiny_lm, prompt + trace[:4], c.token_ids)
            assert [s.logprob for s in c.steps] == pytest.approx(
                [s.logprob for s in ref], abs=1e-4)
            assert [s.entropy for s in c.steps] == pytest.approx(
                [s.entropy for s in ref], abs=1e-4)
    (via_crop,) = [r for r in rollout_positions(tiny_lm, prompt, trace, [6, 4], **kw)
                   if r.position == 4]
    assert [c.token_ids for a in via_crop.alternatives for c in a.continuations] == \
        [c.token_ids for a in res.alternatives for c in a.continuations]


def test_fork_cache_leaves_the_original(tiny_lm):
    ids = torch.tensor([[5, 6, 7, 8]])
    out = tiny_lm.model(input_ids=ids, use_cache=True)
    cache = cache_from_output(out)
    keys = cache.layers[0].keys.clone()
    new = fork_cache(cache, 3)
    new.crop(-1)
    tiny_lm.model(input_ids=torch.tensor([[1], [2], [3]]), use_cache=True,
                  **{cache_kwarg(tiny_lm.model): new})
    assert cache.get_seq_length() == 4 and new.get_seq_length() == 4
    assert new.layers[0].keys.shape[0] == 3
    assert torch.equal(cache.layers[0].keys, keys)


def test_counterfactual_on_the_toy(toy):
    # Position 2 decides the answer (fair coin): keeping the token fixes the answer,
    # redrawing it changes it half the time. Position 1 is a fair but irrelevant choice:
    # keep and redraw lead to the same fair coin, importance about 0 (the distinct-pair
    # baseline is unbiased, so no upward drift from sampling noise).
    fork = run(toy, 2, samples=32, reference_answer="1").counterfactual
    assert fork["p_change_baseline"] == 0.0
    assert fork["importance"] == pytest.approx(0.5) == fork["p_change"] == fork["tv"]
    assert fork["accuracy_keep"] == 1.0 and fork["accuracy_redraw"] == pytest.approx(0.5)
    assert fork["n_keep"] == 32 and fork["n_redraw"] == 64
    draws = [run(toy, 1, samples=16, seed=s).counterfactual["importance"] for s in range(20)]
    assert abs(sum(draws) / len(draws)) < 0.05
    fixed = run(toy, 4, samples=4).counterfactual
    assert fixed["importance"] == fixed["tv"] == 0.0 and fixed["accuracy_keep"] is None
    assert "counterfactual" in run(toy, 4, samples=2).details()
