"""The engine seam: which code computes a trace's numbers.

An engine is a loaded model plus what it can do (`capabilities`):

- "step": annotated decoding, one token at a time (`stream_annotated`);
- "branches": branches from a shared prefix (`grow_branches`);
- "score": teacher-forced scoring of given tokens (`score_tokens`);
- "hidden": hidden states before the final norm (the hsic estimator);
- "transformers": a transformers model object (estimators whose batched forward passes
  are written for it: answer-gain, rollout).

Two engines exist: "hf" (transformers; models/generate.py, branch.py; every capability)
and "llama.cpp" (llama-cpp-python on GGUF files; models/llama_backend.py; step, branches,
score; no torch). Callers use the functions here, never an engine's module, so one call
site serves both. An estimator declares what it needs (`Estimator.needs`); `for_needs`
returns the engine that can run it: the loaded one, or for a llama.cpp model the same
file on transformers, loaded once and only then, with one line saying so.

This module imports neither torch nor llama_cpp; each engine's module is imported when
it is first used.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from models.errors import ModelError
from models.types import GenerationParams, TokenStep

BACKENDS = ("hf", "llama.cpp")
# What each engine can do; an estimator's `needs` outside this vocabulary (e.g.
# "reference") are not engine matters.
ENGINE_CAPABILITIES = frozenset({"step", "branches", "score", "hidden", "transformers"})
HF_CAPABILITIES = ENGINE_CAPABILITIES

StatusCallback = Callable[[str], None]


def backend_of(lm: Any) -> str:
    return getattr(lm, "backend", "hf")


def capabilities(lm: Any) -> frozenset[str]:
    if backend_of(lm) == "llama.cpp":
        from models.llama_backend import CAPABILITIES

        return CAPABILITIES
    return HF_CAPABILITIES


def _module(lm: Any) -> Any:
    if backend_of(lm) == "llama.cpp":
        from models import llama_backend

        return llama_backend
    from models import generate

    return generate


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend == "llama.cpp":
        from models.llama_backend import INSTALL_HINT, available

        if not available():
            raise ModelError(INSTALL_HINT)
    return backend


def check_options(backend: str, device: str = "auto", dtype: str = "auto") -> None:
    """ModelError (one line) for an engine that is missing or cannot take these
    options: checked before a model loads (and before the explorer opens)."""
    check_backend(backend)
    if backend == "llama.cpp":
        if device not in ("auto", "cpu"):
            raise ModelError(f"the llama.cpp backend runs on the CPU here (--device {device} "
                             "needs --backend hf)")
        if dtype != "auto":
            raise ModelError(f"the llama.cpp backend runs the GGUF file's own quantisation "
                             f"(--dtype {dtype} needs --backend hf)")


def load(spec: str | None = "default", device: str = "auto", dtype: str = "auto",
         backend: str = "hf", status: StatusCallback | None = None) -> Any:
    """Load a model on an engine. The llama.cpp engine runs on the CPU in the file's own
    quantisation: --device / --dtype other than auto are refused there."""
    check_options(backend, device, dtype)
    if backend == "llama.cpp":
        from models.llama_backend import load_llama

        return load_llama(spec, status=status)
    from models.loading import load_model

    return load_model(spec, device, dtype, status=status)


def stream_annotated(lm: Any, prompt_ids: Sequence[int], params: GenerationParams, *,
                     hidden_layer: int | None = None, cancel: threading.Event | None = None,
                     stop_info: Any = None) -> Iterator[TokenStep]:
    return _module(lm).stream_annotated(lm, prompt_ids, params, hidden_layer=hidden_layer,
                                        cancel=cancel, stop_info=stop_info)


def score_tokens(lm: Any, prompt_ids: Sequence[int], token_ids: Sequence[int],
                 params: GenerationParams | None = None, *,
                 hidden_layer: int | None = None) -> list[TokenStep]:
    return _module(lm).score_tokens(lm, prompt_ids, token_ids, params,
                                    hidden_layer=hidden_layer)


def score_many(lm: Any, items: Sequence[tuple[Sequence[int], Sequence[int], GenerationParams]]
               ) -> list[list[TokenStep]]:
    """Teacher-forced scoring of several (prompt ids, token ids, params): one padded
    forward pass on transformers, one batched decode each on llama.cpp."""
    return _module(lm).score_many(lm, items)


def vocab_size(lm: Any) -> int:
    """Rows of the model's logits: the token ids a response may hold."""
    if backend_of(lm) == "llama.cpp":
        return int(lm.model.n_vocab())
    emb = lm.model.get_output_embeddings()
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(lm.model.config.vocab_size)


def grow_branches(lm: Any, prompt_ids: Sequence[int], token_ids: Sequence[int],
                  position: int, requests: Sequence[Any], *, prefix_cache: Any = None,
                  cancel: threading.Event | None = None,
                  on_step: Callable[[int, TokenStep], None] | None = None) -> list[Any]:
    if backend_of(lm) == "llama.cpp":
        from models.llama_backend import grow_branches as grow
    else:
        from models.branch import grow_branches as grow
    return grow(lm, prompt_ids, token_ids, position, requests, prefix_cache=prefix_cache,
                cancel=cancel, on_step=on_step)


def prefix_cache(lm: Any, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> Any:
    """A reusable prefix for many branch requests of one trace (transformers only; the
    llama.cpp engine keeps the prefix in its own KV cache): None where not needed."""
    if backend_of(lm) == "llama.cpp":
        return None
    from models.branch import PrefixCache

    return PrefixCache(lm, prompt_ids, token_ids)


def for_needs(lm: Any, needs: frozenset[str] | set[str], what: str,
              status: StatusCallback | None = None) -> Any:
    """The engine that can do what `what` (an estimator's name) needs: `lm` itself, or
    for a llama.cpp model the same GGUF file on transformers, loaded on first use and
    kept beside it. ModelError (one line) when no engine can."""
    wanted = frozenset(needs) & ENGINE_CAPABILITIES
    if wanted <= capabilities(lm):
        return lm
    if backend_of(lm) != "llama.cpp":
        missing = ", ".join(sorted(wanted - capabilities(lm)))
        raise ModelError(f"{what} needs {missing}, which the {backend_of(lm)} engine "
                         "cannot provide")
    companion = getattr(lm, "companion", None)
    if companion is None:
        missing = ", ".join(sorted(wanted - capabilities(lm)))
        if status is not None:
            status(f"{what} needs {missing}: loading {lm.name} on transformers (same file)")
        from models.loading import load_model

        companion = load_model(lm.spec, "cpu", "auto", status=status)
        lm.companion = companion
    return companion
