"""A saved trace as JSON: the one mapping from a trace record (store.TraceInfo) to the
keys every `--json` output and the family tree use.

Each output names its keys, in its own order (`GENERATED`, `BRANCH`, `LISTED`,
`TREE_NODE`); a key's value comes from the record unless the caller gives it (what the
record does not hold: the loaded model's device and dtype, the tokens, children).
Cheap to import: no store, no model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from store import TraceInfo

FIELDS: dict[str, Callable[[TraceInfo], Any]] = {
    "trace_id": lambda t: t.id,
    "uid": lambda t: t.uid,
    "status": lambda t: t.status,
    "stop_reason": lambda t: t.stop_reason,
    "model": lambda t: t.model_name,
    "model_spec": lambda t: t.model_spec,
    "prompt": lambda t: t.prompt,
    "reference_answer": lambda t: t.reference_answer,
    "prompt_token_ids": lambda t: t.prompt_token_ids,
    "params": lambda t: t.params.to_json(),
    "parent_trace_id": lambda t: t.parent_trace_id,
    "fork_position": lambda t: t.fork_position,
    "forced_token_ids": lambda t: t.forced_token_ids,
    "origin": lambda t: t.origin,
    "text": lambda t: t.text,
    "answer": lambda t: t.answer,
    "correct": lambda t: t.correct,
    "n_tokens": lambda t: t.n_tokens,
    "started_at": lambda t: t.started_at,
    "finished_at": lambda t: t.finished_at,
    "tokens_per_second": lambda t: t.tokens_per_second,
}

# `forkview annotate --json`: the trace just generated, its model as loaded, its tokens.
GENERATED = ("trace_id", "model", "model_spec", "device", "dtype", "prompt",
             "reference_answer", "prompt_token_ids", "params", "status", "stop_reason",
             "text", "answer", "correct", "tokens")
# `forkview fork --json`: one branch, as GENERATED plus where it comes from.
BRANCH = ("trace_id", "uid", "model", "model_spec", "device", "dtype", "prompt",
          "reference_answer", "prompt_token_ids", "params", "status", "stop_reason",
          "parent_trace_id", "fork_position", "forced_token_ids", "origin", "text",
          "full_text", "answer", "correct", "tokens")
# `forkview traces --json`: one entry of the list (no tokens).
LISTED = ("trace_id", "uid", "status", "stop_reason", "model", "model_spec", "prompt",
          "reference_answer", "answer", "correct", "n_tokens", "text", "started_at",
          "finished_at", "tokens_per_second", "parent_trace_id", "fork_position", "origin",
          "forced_token_ids", "params")
# `forkview tree --json` and the tree screen (forkview.forks.family_tree): one node.
TREE_NODE = ("trace_id", "uid", "origin", "parent_trace_id", "fork_position",
             "forced_token_ids", "status", "stop_reason", "n_tokens", "answer", "correct",
             "model", "text", "children")


def trace_to_json(info: TraceInfo, keys: Sequence[str], **values: Any) -> dict[str, Any]:
    """The trace's `keys`, in that order: each taken from `values` when given there,
    else from the record (`FIELDS`)."""
    return {k: values[k] if k in values else FIELDS[k](info) for k in keys}
