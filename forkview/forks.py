"""Forks, headless: grow branches of a stored trace, replay a trace, describe a family.

Shared by the CLI (`forkview fork|tree|replay`) and the explorer. No Textual here; torch
only inside the functions that run a model (models.branch), so `tree` stays instant.

A branch is a child trace: parent, fork position, forced token ids (empty: the token
at the fork was sampled too), origin (fork | sample) and every generation parameter
including its own seed. Its tokens are stored from the fork position on; the tokens
before it are its parent's (``Store.full_tokens`` joins them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from forkview.errors import ForkviewError
from models.types import SAMPLE_TEMPERATURE, GenerationParams, TokenStep
from store import Store, StoreError, TraceInfo

if TYPE_CHECKING:
    from models.branch import PrefixCache
    from models.branch_types import BranchOutput
    from models.loading import LoadedModel

DEFAULT_SAMPLES = 8


class ForkError(ForkviewError):
    """A fork request that cannot be honoured; the message is one line for the user."""


@dataclass
class ForkSource:
    """A stored trace ready to branch from: its whole response, prefix included."""

    info: TraceInfo
    steps: list[TokenStep]

    @property
    def token_ids(self) -> list[int]:
        return [s.token_id for s in self.steps]

    @property
    def prompt_ids(self) -> list[int]:
        return self.info.prompt_token_ids


@dataclass
class PlannedBranch:
    forced: list[int]
    params: GenerationParams
    origin: str  # fork | sample
    label: str  # what the user asked for, for progress lines


@dataclass
class ForkResult:
    trace_id: int
    origin: str
    output: BranchOutput
    status: str  # complete | stopped
    answer: str | None = None
    correct: bool | None = None


@dataclass
class ReplayResult:
    trace_id: int
    matches: bool
    compared: int  # tokens compared
    stored_ids: list[int]
    replayed_ids: list[int]
    first_mismatch: int | None  # position of the first differing token
    max_logprob_diff: float  # over the positions compared before any mismatch
    note: str = ""


# ---------------------------------------------------------------- reading and checks


def load_source(store: Store, trace_id: int) -> ForkSource:
    info = store.trace(trace_id)  # StoreError: no such trace
    if info.status == "running":
        raise ForkError(f"trace {trace_id} is still running; wait for it or stop it first")
    steps = store.full_tokens(trace_id)
    if not steps:
        raise ForkError(f"trace {trace_id} has no stored tokens to fork from")
    return ForkSource(info=info, steps=steps)


def check_position(source: ForkSource, position: int) -> None:
    n = len(source.steps)
    if not 0 <= position < n:
        raise ForkError(f"position {position} is out of range: trace {source.info.id} has "
                        f"{n} tokens (positions 0..{n - 1})")


def check_tokenizer(store: Store, source: ForkSource, lm: LoadedModel) -> None:
    """Refuse to fork (or rescore) stored ids with a model whose tokenizer reads them
    differently. Same tokenizer fingerprint: fine. No fingerprint stored (older files):
    fine only for the very same model."""
    stored = source.info.model_tokenizer_hash
    if stored is not None:
        if stored != lm.tokenizer_hash:
            raise ForkError(
                f"trace {source.info.id} was made by {source.info.model_name}, whose "
                f"tokenizer differs from {lm.name}'s; load that model (--model "
                f"{source.info.model_spec}) to fork it")
        return
    if source.info.model_spec != lm.spec and source.info.model_name != lm.name:
        raise ForkError(
            f"trace {source.info.id} was made by {source.info.model_name} and its "
            f"tokenizer is not recorded; load that model (--model "
            f"{source.info.model_spec}) to fork it")


def encode_text(lm: LoadedModel, text: str) -> list[int]:
    """Token ids of text typed at a fork (no special tokens, no chat template)."""
    if not text:
        raise ForkError("the forced text is empty")
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ForkError(f"the text {text!r} encodes to no tokens")
    return [int(i) for i in ids]


# ---------------------------------------------------------------- planning


def branch_params(source: ForkSource, *, max_new_tokens: int | None = None,
                  seed: int | None = None, temperature: float | None = None,
                  sampling: bool = False) -> GenerationParams:
    """The parent's parameters with the user's overrides. A new seed per request
    unless given (so two forks of a sampled trace are not the same draw)."""
    p = source.info.params
    changes: dict[str, Any] = {"seed": seed}
    if max_new_tokens is not None:
        changes["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        changes["temperature"] = temperature
    elif sampling and p.greedy:
        changes["temperature"] = SAMPLE_TEMPERATURE
    return replace(p, **changes)


def plan_alternatives(source: ForkSource, position: int, top: int,
                      params: GenerationParams) -> list[PlannedBranch]:
    """The top-`top` recorded alternatives at `position`, other than the token the trace
    took, each as a branch (with a given seed S, branch i is seeded S + i)."""
    check_position(source, position)
    if top < 1:
        raise ForkError(f"--top must be at least 1, not {top}")
    step = source.steps[position]
    alts = [a for a in step.top if a.token_id != step.token_id][:top]
    if not alts:
        raise ForkError(f"no recorded alternatives at position {position} (the trace kept "
                        f"{len(step.top)} per token)")
    return [PlannedBranch([a.token_id], _nth_seed(params, i), "fork",
                          f"{a.text!r} p={a.prob:.3f}")
            for i, a in enumerate(alts)]


def _nth_seed(params: GenerationParams, i: int) -> GenerationParams:
    """Branch i of one request: seed S + i when a seed S is given (else each branch gets
    a fresh one when it is grown)."""
    return params if params.seed is None else replace(params, seed=params.seed + i)


def plan_samples(source: ForkSource, position: int, n: int, keep_token: bool,
                 params: GenerationParams) -> list[PlannedBranch]:
    """N continuations from `position`, each with its own seed (params.seed + i when a
    seed is given, else fresh ones): keeping the trace's token at `position` or drawing
    it anew."""
    from models.decoding import resolve_seed

    check_position(source, position)
    if n < 1:
        raise ForkError(f"--sample must be at least 1, not {n}")
    params = resolve_seed(params)  # fresh seeds still run S, S + 1, ... within a request
    forced = [source.steps[position].token_id] if keep_token else []
    label = "keep token" if keep_token else "resample token"
    return [PlannedBranch(list(forced), _nth_seed(params, i), "sample", f"{label} #{i + 1}")
            for i in range(n)]


# ---------------------------------------------------------------- growing


def grow(
    lm: LoadedModel,
    store: Store,
    source: ForkSource,
    position: int,
    plan: Sequence[PlannedBranch],
    *,
    prefix_cache: PrefixCache | None = None,
    cancel: threading.Event | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, TokenStep], None] | None = None,
) -> list[ForkResult]:
    """Grow the planned branches in one batch, saving each as a child trace as its
    tokens arrive. ``on_start(row, trace_id)`` once the rows exist; ``on_step(row,
    step)`` per token. Interrupted (``cancel`` or Ctrl-C): every branch keeps its tokens,
    marked stopped."""
    from forkview.pipeline import model_row_id, record_answer
    from models.branch_types import BranchRequest
    from models.decoding import resolve_seed
    from models.engine import grow_branches
    from models.errors import ModelError

    check_position(source, position)
    check_tokenizer(store, source, lm)
    if not plan:
        raise ForkError("nothing to grow")
    model_id = model_row_id(store, lm)
    plan = [replace(b, params=resolve_seed(b.params)) for b in plan]
    ids = []
    for b in plan:
        ids.append(store.start_trace(
            model_id=model_id, prompt_id=source.info.prompt_id or 0,
            prompt_token_ids=source.prompt_ids, params=b.params,
            parent_trace_id=source.info.id, fork_position=position,
            forced_token_ids=b.forced, origin=b.origin))
    for row, tid in enumerate(ids):
        if on_start:
            on_start(row, tid)
    with ExitStack() as stack:
        writers = [stack.enter_context(store.writer(tid)) for tid in ids]

        def step_cb(row: int, step: TokenStep) -> None:
            writers[row].add(step)
            if on_step:
                on_step(row, step)

        try:
            outputs = grow_branches(
                lm, source.prompt_ids, source.token_ids, position,
                [BranchRequest(tuple(b.forced), b.params) for b in plan],
                prefix_cache=prefix_cache, cancel=cancel, on_step=step_cb)
        except ModelError as e:
            raise ForkError(str(e)) from e
        results = []
        for b, tid, out, w in zip(plan, ids, outputs, writers, strict=True):
            status = "stopped" if out.stop_reason == "interrupted" else "complete"
            w.finish(status, out.stop_reason or None)
            results.append(ForkResult(trace_id=tid, origin=b.origin, output=out, status=status))
    head = "".join(s.text for s in source.steps[:position])
    for r in results:
        r.answer, r.correct = record_answer(store, r.trace_id, head + r.output.text,
                                            source.info.reference_answer,
                                            stop_reason=r.output.stop_reason)
    return results


# ---------------------------------------------------------------- replay


def check_replayable(info: TraceInfo) -> None:
    if info.status == "running":
        raise ForkError(f"trace {info.id} is still running")
    if info.origin == "rollout":
        raise ForkError(f"trace {info.id} is a rollout continuation: it was drawn in its MI "
                        "run's batch from one shared generator, so it cannot be replayed alone; "
                        "re-run that MI run with the same parameters instead")


def replay(lm: LoadedModel, store: Store, trace_id: int,
           cancel: threading.Event | None = None) -> ReplayResult:
    """Regenerate a trace from its stored provenance (prompt ids, parent prefix, forced
    ids, parameters, seed) and compare token for token with what is stored."""
    from models.branch_types import BranchRequest
    from models.engine import grow_branches, stream_annotated

    info = store.trace(trace_id)
    check_replayable(info)
    stored = store.tokens(trace_id)
    if info.parent_trace_id is None:
        source = ForkSource(info=info, steps=stored)
        check_tokenizer(store, source, lm)
        steps = list(stream_annotated(lm, info.prompt_token_ids, info.params, cancel=cancel))
        offset = 0
    else:
        parent = load_source(store, info.parent_trace_id)
        check_tokenizer(store, parent, lm)
        pos = info.fork_position or 0
        out = grow_branches(lm, parent.prompt_ids, parent.token_ids, pos,
                            [BranchRequest(tuple(info.forced_token_ids or ()), info.params)],
                            cancel=cancel)[0]
        steps = out.steps
        offset = pos
    a = [s.token_id for s in stored]
    b = [s.token_id for s in steps]
    first = None
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            first = i
            break
    if first is None and len(a) != len(b):
        first = n
    upto = n if first is None else first
    diff = max((abs(stored[i].logprob - steps[i].logprob) for i in range(upto)), default=0.0)
    note = ""
    if info.status == "stopped" and first == len(a) and len(b) > len(a):
        # A stopped trace is a prefix of what its parameters would have made.
        note = "the stored trace was stopped early; its tokens are a prefix of the replay"
    return ReplayResult(
        trace_id=trace_id, matches=first is None or bool(note), compared=upto,
        stored_ids=a, replayed_ids=b,
        first_mismatch=None if first is None else first + offset,
        max_logprob_diff=diff, note=note,
    )


# ---------------------------------------------------------------- tree


@dataclass
class FamilyNode:
    """One trace of a family (`forkview tree`, the tree screen): the fields of
    forkview.trace_json.TREE_NODE, children ordered as stored (by fork position)."""

    trace_id: int
    uid: str
    origin: str
    parent_trace_id: int | None
    fork_position: int | None
    forced_token_ids: list[int] | None
    status: str
    stop_reason: str | None
    n_tokens: int
    answer: str | None
    correct: bool | None
    model: str
    text: str
    children: list[FamilyNode] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """`forkview tree --json`: TREE_NODE's keys in their order, children nested."""
        from forkview.trace_json import TREE_NODE

        return {k: ([c.to_json() for c in self.children] if k == "children"
                    else getattr(self, k)) for k in TREE_NODE}


def family_tree(store: Store, trace_id: int) -> FamilyNode:
    """The family of a trace's root, children by fork position; each node has its id,
    origin, fork position, forced tokens, status, answer and correctness, and length."""
    from forkview.trace_json import TREE_NODE, trace_to_json

    members = store.family(trace_id)
    nodes = {t.id: FamilyNode(**trace_to_json(t, TREE_NODE, children=[])) for t in members}
    root = None
    for t in members:
        if t.parent_trace_id is None or t.parent_trace_id not in nodes:
            root = nodes[t.id] if root is None else root
        else:
            nodes[t.parent_trace_id].children.append(nodes[t.id])
    if root is None:
        raise StoreError(f"no trace with id {trace_id}")
    return root
