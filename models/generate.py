"""Annotated generation and teacher-forced scoring.

Both paths compute the per-token fields with the same function (`_annotate`), so a
generated trace and its teacher-forced rescoring agree by construction, up to the
float differences between incremental (KV-cached) and full forward passes.

Alignment (science.md §1, §5): the values of token t come from the logits of the
forward step that emitted t, i.e. the distribution token t was drawn from.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.decoding import (
    Detokenizer,
    StopInfo,
    TopTextCache,
    resolve_seed,
    stop_reason,
)
from models.errors import ModelError
from models.loading import LoadedModel
from models.prompting import (  # noqa: F401  (re-exported)
    apply_template,
    chat_messages,
    encode_prompt,
    template_kwargs,
    with_system,
)
from models.types import Alternative, GenerationParams, TokenStep


@dataclass
class _Stats:
    logprob: list[float]
    rank: list[int]
    entropy: list[float]
    sampling_entropy: list[float]
    top_ids: list[list[int]]
    top_probs: list[list[float]]


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    # p * log p with p = 0 contributes 0 (masked logits give -inf log-probs).
    p = logp.exp()
    return -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1)


def sampling_logits(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """Logits of the distribution actually sampled from: temperature, then top-k,
    then top-p (nucleus), with the same semantics as transformers' warpers."""
    z = logits / params.temperature
    if params.top_k and params.top_k > 0 and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, idx = torch.sort(z, descending=True, dim=-1)
        cum = sorted_z.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the first
        # token is always kept.
        drop_sorted = (cum - sorted_z.softmax(-1)) >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def _annotate(
    logits: torch.Tensor, chosen: torch.Tensor, params: GenerationParams
) -> _Stats:
    """Per-row statistics for rows of logits [N, V] and the chosen ids [N]."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    chosen_lp = logp.gather(-1, chosen[:, None])[:, 0]
    rank = (logp > chosen_lp[:, None]).sum(-1) + 1
    entropy = _entropy(logp)
    if params.greedy:
        s_ent = torch.zeros_like(entropy)
    elif params.temperature == 1.0 and params.top_k == 0 and params.top_p >= 1.0:
        s_ent = entropy
    else:
        s_ent = _entropy(torch.log_softmax(sampling_logits(logits, params), dim=-1))
    k = max(0, min(params.top_alternatives, logits.shape[-1]))
    top = torch.topk(logp, k, dim=-1) if k else None
    empty: list[list[Any]] = [[] for _ in range(len(chosen))]
    # One device->host transfer for everything (matters on GPUs).
    return _Stats(
        logprob=chosen_lp.tolist(),
        rank=rank.tolist(),
        entropy=entropy.tolist(),
        sampling_entropy=s_ent.tolist(),
        top_ids=top.indices.tolist() if top is not None else empty,
        top_probs=top.values.exp().tolist() if top is not None else empty,
    )


def _top_list(stats: _Stats, i: int, texts: TopTextCache) -> list[Alternative]:
    return [
        Alternative(token_id=t, text=texts(t), prob=p)
        for t, p in zip(stats.top_ids[i], stats.top_probs[i], strict=True)
    ]


def decoder_layers(model: Any) -> Any:
    """The list of decoder blocks (Llama, Qwen, Mistral, GPT-2, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and (n is None or len(module) == n)
            and name.endswith(("layers", ".h", "blocks", "layer"))
        ):
            return module
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__} "
                     "to read hidden states")


class HiddenCapture:
    """Forward hook that keeps the last position's output of one decoder layer.

    MI-Peaks reads the last decoder layer's output before the final norm; the model's
    `hidden_states[-1]` is after the norm on Llama-style models, hence a hook. The hook
    only exists while capture is asked for, so plain generation pays nothing.
    """

    def __init__(self, model: Any, layer: int):
        layers = decoder_layers(model)
        if not -len(layers) <= layer < len(layers):
            raise ModelError(f"layer {layer} is out of range (model has {len(layers)} layers)")
        self.layer = layer % len(layers)
        self.rows: list[torch.Tensor] = []
        self._handle = layers[self.layer].register_forward_hook(self._hook)

    def _hook(self, _module: Any, _inputs: Any, output: Any) -> None:
        h = output[0] if isinstance(output, tuple) else output
        self.rows.append(h[0].detach())

    def pop_all(self) -> torch.Tensor:
        out = torch.cat(self.rows, dim=0) if self.rows else torch.empty(0)
        self.rows.clear()
        return out

    def close(self) -> None:
        self._handle.remove()


def cache_kwarg(model: Any) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` in forward()."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def stream_annotated(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    params: GenerationParams,
    *,
    hidden_layer: int | None = None,
    cancel: threading.Event | None = None,
    stop_info: StopInfo | None = None,
) -> Iterator[TokenStep]:
    """Generate one token at a time with a KV cache, yielding each annotated step.

    The prefix is encoded once; each later step feeds only the new token. With a
    seed, sampling is reproducible token for token. `cancel` is checked between
    steps; stopping early is the caller's business (the steps so far are valid).
    """
    params = resolve_seed(params)
    model = lm.model
    device = next(model.parameters()).device
    stop_info = stop_info if stop_info is not None else StopInfo()
    eos = lm.eos_token_ids
    gen = None
    if not params.greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(params.seed or 0))
    detok = Detokenizer(lm.tokenizer)
    texts = TopTextCache(lm.tokenizer)
    limit = params.max_new_tokens
    if lm.context_length:
        limit = min(limit, lm.context_length - len(prompt_ids))
    capture = HiddenCapture(model, hidden_layer) if hidden_layer is not None else None
    text_so_far = ""
    try:
        input_ids = torch.tensor([list(prompt_ids)], device=device)
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        kv = cache_kwarg(model)
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{kv: cache})
        position = 0
        while position < limit:
            logits = out.logits[:, -1, :].float()
            if params.greedy:
                chosen = logits.argmax(-1)
            else:
                probs = sampling_logits(logits, params).softmax(-1)
                chosen = torch.multinomial(probs, 1, generator=gen)[:, 0]
            stats = _annotate(logits, chosen, params)
            token_id = int(chosen[0])
            hidden = None
            if capture is not None:
                hidden = capture.pop_all()[-1].float().cpu().numpy()
            piece = detok.push(token_id)
            text_so_far += piece
            reason = stop_reason(token_id, eos, text_so_far, piece, params, position, limit,
                                 "length" if limit == params.max_new_tokens else "context",
                                 cancel)
            last = bool(reason)
            if last:
                stop_info.reason = reason
            if last:
                piece += detok.flush()
            step = TokenStep(
                position=position,
                token_id=token_id,
                text=piece,
                logprob=stats.logprob[0],
                rank=stats.rank[0],
                entropy=stats.entropy[0],
                sampling_entropy=stats.sampling_entropy[0],
                top=_top_list(stats, 0, texts),
                hidden=hidden,
            )
            yield step
            if last:
                return
            if cancel is not None and cancel.is_set():
                stop_info.reason = "interrupted"
                return
            position += 1
            # The DynamicCache grows in place: each step feeds only the new token.
            out = model(input_ids=chosen[:, None], use_cache=True, **{kv: cache})
        if not stop_info.reason:
            stop_info.reason = "length"
    finally:
        if capture is not None:
            capture.close()


@torch.inference_mode()
def score_tokens(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    token_ids: Sequence[int],
    params: GenerationParams | None = None,
    *,
    hidden_layer: int | None = None,
) -> list[TokenStep]:
    """Teacher-forced annotation of a given continuation in one forward pass.

    Returns the same fields as `stream_annotated`; `sampling_entropy` is that of the
    distribution `params` would have sampled from.
    """
    params = params or GenerationParams()
    if not token_ids:
        return []
    model = lm.model
    device = next(model.parameters()).device
    ids = list(prompt_ids) + list(token_ids)
    if lm.context_length and len(ids) > lm.context_length:
        raise ModelError(
            f"prompt + tokens are {len(ids)} tokens but the model's context is "
            f"{lm.context_length} tokens"
        )
    capture = HiddenCapture(model, hidden_layer) if hidden_layer is not None else None
    try:
        n = len(token_ids)
        out = model(input_ids=torch.tensor([ids], device=device), logits_to_keep=n + 1)
        # logits[j] predicts ids[len(prompt) + j]: drop the final position, which
        # predicts the token after the last one.
        logits = out.logits[0, :n, :].float()
        chosen = torch.tensor(list(token_ids), device=device)
        stats = _annotate(logits, chosen, params)
        hidden = None
        if capture is not None:
            # The state at position i emits token i+1: rows [P-1, P+n-1).
            hidden = capture.pop_all()[len(prompt_ids) - 1 : len(ids) - 1].float().cpu().numpy()
    finally:
        if capture is not None:
            capture.close()
    detok = Detokenizer(lm.tokenizer)
    pieces = [detok.push(t) for t in token_ids]
    pieces[-1] += detok.flush()
    texts = TopTextCache(lm.tokenizer)
    return [
        TokenStep(
            position=i,
            token_id=int(token_ids[i]),
            text=pieces[i],
            logprob=stats.logprob[i],
            rank=stats.rank[i],
            entropy=stats.entropy[i],
            sampling_entropy=stats.sampling_entropy[i],
            top=_top_list(stats, i, texts),
            hidden=None if hidden is None else hidden[i],
        )
        for i in range(n)
    ]


ScoreItem = tuple[Sequence[int], Sequence[int], GenerationParams]


@torch.inference_mode()
def score_many(lm: LoadedModel, items: Sequence[ScoreItem]) -> list[list[TokenStep]]:
    """Teacher-forced annotation of several (prompt ids, token ids, params) in one
    forward pass.

    One item: `score_tokens` as it is. Several: prompt + tokens right-padded to the
    longest, so a real token never attends to padding and keeps its positions; the
    logits of each row's token positions go through the very function generation and
    score_tokens use (`_annotate`), pieces and alternatives through the same
    detokenizer and text cache.
    """
    if not items:
        return []
    if len(items) == 1:
        prompt_ids, token_ids, params = items[0]
        return [score_tokens(lm, prompt_ids, token_ids, params)]
    model = lm.model
    device = next(model.parameters()).device
    seqs = [list(prompt_ids) + list(token_ids) for prompt_ids, token_ids, _ in items]
    width = max(len(s) for s in seqs)
    pad = lm.tokenizer.pad_token_id
    if pad is None:
        pad = next(iter(sorted(lm.eos_token_ids)), 0)
    input_ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    # logits[j] predicts token j + 1: a row's response is predicted from its positions
    # len(prompt) - 1 .. len(prompt) + n - 2. Only the columns from the earliest of
    # those on are computed.
    first = min(len(prompt_ids) for prompt_ids, _, _ in items) - 1
    out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                logits_to_keep=width - first)
    texts = TopTextCache(lm.tokenizer)
    results = []
    for b, (prompt_ids, token_ids, params) in enumerate(items):
        start = len(prompt_ids) - 1 - first
        n = len(token_ids)
        logits = out.logits[b, start : start + n, :].float()
        chosen = torch.tensor(token_ids, device=device)
        stats = _annotate(logits, chosen, params)
        detok = Detokenizer(lm.tokenizer)
        pieces = [detok.push(t) for t in token_ids]
        pieces[-1] += detok.flush()
        results.append([
            TokenStep(position=i, token_id=int(token_ids[i]), text=pieces[i],
                      logprob=stats.logprob[i], rank=stats.rank[i],
                      entropy=stats.entropy[i],
                      sampling_entropy=stats.sampling_entropy[i],
                      top=_top_list(stats, i, texts))
            for i in range(n)
        ])
    return results
