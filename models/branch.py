"""Branches: continue a trace from any position with chosen, typed or sampled tokens.

A branch at position t of a trace keeps the trace's tokens x_<t, puts its own token(s)
at t (``forced``: an alternative, the ids of typed text, the trace's own token, or
nothing, in which case t itself is sampled) and then generates freely under its own
``GenerationParams``. Positions are the trace's: the branch's first token is at t.

Cost: the prefix is never re-encoded per branch. ``PrefixCache`` encodes prompt +
the trace's tokens once; a branch forks that cache (shallow copy), crops it to its
prefix and feeds one token to get the distribution at t. All branches of one request
run as ONE batch in lock-step (one forward per step for all rows); a finished row is
fed padding and the batch is compacted once half of it is done.

Reproducibility: every row has its own generator seeded with its own
``params.seed`` and draws from its own row exactly as ``stream_annotated`` draws from
its single row (``sampling_logits`` -> softmax -> ``torch.multinomial``), so a branch
made in a batch of 16 is replayed alone from its stored seed. (Batched and single
forwards can differ in the last float bits; a replay reports where tokens diverge.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from models.branch_types import BranchOutput, BranchRequest, check_requests
from models.errors import ModelError
from models.generate import (
    Detokenizer,
    TopTextCache,
    _annotate,
    _top_list,
    cache_kwarg,
    resolve_seed,
    sampling_logits,
)
from models.loading import LoadedModel
from models.rollout import cache_from_output, crop_cache, fork_cache
from models.types import TokenStep

StepCallback = Callable[[int, TokenStep], None]  # (row, step)


class PrefixCache:
    """The KV cache of prompt + a trace's tokens, encoded once and shared by every
    branch of that trace (each branch forks and crops it; this one never changes)."""

    def __init__(self, lm: LoadedModel, prompt_ids: Sequence[int], token_ids: Sequence[int]):
        self.lm = lm
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.token_ids = [int(i) for i in token_ids]
        ids = self.prompt_ids + self.token_ids
        if not self.prompt_ids:
            raise ModelError("the prompt is empty")
        if lm.context_length and len(ids) > lm.context_length:
            ids = ids[: lm.context_length]
        model = lm.model
        device = next(model.parameters()).device
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids], device=device), use_cache=True,
                        logits_to_keep=1)
        self.cache = cache_from_output(out)
        self.length = len(ids)

    def matches(self, prompt_ids: Sequence[int], token_ids: Sequence[int], position: int) -> bool:
        """Whether this cache holds the prefix of a branch at ``position``."""
        return (list(prompt_ids) == self.prompt_ids
                and list(token_ids[:position]) == self.token_ids[:position]
                and len(self.prompt_ids) + position <= self.length)


@torch.inference_mode()
def grow_branches(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    token_ids: Sequence[int],
    position: int,
    requests: Sequence[BranchRequest],
    *,
    prefix_cache: PrefixCache | None = None,
    cancel: threading.Event | None = None,
    on_step: StepCallback | None = None,
) -> list[BranchOutput]:
    """Grow every branch in ``requests`` from ``position`` of the trace
    (``prompt_ids`` + ``token_ids``) in one lock-step batch (module doc).

    ``token_ids`` only needs the trace's tokens before ``position``;
    ``position == len(token_ids)`` continues after its end (with no tokens at all: N
    independent samples of the prompt). ``on_step(row, step)`` is called for every token
    as it is made. Setting ``cancel`` ends every unfinished row after its current token
    with stop reason ``interrupted`` (its tokens are kept).
    """
    check_requests(lm, prompt_ids, token_ids, position, requests,
                   getattr(lm.model.config, "vocab_size", None))
    model = lm.model
    device = next(model.parameters()).device
    kv = cache_kwarg(model)
    prefix = [int(i) for i in prompt_ids] + [int(i) for i in token_ids[:position]]
    reqs = [BranchRequest(tuple(int(t) for t in r.forced), resolve_seed(r.params))
            for r in requests]
    n_rows = len(reqs)
    shared = reqs[0].params

    # The distribution at `position`: feed the prefix's last token on a cache that
    # holds everything before it.
    if prefix_cache is not None and prefix_cache.matches(prompt_ids, token_ids, position):
        cache = fork_cache(prefix_cache.cache)
        crop_cache(cache, len(prefix) - 1)
    elif len(prefix) > 1:
        out = model(input_ids=torch.tensor([prefix[:-1]], device=device), use_cache=True,
                    logits_to_keep=1)
        cache = cache_from_output(out)
        del out
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([prefix[-1:]], device=device), use_cache=True,
                logits_to_keep=1, **{kv: cache})
    logits = out.logits[:, -1, :].float()
    del out
    if n_rows > 1:
        cache.batch_repeat_interleave(n_rows)
        logits = logits.expand(n_rows, -1)

    eos = lm.eos_token_ids
    pad = lm.tokenizer.pad_token_id
    pad_id = int(pad) if pad is not None else (min(eos) if eos else 0)
    room = (lm.context_length - len(prefix)) if lm.context_length else None
    results = [BranchOutput(forced=list(r.forced), params=r.params) for r in reqs]
    limits, limit_reasons = [], []
    for r in reqs:
        want = len(r.forced) + r.params.max_new_tokens
        if room is not None and want > room:
            limits.append(room)
            limit_reasons.append("context")
        else:
            limits.append(want)
            limit_reasons.append("length")
    gens: list[torch.Generator | None] = []
    for r in reqs:
        if r.params.greedy:
            gens.append(None)
        else:
            g = torch.Generator(device=device)
            g.manual_seed(int(r.params.seed or 0))
            gens.append(g)
    texts = TopTextCache(lm.tokenizer)
    detoks = []
    for _ in reqs:
        d = Detokenizer(lm.tokenizer)
        # Decode after a few prefix tokens, so merges and leading spaces at the fork come
        # out as they would in the whole response; their own pieces are not kept.
        for t in prefix[len(prompt_ids):][-6:]:
            d.push(t)
        d.emitted = []
        detoks.append(d)
    branch_text = ["" for _ in reqs]
    max_stop = max((len(s) for s in shared.stop), default=0)

    rows = list(range(n_rows))  # original row of each batch slot
    alive = [limits[r] > 0 for r in range(n_rows)]
    for r in range(n_rows):
        if not alive[r]:
            results[r].stop_reason = limit_reasons[r]
    can_compact = hasattr(cache, "batch_select_indices")
    k = 0  # steps since the fork
    while any(alive):
        slots = [j for j, r in enumerate(rows) if alive[r]]
        # Choose each live row's token: forced, argmax or its own draw.
        chosen = torch.full((len(rows),), pad_id, dtype=torch.long, device=device)
        probs = None
        for j in slots:
            r = rows[j]
            if k < len(reqs[r].forced):
                chosen[j] = reqs[r].forced[k]
            elif reqs[r].params.greedy:
                chosen[j] = logits[j].argmax()
            else:
                if probs is None:
                    probs = sampling_logits(logits, shared).softmax(-1)
                chosen[j] = torch.multinomial(probs[j:j + 1], 1, generator=gens[r])[0, 0]
        idx = torch.tensor(slots, device=device)
        stats = _annotate(logits[idx], chosen[idx], shared)
        stop_all = cancel is not None and cancel.is_set()
        for i, j in enumerate(slots):
            r = rows[j]
            tok = int(chosen[j])
            piece = detoks[r].push(tok)
            branch_text[r] += piece
            reason = ""
            if tok in eos:
                reason = "eos"
            elif max_stop and any(s in branch_text[r][-(max_stop + len(piece) + 8):]
                                  for s in shared.stop):
                reason = "stop_string"
            elif k + 1 >= limits[r]:
                reason = limit_reasons[r]
            elif stop_all:
                reason = "interrupted"
            if reason:
                piece += detoks[r].flush()
                alive[r] = False
                results[r].stop_reason = reason
            step = TokenStep(
                position=position + k, token_id=tok, text=piece, logprob=stats.logprob[i],
                rank=stats.rank[i], entropy=stats.entropy[i],
                sampling_entropy=stats.sampling_entropy[i], top=_top_list(stats, i, texts),
            )
            results[r].steps.append(step)
            if on_step is not None:
                on_step(r, step)
        if not any(alive):
            break
        k += 1
        live = [j for j, r in enumerate(rows) if alive[r]]
        if can_compact and len(live) <= len(rows) // 2:
            keep = torch.tensor(live, device=device)
            cache.batch_select_indices(keep)
            rows = [rows[j] for j in live]
            chosen = chosen[keep]
        out = model(input_ids=chosen[:, None], use_cache=True, **{kv: cache})
        logits = out.logits[:, -1, :].float()
        del out
    return results

