"""The llama.cpp engine: GGUF models decoded by llama.cpp (llama-cpp-python), on the
CPU, without torch.

What it provides (`CAPABILITIES`): annotated decoding ("step": entropy over the full
vocabulary, log-prob, rank and top-k from each step's logits, sampling with the same
temperature / top-k / top-p semantics), branches from a shared prefix ("branches": the
prefix is decoded once; N branches are N sequences sharing its KV cells in one unified
cache, decoded one token each per batch) and teacher-forced scoring ("score": one batched
decode with logits for every position). It has no hidden states before the final norm:
estimators that need them (hsic) run through the Hugging Face engine on the same file,
loaded only then (models/engine.py).

Deviations from the Hugging Face engine, measured in tests/test_llama_backend.py and
stated in the README: llama.cpp runs the quantised weights with quantised matmuls, so
per-token entropies differ from the dequantised transformers model by a few hundredths
of a nat (mean |ΔH| 0.024-0.050 nats per trace, 0.22 at most, on the embedded model:
TOLERANCE_MEAN_NATS, TOLERANCE_MAX_NATS), and llama.cpp's batched decode (teacher-forced
scoring, a fork's prefix) differs from its token-by-token decode by as much, its
kernels depending on the batch size; greedy top-1 tokens agree on the embedded model's
test prompt (and diverge on others after 12-52 tokens, at near-ties);
sampled traces use numpy's generator, so a seed gives a different (equally valid)
draw than on the Hugging Face engine; a branch grown in a batch may draw differently
from the same branch grown alone where the batch's rounding moves a near-tie (as on
the Hugging Face engine; each row has its own seeded generator).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.decoding import (
    Detokenizer,
    StopInfo,
    TopTextCache,
    alternatives,
    choose,
    resolve_seed,
    row_stats,
    stop_reason,
)
from models.errors import ModelError
from models.loading import TokenizerHash
from models.types import GenerationParams, TokenStep

BACKEND = "llama.cpp"
CAPABILITIES = frozenset({"step", "branches", "score"})
INSTALL_HINT = ("the llama.cpp backend needs llama-cpp-python: install forkview's `llama` "
                "extra (in the repo: uv run --extra llama forkview ...; a build from source "
                "takes minutes)")
# Largest context allocated by default: the KV cache is allocated up front, and most
# GGUF files declare far longer contexts than an annotation session uses.
DEFAULT_MAX_CONTEXT = 8192
# Sequences one context holds: branches grown together in one batch (more are grown in
# groups of this size).
MAX_SEQUENCES = 16
# Measured agreement with the dequantised transformers model on the embedded GGUF,
# the same tokens teacher-forced (tests/test_llama_backend.py, four prompts): mean |ΔH|
# per trace 0.024-0.050 nats, largest single token 0.22. The tests bound the mean by
# TOLERANCE_MEAN_NATS and a single token by TOLERANCE_MAX_NATS.
TOLERANCE_MEAN_NATS = 0.06
TOLERANCE_MAX_NATS = 0.35


def available() -> bool:
    try:
        return importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):
        return False


class GGUFTokenizer:
    """The tokenizer the GGUF file carries, read by llama.cpp, with the subset of the
    transformers tokenizer API forkview uses (decode, encode, __call__, the chat
    template, special ids, get_vocab). The chat template is the file's own, rendered
    with jinja2 as transformers renders it; prompt ids are checked against the
    transformers tokenizer of the same file in the tests."""

    def __init__(self, llm: Any):
        self._llm = llm
        meta = getattr(llm, "metadata", {}) or {}
        self.chat_template: str | None = meta.get("tokenizer.chat_template")
        self.eos_token_id: int | None = _special(llm.token_eos())
        self.bos_token_id: int | None = _special(llm.token_bos())
        self.pad_token_id: int | None = _special(_int(meta.get("tokenizer.ggml.padding_token_id")))
        self.unk_token_id: int | None = _special(_int(meta.get("tokenizer.ggml.unknown_token_id")))
        self._add_bos = str(meta.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
        self._compiled: Any = None

    def _text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self._llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    @property
    def eos_token(self) -> str:
        return self._text(self.eos_token_id)

    @property
    def bos_token(self) -> str:
        return self._text(self.bos_token_id)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        data = self._llm.detokenize([int(i) for i in ids], special=not skip_special_tokens)
        return data.decode("utf-8", errors="replace")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Special tokens written in the text are parsed, as transformers does.
        return list(self._llm.tokenize(text.encode("utf-8"),
                                       add_bos=add_special_tokens and self._add_bos,
                                       special=True))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            **kwargs: Any) -> Any:
        if not self.chat_template:
            raise ModelError("this GGUF file has no chat template (use --raw)")
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise ModelError(f"chat template: {message}")

            # The environment transformers renders chat templates in.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        text = self._compiled.render(messages=messages,
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token,
                                     **kwargs)
        if not tokenize:
            return text
        return self.encode(text, add_special_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        model = self._llm._model
        return {model.token_get_text(i): i for i in range(self._llm.n_vocab())}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _special(token_id: int | None) -> int | None:
    return None if token_id is None or token_id < 0 else int(token_id)


@dataclass
class LlamaModel(TokenizerHash):
    """A GGUF model on the llama.cpp engine, with the provenance fields of
    models.loading.LoadedModel (the store records it the same way)."""

    model: Any  # llama_cpp.Llama
    tokenizer: GGUFTokenizer
    name: str
    spec: str
    kind: str  # default | gguf
    content_hash: str | None
    revision: str | None
    device: str
    dtype: str  # the file's quantisation, e.g. Q4_1
    context_length: int | None
    path: str = ""
    load_seconds: float = 0.0
    from_cache: bool = False
    backend: str = BACKEND
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # The same file on the Hugging Face engine, for estimators that need hidden states.
    companion: Any = field(default=None, repr=False)

    @property
    def eos_token_ids(self) -> set[int]:
        ids = {int(self.model.token_eos())}
        eot = self.model._model.token_eot()
        if eot is not None and eot >= 0:
            ids.add(int(eot))
        return ids


def _env_threads() -> int | None:
    value = os.environ.get("FORKVIEW_LLAMA_THREADS", "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ModelError(f"FORKVIEW_LLAMA_THREADS must be a positive integer, got "
                         f"'{value}'") from None
    if n < 1:
        raise ModelError(f"FORKVIEW_LLAMA_THREADS must be a positive integer, got {n}")
    return n


def _file_type(meta: dict[str, Any]) -> str:
    """The GGUF's quantisation ("Q4_1") from general.file_type, else "gguf" (named by
    llama.cpp's own LLAMA_FTYPE_* constants: no import of the gguf package)."""
    import llama_cpp

    try:
        code = int(meta["general.file_type"])
    except (KeyError, ValueError):
        return "gguf"
    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_") and getattr(llama_cpp, name) == code:
            return name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_")
    return "gguf"


def _multi_sequence(llm: Any) -> None:
    """Give the Llama a context that holds MAX_SEQUENCES sequences in one unified KV
    cache (llama-cpp-python makes single-sequence contexts): N branches from one prefix
    share its cells (a sequence copy adds ids, it copies nothing) and decode as one
    batch. Same memory as before: the cache still has n_ctx cells in all."""
    import llama_cpp
    from llama_cpp import _internals

    params = llm.context_params
    params.n_seq_max = min(MAX_SEQUENCES, int(llama_cpp.llama_max_parallel_sequences()))
    params.kv_unified = True
    old = llm._ctx
    llm._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    llm._stack.callback(llm._ctx.close)
    old.close()


def load_llama(spec: str | None = "default", *, n_ctx: int | None = None,
               n_threads: int | None = None,
               status: Callable[[str], None] | None = None) -> LlamaModel:
    """Load a GGUF (the embedded default or a .gguf path) on llama.cpp. ModelError
    with one line when the extra is missing or the spec is not a GGUF file."""
    from models.loading import gguf_sha256, resolve_spec, stored_spec

    status = status or (lambda _m: None)
    if not available():
        raise ModelError(INSTALL_HINT)
    resolved = resolve_spec(spec)
    if resolved.kind not in ("default", "gguf"):
        raise ModelError(f"the llama.cpp backend reads GGUF files; {resolved.location} is a "
                         "Hugging Face model (use --backend hf)")
    start = time.perf_counter()
    status(f"loading {resolved.name} on llama.cpp...")
    import llama_cpp

    path = Path(resolved.location)
    # One thread per core this process may use, as llama.cpp's own tools do (on two
    # idle cores: 83 tok/s against 47 with llama-cpp-python's default of half the
    # cores). On a machine busy with other work, fewer threads decode faster (OpenMP
    # threads spin while they wait): FORKVIEW_LLAMA_THREADS sets the number.
    threads_n = n_threads or _env_threads() or max(1, len(os.sched_getaffinity(0)))
    threads = {"n_threads": threads_n, "n_threads_batch": threads_n}
    try:
        probe_ctx = n_ctx or DEFAULT_MAX_CONTEXT
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=probe_ctx, n_batch=512,
                              verbose=False, **threads)
    except Exception as e:  # llama.cpp says little more than "failed to load"
        raise ModelError(f"llama.cpp cannot load {path}: {str(e).splitlines()[0]}") from e
    train_ctx = int(llm._model.n_ctx_train() or 0)
    if n_ctx is None and train_ctx and train_ctx < llm.n_ctx():
        # A model trained on a shorter context than the default allocation: use its own.
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=train_ctx, n_batch=512,
                              verbose=False, **threads)
    _multi_sequence(llm)
    name = resolved.name
    return LlamaModel(
        model=llm, tokenizer=GGUFTokenizer(llm), name=name,
        spec=stored_spec(spec, resolved), kind=resolved.kind,
        content_hash=gguf_sha256(path), revision=None, device="cpu",
        dtype=_file_type(llm.metadata or {}), context_length=int(llm.n_ctx()), path=str(path),
        load_seconds=time.perf_counter() - start,
    )


# --- decoding ------------------------------------------------------------------------

def _decode(lm: LlamaModel, tokens: Sequence[int], n_past: int, *,
            all_logits: bool) -> np.ndarray:
    """Feed `tokens` at positions n_past.. (the KV cache beyond n_past is dropped first)
    and return the logits of the last token [1, V], or of every token [n, V]."""
    llm = lm.model
    ctx, batch = llm._ctx, llm._batch
    n_vocab = llm.n_vocab()
    ctx.kv_cache_seq_rm(-1, n_past, -1)
    rows: list[np.ndarray] = []
    tokens = [int(t) for t in tokens]
    for i in range(0, len(tokens), llm.n_batch):
        chunk = tokens[i:i + llm.n_batch]
        batch.set_batch(batch=chunk, n_past=n_past + i, logits_all=all_logits)
        try:
            ctx.decode(batch)
        except RuntimeError as e:
            raise ModelError(f"llama.cpp decode failed: {e}") from e
        n = len(chunk) if all_logits else 1
        if all_logits or i + llm.n_batch >= len(tokens):
            logits = np.ctypeslib.as_array(ctx.get_logits(), shape=(n * n_vocab,))
            rows.append(logits.reshape(n, n_vocab).copy())
    llm.n_tokens = n_past + len(tokens)
    return np.concatenate(rows, axis=0) if all_logits else rows[-1]


def _check_ids(lm: LlamaModel, ids: Sequence[int]) -> None:
    n_vocab = lm.model.n_vocab()
    bad = [t for t in ids if not 0 <= int(t) < n_vocab]
    if bad:
        raise ModelError(f"token id {bad[0]} is not in the model's vocabulary")


def _rng(params: GenerationParams) -> np.random.Generator | None:
    return None if params.greedy else np.random.default_rng(int(params.seed or 0))


def stream_annotated(lm: LlamaModel, prompt_ids: Sequence[int], params: GenerationParams, *,
                     hidden_layer: int | None = None, cancel: threading.Event | None = None,
                     stop_info: StopInfo | None = None) -> Iterator[TokenStep]:
    """Annotated decoding on llama.cpp: the contract of
    models.generate.stream_annotated (one step per token, KV cache, the same stop rule)."""
    if hidden_layer is not None:
        raise ModelError("the llama.cpp backend has no hidden states (use --backend hf)")
    params = resolve_seed(params)
    stop_info = stop_info if stop_info is not None else StopInfo()
    _check_ids(lm, prompt_ids)
    limit = params.max_new_tokens
    limit_reason = "length"
    if lm.context_length and lm.context_length - len(prompt_ids) < limit:
        limit, limit_reason = lm.context_length - len(prompt_ids), "context"
    eos = lm.eos_token_ids
    rng = _rng(params)
    detok = Detokenizer(lm.tokenizer)
    texts = TopTextCache(lm.tokenizer)
    text_so_far = ""
    with lm.lock:
        logits = _decode(lm, prompt_ids, 0, all_logits=False)[0]
        step = 0
        while step < limit:
            token_id = choose(logits, params, rng)
            stats = row_stats(logits, token_id, params)
            piece = detok.push(token_id)
            text_so_far += piece
            reason = stop_reason(token_id, eos, text_so_far, piece, params, step, limit,
                                 limit_reason, cancel)
            if reason:
                stop_info.reason = reason
                piece += detok.flush()
            yield TokenStep(position=step, token_id=token_id, text=piece,
                            logprob=stats.logprob, rank=stats.rank, entropy=stats.entropy,
                            sampling_entropy=stats.sampling_entropy,
                            top=alternatives(stats, texts))
            if reason:
                return
            step += 1
            logits = _decode(lm, [token_id], len(prompt_ids) + step - 1,
                             all_logits=False)[0]
        if not stop_info.reason:
            stop_info.reason = "length"


def score_tokens(lm: LlamaModel, prompt_ids: Sequence[int], token_ids: Sequence[int],
                 params: GenerationParams | None = None, *,
                 hidden_layer: int | None = None) -> list[TokenStep]:
    """Teacher-forced annotation of a given continuation: one batched decode with the
    logits of every position (models.generate.score_tokens' contract)."""
    if hidden_layer is not None:
        raise ModelError("the llama.cpp backend has no hidden states (use --backend hf)")
    params = params or GenerationParams()
    if not token_ids:
        return []
    ids = [int(i) for i in prompt_ids] + [int(i) for i in token_ids]
    _check_ids(lm, ids)
    if lm.context_length and len(ids) > lm.context_length:
        raise ModelError(f"prompt + tokens are {len(ids)} tokens but the model's context is "
                         f"{lm.context_length} tokens")
    n = len(token_ids)
    with lm.lock:
        # Logits of the prompt's last token and every response token but the last: the
        # row for position i predicts token i.
        if len(prompt_ids) > 1:
            _decode(lm, ids[:len(prompt_ids) - 1], 0, all_logits=False)
        logits = _decode(lm, ids[len(prompt_ids) - 1:len(ids) - 1], len(prompt_ids) - 1,
                         all_logits=True)
    detok = Detokenizer(lm.tokenizer)
    pieces = [detok.push(t) for t in token_ids]
    pieces[-1] += detok.flush()
    texts = TopTextCache(lm.tokenizer)
    out = []
    for i in range(n):
        stats = row_stats(logits[i], int(token_ids[i]), params)
        out.append(TokenStep(position=i, token_id=int(token_ids[i]), text=pieces[i],
                             logprob=stats.logprob, rank=stats.rank, entropy=stats.entropy,
                             sampling_entropy=stats.sampling_entropy,
                             top=alternatives(stats, texts)))
    return out


def score_many(lm: LlamaModel,
               items: Sequence[tuple[Sequence[int], Sequence[int], GenerationParams]]
               ) -> list[list[TokenStep]]:
    """Several teacher-forced scorings (models.generate.score_many's contract), each
    one batched decode."""
    return [score_tokens(lm, p, t, params) for p, t, params in items]


def _batched_step(lm: LlamaModel, rows: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
    """Decode one token for each (sequence, position, token) in one batch; the logits
    after each, in order."""
    llm = lm.model
    ctx, batch = llm._ctx, llm._batch
    n_vocab = llm.n_vocab()
    b = batch.batch
    b.n_tokens = len(rows)
    for i, (seq, pos, tok) in enumerate(rows):
        b.token[i] = tok
        b.pos[i] = pos
        b.seq_id[i][0] = seq
        b.n_seq_id[i] = 1
        b.logits[i] = True
    try:
        ctx.decode(batch)
    except RuntimeError as e:
        raise ModelError(f"llama.cpp decode failed: {e}") from e
    return [np.ctypeslib.as_array(ctx.get_logits_ith(i), shape=(n_vocab,)).copy()
            for i in range(len(rows))]


def grow_branches(lm: LlamaModel, prompt_ids: Sequence[int], token_ids: Sequence[int],
                  position: int, requests: Sequence[Any], *, prefix_cache: Any = None,
                  cancel: threading.Event | None = None,
                  on_step: Callable[[int, TokenStep], None] | None = None) -> list[Any]:
    """Branches from `position` (models.branch.grow_branches' contract): the prefix is
    decoded once into sequence 0; each branch gets a sequence that shares the prefix's
    cells (a sequence copy), and every step decodes one token of each live branch in one
    batch. Up to MAX_SEQUENCES branches grow together; more go in further groups."""
    from models.branch_types import BranchOutput, BranchRequest, check_requests

    check_requests(lm, prompt_ids, token_ids, position, requests, lm.model.n_vocab())
    prefix = [int(i) for i in prompt_ids] + [int(i) for i in token_ids[:position]]
    reqs = [BranchRequest(tuple(int(t) for t in r.forced), resolve_seed(r.params))
            for r in requests]
    results = [BranchOutput(forced=list(r.forced), params=r.params) for r in reqs]
    width = max(1, int(lm.model.context_params.n_seq_max))
    with lm.lock:
        first = _decode(lm, prefix, 0, all_logits=False)[0]
        for start in range(0, len(reqs), width):
            rows = list(range(start, min(len(reqs), start + width)))
            _grow_group(lm, prompt_ids, prefix, position, reqs, results, rows, first, cancel,
                        on_step)
    return results


def _grow_group(lm: LlamaModel, prompt_ids: Sequence[int], prefix: list[int], position: int,
                reqs: Sequence[Any], results: list[Any], rows: list[int], first: np.ndarray,
                cancel: threading.Event | None,
                on_step: Callable[[int, TokenStep], None] | None) -> None:
    ctx = lm.model._ctx
    eos = lm.eos_token_ids
    texts = TopTextCache(lm.tokenizer)
    room = (lm.context_length - len(prefix)) if lm.context_length else None
    limits: dict[int, tuple[int, str]] = {}
    for r in rows:
        want = len(reqs[r].forced) + reqs[r].params.max_new_tokens
        limits[r] = ((room, "context") if room is not None and want > room
                     else (want, "length"))
    # Each row's own cells come out of the one unified cache: rows that would not fit
    # together beside the prefix are cut at the context's end, as one row alone would be.
    if room is not None and sum(n for n, _ in limits.values()) > room:
        share = max(1, room // len(rows))
        limits = {r: (min(n, share), "context" if n > share else why)
                  for r, (n, why) in limits.items()}
    seq = {r: j for j, r in enumerate(rows)}  # row -> sequence id
    for r in rows:
        if seq[r]:
            ctx.kv_cache_seq_rm(seq[r], 0, -1)
            ctx.kv_cache_seq_cp(0, seq[r], 0, len(prefix))
    rngs = {r: _rng(reqs[r].params) for r in rows}
    detoks: dict[int, Detokenizer] = {}
    for r in rows:
        d = Detokenizer(lm.tokenizer)
        # Decode after a few prefix tokens, so merges and leading spaces at the fork come
        # out as they would in the whole response; their own pieces are not kept.
        for t in prefix[len(prompt_ids):][-6:]:
            d.push(t)
        d.emitted = []
        detoks[r] = d
    text = {r: "" for r in rows}
    logits = {r: first for r in rows}
    alive = []
    for r in rows:
        if limits[r][0] <= 0:
            results[r].stop_reason = limits[r][1]
        else:
            alive.append(r)
    k = 0
    try:
        while alive:
            chosen: dict[int, int] = {}
            for r in alive:
                req = reqs[r]
                tok = (req.forced[k] if k < len(req.forced)
                       else choose(logits[r], req.params, rngs[r]))
                chosen[r] = tok
                stats = row_stats(logits[r], tok, req.params)
                piece = detoks[r].push(tok)
                text[r] += piece
                reason = stop_reason(tok, eos, text[r], piece, req.params, k, limits[r][0],
                                     limits[r][1], cancel)
                if reason:
                    piece += detoks[r].flush()
                    results[r].stop_reason = reason
                step = TokenStep(position=position + k, token_id=tok, text=piece,
                                 logprob=stats.logprob, rank=stats.rank, entropy=stats.entropy,
                                 sampling_entropy=stats.sampling_entropy,
                                 top=alternatives(stats, texts))
                results[r].steps.append(step)
                if on_step is not None:
                    on_step(r, step)
            alive = [r for r in alive if not results[r].stop_reason]
            if not alive:
                break
            out = _batched_step(lm, [(seq[r], len(prefix) + k, chosen[r]) for r in alive])
            logits = dict(zip(alive, out, strict=True))
            k += 1
    finally:
        # Free the branches' cells; sequence 0 keeps the prefix for the caller.
        for r in rows:
            if seq[r]:
                ctx.kv_cache_seq_rm(seq[r], 0, -1)
        ctx.kv_cache_seq_rm(0, len(prefix), -1)
