"""What every engine's decoding loop shares, without torch: incremental detokenising,
the stop rule, seeds, and the per-token statistics for engines whose logits arrive as
numpy arrays (llama.cpp).

The Hugging Face engine (models/generate.py) computes the same statistics with torch on
the model's device (`_annotate`, `sampling_logits`); the numpy versions here exist
because the llama.cpp engine must not import torch (its explorer starts in about a
second), and tests/test_llama_backend.py checks both against each other on the same
logits (agreement to 1e-5).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from models.types import Alternative, GenerationParams


def resolve_seed(params: GenerationParams) -> GenerationParams:
    """Give a sampled trace a concrete seed so it can always be replayed."""
    if params.seed is None and not params.greedy:
        return replace(params, seed=secrets.randbits(31))
    return params


class Detokenizer:
    """Incremental decoding whose pieces concatenate to `tokenizer.decode(ids)`.

    Decoding token by token breaks multi-byte characters and merges (byte-level BPE
    splits an emoji across tokens; SentencePiece drops a leading space). Following
    the prefix/read-offset scheme of text-generation-inference, a piece is only
    released once the text decoded from a short window is stable; held-back bytes go
    to a later token, and `flush` hands any remainder to the last token.
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.emitted: list[str] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(
            list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new = self._decode(self.ids[self.prefix_offset :])
        if len(new) > len(prefix) and not new.endswith("\ufffd") and new.startswith(prefix):
            piece = new[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        else:
            piece = ""
        self.emitted.append(piece)
        return piece

    def flush(self) -> str:
        """Text still owed at the end: whatever `decode(ids)` has beyond the pieces."""
        full = self._decode(self.ids)
        done = "".join(self.emitted)
        rest = full[len(done) :] if full.startswith(done) else ""
        if rest and self.emitted:
            self.emitted[-1] += rest
        return rest


class TopTextCache:
    """Alternatives are shown as single-token texts; decoding the same ids over and
    over is wasted work, so they are memoised per tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tok.decode([token_id], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
            self.cache[token_id] = text
        return text


@dataclass
class StopInfo:
    reason: str = ""  # eos | length | stop_string | context | interrupted


def stop_reason(token_id: int, eos: set[int], text_so_far: str, piece: str,
                params: GenerationParams, step: int, limit: int, limit_reason: str,
                cancel: threading.Event | None) -> str:
    """Why decoding ends after this token ('' to go on): the one stop rule of every
    engine's loop. `text_so_far` already includes `piece`; `step` counts from 0."""
    max_stop = max((len(s) for s in params.stop), default=0)
    if token_id in eos:
        return "eos"
    if max_stop and any(s in text_so_far[-(max_stop + len(piece) + 8):] for s in params.stop):
        return "stop_string"
    if step + 1 >= limit:
        return limit_reason
    if cancel is not None and cancel.is_set():
        # Cancelled during this step's forward pass: this token is valid and becomes
        # the last, with any held-back text flushed into it.
        return "interrupted"
    return ""


# --- per-token statistics from numpy logits (the llama.cpp engine) -------------------

@dataclass
class RowStats:
    logprob: float
    rank: int
    entropy: float
    sampling_entropy: float
    top_ids: list[int]
    top_probs: list[float]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    return z - np.log(np.exp(z).sum())


def _entropy(logp: np.ndarray) -> float:
    p = np.exp(logp)
    # p * log p with p = 0 contributes 0 (masked logits give -inf log-probs).
    return float(-np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0).sum())


def sampling_logits_np(logits: np.ndarray, params: GenerationParams) -> np.ndarray:
    """Logits of the distribution actually sampled from: temperature, then top-k, then
    top-p, with the semantics of models.generate.sampling_logits (the torch version)."""
    z = logits.astype(np.float64) / params.temperature
    if params.top_k and 0 < params.top_k < z.shape[-1]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    if params.top_p < 1.0:
        order = np.argsort(-z, kind="stable")
        sorted_z = z[order]
        p = np.exp(sorted_z - sorted_z[0])
        p /= p.sum()
        # Drop a token once the mass before it already reaches top_p; the first token
        # is always kept.
        drop_sorted = (np.cumsum(p) - p) >= params.top_p
        drop_sorted[0] = False
        drop = np.zeros_like(drop_sorted)
        drop[order] = drop_sorted
        z = np.where(drop, -np.inf, z)
    return z


def row_stats(logits: np.ndarray, chosen: int, params: GenerationParams) -> RowStats:
    """Entropy (nats, full vocabulary, T = 1), log-prob and rank of `chosen`, the
    sampling entropy and the top-k alternatives, from one row of logits."""
    logp = log_softmax(logits)
    lp = float(logp[chosen])
    rank = int((logp > lp).sum()) + 1
    entropy = _entropy(logp)
    if params.greedy:
        s_ent = 0.0
    elif params.temperature == 1.0 and params.top_k == 0 and params.top_p >= 1.0:
        s_ent = entropy
    else:
        s_ent = _entropy(log_softmax(sampling_logits_np(logits, params)))
    k = max(0, min(params.top_alternatives, logp.shape[-1]))
    if k:
        part = np.argpartition(-logp, k - 1)[:k]
        # Ties broken by the smaller id, as torch.topk does on CPU in practice.
        top = part[np.lexsort((part, -logp[part]))]
        top_ids = [int(t) for t in top]
        top_probs = [float(np.exp(logp[t])) for t in top]
    else:
        top_ids, top_probs = [], []
    return RowStats(lp, rank, entropy, s_ent, top_ids, top_probs)


def choose(logits: np.ndarray, params: GenerationParams, rng: np.random.Generator | None) -> int:
    """The next token: argmax when greedy, else a draw from the sampling distribution."""
    if params.greedy or rng is None:
        return int(np.argmax(logits))
    z = sampling_logits_np(logits, params)
    p = np.exp(z - np.max(z))
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


def alternatives(stats: RowStats, texts: TopTextCache) -> list[Alternative]:
    return [Alternative(token_id=t, text=texts(t), prob=p)
            for t, p in zip(stats.top_ids, stats.top_probs, strict=True)]
