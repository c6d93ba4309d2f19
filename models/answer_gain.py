"""Teacher-forced answer gain: how much token t raised the model's belief in the answer.

science.md §4. With L(k) = log p(a | prompt + x_<k + cue), teacher-forced, natural log,
summed over the answer's tokens, the gain of token t is

    g_t = L(t + 1) - L(t) = log p(a | x_<=t, cue) - log p(a | x_<t, cue),

a pointwise information gain of token t about the answer a, aligned like entropy (the
value at t belongs to the step that emitted t). The gains telescope: their sum over a
trace is L(n) - L(0).

Cost: one forward pass over prompt + trace fills a KV cache; then for each needed k,
in descending order, the cache is cropped to prompt + x_<k minus one position and
only [x_(k-1)] + cue + answer is run (the re-fed last prefix token yields the logits
that predict the cue's first token, so an empty cue works too). Nothing else is
re-encoded. ``chunk`` (default 16) values of k share one forward pass: their blocks
are laid side by side after the cache, each masked (4D attention mask, explicit
position ids) to see only the cache up to its own prefix and itself, which is the
same computation with fewer, larger matrix products. ``chunk=1`` runs one k per
pass (also used for attention implementations that take no 4D mask).

Stride: with ``stride=s`` L is computed only at the ends of blocks of (at least, see
below) s tokens, and a value is reported at the last token t of each block:
values[t] = L(t + 1) - L(start of the block), the gain of the block of tokens ending
at t. Other positions are None; the values still sum to L(n) - L(0). ``positions``
instead computes only the values of the blocks that end at the listed t (stride 1
only; with ``boundary="token"`` that is g_t exactly at the listed t).

Tokenisation of cue + answer (``tokenisation``, recorded in ``params``):
- "auto" (default): tokenise cue + answer as one text, as the model would see it, and
  use it when its tokens split exactly at the cue/answer boundary (decoding each side
  gives back the cue and the answer). If not, and the cue ends in whitespace, the
  whitespace is moved to the front of the answer and that is tried ("\\nFinal answer:"
  + " Paris" tokenises " Paris" as one token, as in running text). Otherwise:
- "separate": cue and answer tokenised separately and concatenated. The span is exact,
  but the pieces may be ones the model never sees in text (":" + " " + "Paris").
Either way the answer span is exactly ``answer_token_ids``.

Word boundaries (``boundary``, recorded in ``params``): the cue follows x_<k, so a cut
inside a word or a number glues the cue onto half of it ("... is 4" + cue scores "42"
low: the "4" would get a negative gain and the "2" a large one).
- "word" (default): the cue goes only at cut points k between words. The cut between
  tokens k-1 and k is one unless the text of token k-1 ends with a digit and the text
  after the cut starts with one, or both are letters (str.isalpha). So "4"|"2" and
  "Th"|"e" are inside a word, while a token starting with whitespace or punctuation
  (" 4", " answer", ".", "\\n") starts a new one, as does a letter after a digit or a
  digit after a letter. Token texts come from incremental decoding
  (models.generate.Detokenizer), so a character split across tokens is never cut: a
  token without text of its own yet (leading bytes of a character, a special token)
  is never followed by a cut. 0 and n are always cut points. The blocks of ``stride``
  end at cut points, each at the first cut at least ``stride`` tokens after the
  previous one. With stride 1: a word or number of several tokens gets
  L(end) - L(start) at its last token and None at the others; the values still sum
  to L(n) - L(0), and only cut points are scored (fewer passes).
- "token": every k is a cut point: g_t at every token, exactly as before.
Only words and numbers are kept whole: "3.14" is cut at the ".", "don't" at the "'".
A trailing EOS token is scored like any other (a block of its own); callers that
store it may want to leave it out.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.errors import ModelError
from models.generate import Detokenizer, cache_kwarg
from models.loading import LoadedModel
from models.rollout import cache_from_output, crop_cache

DEFAULT_CUE = "\nFinal answer: "
TOKENISATIONS = ("auto", "separate")
BOUNDARIES = ("word", "token")


@dataclass
class AnswerGainResult:
    values: list[float | None]  # g per token position t = 0..n-1; None: not computed
    logp_answer: list[float | None]  # L(k) for prefix lengths k = 0..n; None: not computed
    params: dict[str, Any]


def tokenise_cue_answer(
    tokenizer: Any, cue: str, answer: str, tokenisation: str = "auto"
) -> tuple[list[int], list[int], str]:
    """(cue ids, answer ids, how they were obtained); see the module docstring."""
    if tokenisation not in TOKENISATIONS:
        raise ValueError(f"tokenisation must be one of {', '.join(TOKENISATIONS)}, "
                         f"not {tokenisation!r}")

    def enc(text: str) -> list[int]:
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

    def dec(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    if tokenisation == "auto":
        candidates = [(cue, answer, "joint")]
        stripped = cue.rstrip()
        if stripped != cue:
            candidates.append((stripped, cue[len(stripped):] + answer,
                               "joint, the cue's trailing whitespace moved into the answer"))
        for c, a, how in candidates:
            ids = enc(c + a)
            for k in range(len(ids)):
                head = dec(ids[:k])
                if head == c and dec(ids[k:]) == a:
                    return ids[:k], ids[k:], how
                if len(head) > len(c):
                    break
    return enc(cue), enc(answer), "separate"


def _kind(ch: str) -> str | None:
    if ch.isdigit():
        return "digit"
    if ch.isalpha():
        return "letter"
    return None


def cut_points(pieces: Sequence[str], boundary: str = "word") -> list[int]:
    """The prefix lengths k (0..n, ascending) after which the cue may be inserted, for
    a trace whose tokens decode to ``pieces`` (module docstring, "Word boundaries")."""
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {', '.join(BOUNDARIES)}, "
                         f"not {boundary!r}")
    n = len(pieces)
    if boundary == "token" or n == 0:
        return list(range(n + 1))
    # first[k]: the kind of the first character of the text from token k on.
    first: list[str | None] = [None] * (n + 1)
    for k in range(n - 1, -1, -1):
        first[k] = _kind(pieces[k][0]) if pieces[k] else first[k + 1]
    cuts = [0]
    for k in range(1, n):
        left = pieces[k - 1]
        if not left:
            continue  # token k-1 has no text of its own yet: a later token carries it
        kind = _kind(left[-1])
        if kind is None or kind != first[k]:
            cuts.append(k)
    cuts.append(n)
    return cuts


def token_texts(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """The text of each token, decoded incrementally: the pieces concatenate to the
    decoded trace, a character split across tokens is carried by its last token."""
    detok = Detokenizer(tokenizer)
    for i in token_ids:
        detok.push(int(i))
    detok.flush()
    return detok.emitted


def _plan(
    cuts: list[int], stride: int, positions: Sequence[int] | None
) -> tuple[list[int], list[tuple[int, int, int]]]:
    """The prefix lengths k to score, and (t, k_hi, k_lo) per reported value: blocks
    end at cut points (the last is n), each at least `stride` tokens long but the
    last; with `positions`, only the blocks that end at a listed t."""
    grid = [0]
    for k in cuts[1:]:
        if k - grid[-1] >= stride:
            grid.append(k)
    if grid[-1] != cuts[-1]:
        grid.append(cuts[-1])
    pairs = [(hi - 1, hi, lo) for lo, hi in itertools.pairwise(grid)]
    if positions is not None:
        wanted = set(positions)
        pairs = [pair for pair in pairs if pair[0] in wanted]
    ks = sorted({k for _, hi, lo in pairs for k in (hi, lo)} or {0})
    return ks, pairs


def _attn_takes_4d_masks(model: Any) -> bool:
    impl = str(getattr(model.config, "_attn_implementation", "") or "")
    return "flash" not in impl and "flex" not in impl


def _score(
    model: Any, ids: list[int], p: int, ks: list[int], tail: list[int], a: int, chunk: int
) -> dict[int, float]:
    """L(k) for each k in ks (ascending): log p(tail's last a tokens | ids[:p+k] + the
    rest of tail). The KV cache of ids[:p+max(ks)-1] is built once; each k then runs
    [ids[p+k-1]] + tail on top of the cache cropped to p+k-1. With chunk > 1, up to
    `chunk` values of k share one forward pass: their blocks are laid side by side,
    each seeing the cache up to its own p+k-1 and itself (a 4D mask, explicit
    position ids); the cache is cropped back afterwards.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    kv = cache_kwarg(model)
    target = torch.tensor(tail[len(tail) - a:], device=device)
    width = 1 + len(tail)  # block: re-fed prefix token, cue, answer
    cache = None
    start = p + ks[-1] - 1  # the cache holds everything before the re-fed token
    if start > 0:
        out = model(input_ids=torch.tensor([ids[:start]], device=device), use_cache=True,
                    logits_to_keep=1)
        cache = cache_from_output(out)
    if cache is None or not _attn_takes_4d_masks(model):
        chunk = 1
    scores: dict[int, float] = {}
    desc = list(reversed(ks))
    for g in range(0, len(desc), chunk):
        group = desc[g:g + chunk]
        kw: dict[str, Any] = {}
        if cache is not None:
            crop_cache(cache, p + group[0] - 1)
            kw = {kv: cache}
        feed = torch.tensor([[x for k in group for x in (ids[p + k - 1], *tail)]],
                            device=device)
        # Block offset j predicts offset j+1; answer token i sits at offset
        # width - a + i, so it is predicted from offset width - a - 1 + i.
        rows = torch.tensor([b * width + width - a - 1 + i for b in range(len(group))
                             for i in range(a)], device=device)
        if len(group) == 1:
            out = model(input_ids=feed, use_cache=True, logits_to_keep=a + 1, **kw)
            logits = out.logits[0, :a, :]
        else:
            past = p + group[0] - 1
            q = feed.shape[1]
            mask = torch.full((q, past + q), torch.finfo(dtype).min, dtype=dtype,
                              device=device)
            causal = torch.triu(torch.full((width, width), torch.finfo(dtype).min,
                                           dtype=dtype, device=device), diagonal=1)
            position_ids = torch.empty((1, q), dtype=torch.long, device=device)
            for b, k in enumerate(group):
                r = slice(b * width, (b + 1) * width)
                mask[r, : p + k - 1] = 0
                mask[r, past + b * width : past + (b + 1) * width] = causal
                position_ids[0, r] = torch.arange(p + k - 1, p + k - 1 + width)
            out = model(input_ids=feed, position_ids=position_ids,
                        attention_mask=mask[None, None], use_cache=True,
                        logits_to_keep=rows, **kw)
            logits = out.logits[0]
        cache = cache_from_output(out)
        lp = torch.log_softmax(logits.float(), dim=-1).view(len(group), a, -1)
        got = lp.gather(-1, target.expand(len(group), a)[..., None])[..., 0].sum(-1)
        scores.update(zip(group, got.tolist(), strict=True))
    return scores


@torch.inference_mode()
def answer_gain(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    token_ids: Sequence[int],
    answer: str,
    *,
    cue: str = DEFAULT_CUE,
    stride: int = 1,
    positions: Sequence[int] | None = None,
    tokenisation: str = "auto",
    boundary: str = "word",
    chunk: int = 16,
) -> AnswerGainResult:
    """g_t and L(k) for the trace ``token_ids`` after ``prompt_ids`` (module docstring).

    Raises ValueError for an empty answer or prompt, a stride below 1, positions out of
    range or given together with a stride, an unknown boundary, and ModelError when
    prompt + trace + cue + answer does not fit the model's context.
    """
    answer = (answer or "").strip()
    if not answer:
        raise ValueError("the answer is empty")
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, not {stride}")
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {', '.join(BOUNDARIES)}, "
                         f"not {boundary!r}")
    n = len(token_ids)
    if positions is not None:
        if stride != 1:
            raise ValueError("give either a stride or positions, not both")
        bad = [t for t in positions if not 0 <= int(t) < n]
        if bad:
            raise ValueError(f"position {bad[0]} is out of range (the trace has {n} tokens)")
        positions = [int(t) for t in positions]
    cue_ids, answer_ids, how = tokenise_cue_answer(lm.tokenizer, cue, answer, tokenisation)
    if not answer_ids:
        raise ValueError(f"the answer {answer!r} has no tokens")
    pieces = token_texts(lm.tokenizer, token_ids) if boundary == "word" else [""] * n
    ks, pairs = _plan(cut_points(pieces, boundary), stride, positions)
    ids = [int(i) for i in prompt_ids] + [int(i) for i in token_ids]
    p = len(prompt_ids)
    tail = cue_ids + answer_ids
    if lm.context_length and p + ks[-1] + len(tail) > lm.context_length:
        raise ModelError(f"prompt + {ks[-1]} tokens + cue + answer are "
                         f"{p + ks[-1] + len(tail)} tokens but the model's context is "
                         f"{lm.context_length} tokens")

    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, not {chunk}")
    scores = _score(lm.model, ids, p, ks, tail, len(answer_ids), chunk)
    logp: list[float | None] = [scores.get(k) for k in range(n + 1)]
    values: list[float | None] = [None] * n
    for t, hi, lo in pairs:
        values[t] = logp[hi] - logp[lo]  # type: ignore[operator]
    if boundary == "word":
        where = ("at the listed positions that end a word or number" if positions is not None
                 else "at the last token t of each word or number" if stride == 1
                 else f"at the last token t of each block of at least {stride} tokens "
                      f"ending between words (the last block may be shorter)")
        value_at = (f"block gain L(t+1) - L(start of block) {where}; the cue only goes "
                    "between words, None at the other tokens")
    elif positions is not None:
        value_at = "g_t = L(t+1) - L(t) at the listed positions"
    elif stride == 1:
        value_at = "g_t = L(t+1) - L(t) at every position"
    else:
        value_at = (f"block gain L(t+1) - L(start of block) at the last token t of each "
                    f"block of {stride} tokens (the last block may be shorter)")
    params = {
        "cue": cue, "answer": answer, "cue_token_ids": cue_ids,
        "answer_token_ids": answer_ids, "tokenisation": how,
        "tokenisation_asked": tokenisation, "stride": stride,
        "boundary": boundary, "positions": positions, "value_at": value_at,
        "logp": "natural log, summed over the answer tokens, teacher-forced",
    }
    # chunk only changes how the same numbers are computed, so it is not a parameter
    # of the estimate.
    return AnswerGainResult(values=values, logp_answer=logp, params=params)
