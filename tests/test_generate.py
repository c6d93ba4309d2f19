"""Annotated generation on the tiny model, checked against independent computations.

Every per-token number is recomputed here from a plain forward pass (no KV cache) on
prompt + prefix, in float64 numpy, rather than trusted from models.generate.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from models.errors import ModelError
from models.generate import (
    Detokenizer,
    HiddenCapture,
    StopInfo,
    decoder_layers,
    encode_prompt,
    resolve_seed,
    sampling_logits,
    score_tokens,
    stream_annotated,
)
from models.loading import LoadedModel, wrap_model
from models.types import GenerationParams, TokenStep

TOL = 1e-4
PROMPT = "Tom has 3 apples and buys 5 more. How many apples?"
WARPED = GenerationParams(max_new_tokens=16, temperature=0.7, top_k=5, top_p=0.9, seed=5)


# ------------------------------------------------------------------ helpers


def generate(lm: LoadedModel, prompt_ids: Sequence[int], params: GenerationParams,
             **kw) -> tuple[list[TokenStep], str]:
    info = StopInfo()
    steps = list(stream_annotated(lm, prompt_ids, params, stop_info=info, **kw))
    return steps, info.reason


@torch.inference_mode()
def next_logits(lm: LoadedModel, ids: Sequence[int]) -> np.ndarray:
    """Logits for the token after `ids`, from a fresh full forward pass (no cache)."""
    out = lm.model(input_ids=torch.tensor([list(ids)]))
    return out.logits[0, -1].double().numpy()


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z[np.isfinite(z)].max()
    return z - np.log(np.exp(z).sum())


def entropy(z: np.ndarray) -> float:
    logp = log_softmax(z)
    p = np.exp(logp)
    keep = p > 0
    return float(-(p[keep] * logp[keep]).sum())


def warp(z: np.ndarray, params: GenerationParams) -> np.ndarray:
    """Temperature, then top-k, then top-p, written from their definitions."""
    z = z / params.temperature
    if params.top_k:
        kth = np.sort(z)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    if params.top_p < 1.0:
        order = np.argsort(-z, kind="stable")
        p = np.exp(log_softmax(z[order]))
        before = np.cumsum(p) - p  # mass of the strictly more probable tokens
        drop = before >= params.top_p
        drop[0] = False
        z = z.copy()
        z[order[drop]] = -np.inf
    return z


def hf_warp(z: np.ndarray, params: GenerationParams) -> np.ndarray:
    """The same distribution as transformers' own warpers produce it."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.tensor(z[None, :])
    dummy = torch.zeros((1, 1), dtype=torch.long)
    scores = TemperatureLogitsWarper(params.temperature)(dummy, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(dummy, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(dummy, scores)
    return scores[0].numpy()


def check_against_forward(lm: LoadedModel, prompt_ids: list[int], steps: list[TokenStep],
                          params: GenerationParams) -> None:
    ids = [s.token_id for s in steps]
    for i, step in enumerate(steps):
        z = next_logits(lm, prompt_ids + ids[:i])
        logp = log_softmax(z)
        assert step.position == i
        assert step.entropy == pytest.approx(entropy(z), abs=TOL)
        assert step.logprob == pytest.approx(logp[step.token_id], abs=TOL)
        assert step.rank == 1 + int((logp > logp[step.token_id]).sum())
        if params.greedy:
            assert step.token_id == int(z.argmax())
            assert step.rank == 1
            assert step.sampling_entropy == 0.0
        else:
            w = warp(z, params)
            assert np.isfinite(w[step.token_id]), "sampled outside the warped support"
            assert step.sampling_entropy == pytest.approx(entropy(w), abs=TOL)
        k = params.top_alternatives
        assert len(step.top) == k
        assert [a.token_id for a in step.top] == list(np.argsort(-z, kind="stable")[:k])
        probs = [a.prob for a in step.top]
        assert probs == sorted(probs, reverse=True)
        assert probs == pytest.approx(np.exp(logp[[a.token_id for a in step.top]]), abs=1e-5)
        for a in step.top:
            assert a.text == lm.tokenizer.decode([a.token_id])


def assert_pieces_concatenate(lm: LoadedModel, steps: list[TokenStep]) -> None:
    ids = [s.token_id for s in steps]
    assert "".join(s.text for s in steps) == lm.tokenizer.decode(ids, skip_special_tokens=True)


def hooks(model: torch.nn.Module) -> dict[str, tuple[list[int], list[int]]]:
    """Every forward (pre-)hook on the model, by module. Compared before and after,
    not required empty: transformers 5 installs its own output-capturing hooks for
    good the first time a forward asks for output_hidden_states."""
    return {
        name: (list(m._forward_hooks), list(m._forward_pre_hooks))
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    }


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The tiny model's ops take microseconds: with two threads on a busy two-core box
    # the thread hand-offs dominate (4-8x slower than one thread).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prompt_ids(tiny_lm) -> list[int]:
    return encode_prompt(tiny_lm, PROMPT)


# ------------------------------------------------------------------ prompts


def test_encode_prompt_uses_chat_template(tiny_lm) -> None:
    ids = encode_prompt(tiny_lm, "How many apples?")
    assert tiny_lm.tokenizer.decode(ids) == "<|user|>How many apples?<|eos|><|assistant|>"
    raw = encode_prompt(tiny_lm, "How many apples?", raw=True)
    assert tiny_lm.tokenizer.decode(raw) == "How many apples?"
    assert all(isinstance(i, int) for i in ids + raw)


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_encode_empty_prompt(tiny_lm, prompt: str) -> None:
    with pytest.raises(ModelError, match="empty"):
        encode_prompt(tiny_lm, prompt)


def test_encode_too_long_prompt(tiny_lm) -> None:
    with pytest.raises(ModelError, match="context is 512 tokens") as err:
        encode_prompt(tiny_lm, "apples and pears " * 400)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------ the annotations


def test_greedy_annotations_match_an_independent_forward(tiny_lm, prompt_ids) -> None:
    params = GenerationParams(max_new_tokens=12)
    steps, reason = generate(tiny_lm, prompt_ids, params)
    assert (len(steps), reason) == (12, "length")
    check_against_forward(tiny_lm, prompt_ids, steps, params)


def test_sampled_annotations_match_an_independent_forward(tiny_lm, prompt_ids) -> None:
    params = GenerationParams(max_new_tokens=12, temperature=1.0, seed=3, top_alternatives=4)
    steps, _ = generate(tiny_lm, prompt_ids, params)
    check_against_forward(tiny_lm, prompt_ids, steps, params)
    # At T = 1 without filters the sampled distribution *is* the model's.
    assert all(s.sampling_entropy == s.entropy for s in steps)
    assert any(s.rank > 1 for s in steps)  # it really sampled


@pytest.mark.parametrize("params", [
    WARPED,
    GenerationParams(max_new_tokens=10, temperature=1.5, seed=1),
    GenerationParams(max_new_tokens=10, temperature=1.0, top_k=3, seed=2),
    GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.5, seed=4),
], ids=["T0.7-k5-p0.9", "T1.5", "k3", "p0.5"])
def test_warped_sampling_entropy(tiny_lm, prompt_ids, params: GenerationParams) -> None:
    steps, _ = generate(tiny_lm, prompt_ids, params)
    check_against_forward(tiny_lm, prompt_ids, steps, params)
    ids = [s.token_id for s in steps]
    for i, step in enumerate(steps):
        z = next_logits(tiny_lm, prompt_ids + ids[:i])
        assert step.sampling_entropy == pytest.approx(entropy(hf_warp(z, params)), abs=TOL)
        if params.top_k:
            assert step.rank <= params.top_k
    if params.temperature < 1.0 or params.top_k or params.top_p < 1.0:
        # Narrowing the distribution lowers the entropy sampled from.
        assert sum(s.sampling_entropy for s in steps) < sum(s.entropy for s in steps)


def test_sampling_logits_equal_transformers_warpers() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=gen, dtype=torch.float64) * 4
    for params in (WARPED, GenerationParams(temperature=0.3, top_p=0.95),
                   GenerationParams(temperature=2.0, top_k=40),
                   GenerationParams(temperature=1.0, top_k=1)):
        ours = sampling_logits(logits, params).numpy()
        for row, z in zip(ours, logits.numpy(), strict=True):
            ref = hf_warp(z, params)
            assert np.array_equal(np.isinf(row), np.isinf(ref))
            assert np.allclose(row[np.isfinite(row)], ref[np.isfinite(ref)])
            assert np.array_equal(np.isfinite(row), np.isfinite(warp(z, params)))


def test_top_alternatives_count(tiny_lm, prompt_ids) -> None:
    steps, _ = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=2,
                                                               top_alternatives=0))
    assert all(s.top == [] for s in steps)
    steps, _ = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=2,
                                                               top_alternatives=3))
    assert all(len(s.top) == 3 and s.top[0].token_id == s.token_id for s in steps)


# ------------------------------------------------------------------ text pieces


def test_pieces_concatenate_and_hold_back_split_characters(tiny_lm, prompt_ids) -> None:
    # Random weights at T = 1 emit stray bytes of multi-byte characters: exactly the
    # case where decoding token by token would break the text.
    params = GenerationParams(max_new_tokens=60, temperature=1.0, seed=1)
    steps, _ = generate(tiny_lm, prompt_ids, params)
    assert_pieces_concatenate(tiny_lm, steps)
    assert any(s.text == "" for s in steps), "expected a held-back (empty) piece"
    naive = "".join(tiny_lm.tokenizer.decode([s.token_id]) for s in steps)
    assert naive != "".join(s.text for s in steps)


def test_detokenizer_on_known_multibyte_text(tiny_lm) -> None:
    tok = tiny_lm.tokenizer
    text = "Café 日本語 emoji 😀🚀🧠 and ∑ ≠ ≤, naïve."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces[-1] += detok.flush()
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    # Every piece released is final text: a prefix of the whole, never a broken char.
    released = ""
    for p in pieces:
        released += p
        assert text.startswith(released)


def test_greedy_pieces_concatenate(tiny_lm, prompt_ids) -> None:
    steps, _ = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=40))
    assert_pieces_concatenate(tiny_lm, steps)


# ------------------------------------------------------------------ determinism


def test_same_seed_same_trace(tiny_lm, prompt_ids) -> None:
    params = GenerationParams(max_new_tokens=20, temperature=1.0, seed=123)
    a, _ = generate(tiny_lm, prompt_ids, params)
    b, _ = generate(tiny_lm, prompt_ids, params)
    assert [s.to_json() for s in a] == [s.to_json() for s in b]
    c, _ = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=20, temperature=1.0,
                                                          seed=124))
    assert [s.token_id for s in a] != [s.token_id for s in c]


def test_greedy_is_deterministic(tiny_lm, prompt_ids) -> None:
    params = GenerationParams(max_new_tokens=20, seed=7)  # a seed means nothing greedy
    a, _ = generate(tiny_lm, prompt_ids, params)
    b, _ = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=20, seed=8))
    assert [s.to_json() for s in a] == [s.to_json() for s in b]


def test_resolve_seed() -> None:
    sampled = resolve_seed(GenerationParams(temperature=0.8))
    assert isinstance(sampled.seed, int)
    assert resolve_seed(sampled) == sampled  # a given seed is kept
    assert resolve_seed(GenerationParams()).seed is None  # greedy needs none


# ------------------------------------------------------------------ stopping


def with_eos(lm: LoadedModel, eos_id: int) -> LoadedModel:
    """The same weights, with `eos_id` declared an end-of-sequence token (a shallow
    copy: the shared session model is left as it is)."""
    model = copy.copy(lm.model)
    model.generation_config = copy.deepcopy(lm.model.generation_config)
    model.generation_config.eos_token_id = [eos_id]
    return wrap_model(model, lm.tokenizer, name="tiny-eos")


def test_stops_at_eos(tiny_lm, prompt_ids) -> None:
    greedy = GenerationParams(max_new_tokens=30)
    free, _ = generate(tiny_lm, prompt_ids, greedy)
    ids = [s.token_id for s in free]
    # The first position whose token did not appear before: greedy decoding must end
    # exactly there once that token counts as end-of-sequence.
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    lm = with_eos(tiny_lm, ids[k])
    assert ids[k] in lm.eos_token_ids and ids[k] not in tiny_lm.eos_token_ids
    steps, reason = generate(lm, prompt_ids, greedy)
    assert reason == "eos"
    assert [s.token_id for s in steps] == ids[: k + 1]
    assert_pieces_concatenate(lm, steps)


def test_eos_piece_is_empty(tiny_lm, prompt_ids) -> None:
    # The real end-of-sequence token is special: recorded, but it adds no text.
    eos = tiny_lm.tokenizer.eos_token_id
    scored = score_tokens(tiny_lm, prompt_ids, [eos])
    assert scored[0].text == ""


def test_stops_at_max_new_tokens(tiny_lm, prompt_ids) -> None:
    steps, reason = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=5))
    assert (len(steps), reason) == (5, "length")
    steps, reason = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=1))
    assert (len(steps), reason) == (1, "length")


def test_stops_at_context_length(tiny_lm) -> None:
    prompt = [5] * (tiny_lm.context_length - 4)
    steps, reason = generate(tiny_lm, prompt, GenerationParams(max_new_tokens=50))
    assert (len(steps), reason) == (4, "context")


def test_stops_at_stop_string(tiny_lm, prompt_ids) -> None:
    free, _ = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=40))
    texts = [s.text for s in free]
    k = next(i for i in range(3, len(texts))
             if texts[i].strip() and texts[i] not in "".join(texts[:i]))
    stop = texts[k]
    steps, reason = generate(tiny_lm, prompt_ids,
                             GenerationParams(max_new_tokens=40, stop=("@@never@@", stop)))
    assert reason == "stop_string"
    assert [s.token_id for s in steps] == [s.token_id for s in free[: k + 1]]
    text = "".join(s.text for s in steps)
    assert stop in text and stop not in "".join(s.text for s in steps[:-1])


def test_cancel_stops_early(tiny_lm, prompt_ids) -> None:
    params = GenerationParams(max_new_tokens=50)
    cancel = threading.Event()
    info = StopInfo()
    steps = []
    for step in stream_annotated(tiny_lm, prompt_ids, params, cancel=cancel, stop_info=info):
        steps.append(step)
        if len(steps) == 3:
            cancel.set()
    assert (len(steps), info.reason) == (3, "interrupted")
    full, _ = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=3))
    assert [s.token_id for s in steps] == [s.token_id for s in full]


# ------------------------------------------------------- KV cache vs teacher forcing


@pytest.mark.parametrize("params", [
    GenerationParams(max_new_tokens=24),
    GenerationParams(max_new_tokens=24, temperature=1.0, seed=9),
    WARPED,
], ids=["greedy", "T1", "warped"])
def test_generation_equals_teacher_forced_scoring(tiny_lm, prompt_ids,
                                                  params: GenerationParams) -> None:
    steps, _ = generate(tiny_lm, prompt_ids, params)
    scored = score_tokens(tiny_lm, prompt_ids, [s.token_id for s in steps], params)
    assert len(scored) == len(steps)
    for g, s in zip(steps, scored, strict=True):
        assert (g.position, g.token_id, g.text, g.rank) == (s.position, s.token_id, s.text,
                                                            s.rank)
        assert g.entropy == pytest.approx(s.entropy, abs=TOL)
        assert g.logprob == pytest.approx(s.logprob, abs=TOL)
        assert g.sampling_entropy == pytest.approx(s.sampling_entropy, abs=TOL)
        assert [a.token_id for a in g.top] == [a.token_id for a in s.top]
        assert [a.prob for a in g.top] == pytest.approx([a.prob for a in s.top], abs=1e-5)


def test_score_tokens_edges(tiny_lm, prompt_ids) -> None:
    assert score_tokens(tiny_lm, prompt_ids, []) == []
    with pytest.raises(ModelError, match="context"):
        score_tokens(tiny_lm, prompt_ids, [5] * tiny_lm.context_length)


# ------------------------------------------------------------------ hidden states


def test_decoder_layers(tiny_lm) -> None:
    assert decoder_layers(tiny_lm.model) is tiny_lm.model.model.layers


@torch.inference_mode()
def reference_hidden(lm: LoadedModel, ids: list[int], layer: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output of decoder layer `layer` from our own hook, hidden_states[layer + 1])."""
    seen = []
    block = lm.model.model.layers[layer]
    handle = block.register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    finally:
        handle.remove()
    index = layer + 1 if layer >= 0 else len(out.hidden_states) + layer
    return seen[0][0], out.hidden_states[index][0]


def test_hidden_capture_is_the_last_layer_before_the_final_norm(tiny_lm, prompt_ids) -> None:
    model = tiny_lm.model
    before = hooks(model)
    steps, _ = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=6),
                        hidden_layer=-1)
    assert hooks(model) == before
    ids = prompt_ids + [s.token_id for s in steps]
    pre_norm, post_norm = reference_hidden(tiny_lm, ids, -1)
    before = hooks(model)  # now including transformers' own
    p = len(prompt_ids)
    for i, step in enumerate(steps):
        assert step.hidden.shape == (model.config.hidden_size,)
        assert step.hidden.dtype == np.float32
        row = p - 1 + i  # the state that emitted token i
        assert np.allclose(step.hidden, pre_norm[row].numpy(), atol=TOL)
        # hidden_states[-1] is after the final norm on Llama: the capture is not it,
        # but normalising the capture gives it.
        assert not np.allclose(step.hidden, post_norm[row].numpy(), atol=1e-2)
        normed = model.model.norm(torch.from_numpy(step.hidden))
        assert torch.allclose(normed, post_norm[row], atol=TOL)
    # Teacher-forced scoring captures the same states.
    scored = score_tokens(tiny_lm, prompt_ids, [s.token_id for s in steps], hidden_layer=-1)
    for g, s in zip(steps, scored, strict=True):
        assert np.allclose(g.hidden, s.hidden, atol=TOL)
    assert hooks(model) == before


def test_hidden_capture_of_an_inner_layer(tiny_lm, prompt_ids) -> None:
    steps, _ = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=3),
                        hidden_layer=0)
    ids = prompt_ids + [s.token_id for s in steps]
    mine, hf = reference_hidden(tiny_lm, ids, 0)
    assert torch.allclose(mine, hf)  # inner layers: hidden_states[i + 1] is layer i's output
    for i, step in enumerate(steps):
        assert np.allclose(step.hidden, mine[len(prompt_ids) - 1 + i].numpy(), atol=TOL)


def test_no_hidden_without_capture(tiny_lm, prompt_ids) -> None:
    before = hooks(tiny_lm.model)
    steps, _ = generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=2))
    assert all(s.hidden is None for s in steps)
    assert hooks(tiny_lm.model) == before


def test_hooks_removed_when_generation_is_abandoned(tiny_lm, prompt_ids) -> None:
    before = hooks(tiny_lm.model)
    gen = stream_annotated(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=50),
                           hidden_layer=-1)
    next(gen)
    next(gen)
    assert hooks(tiny_lm.model) != before  # capturing while it runs
    gen.close()
    assert hooks(tiny_lm.model) == before


def test_hidden_layer_out_of_range(tiny_lm, prompt_ids) -> None:
    before = hooks(tiny_lm.model)
    with pytest.raises(ModelError, match="out of range"):
        HiddenCapture(tiny_lm.model, 2)
    with pytest.raises(ModelError, match="out of range"):
        generate(tiny_lm, prompt_ids, GenerationParams(max_new_tokens=2), hidden_layer=-3)
    assert hooks(tiny_lm.model) == before
