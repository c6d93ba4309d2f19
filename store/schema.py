"""The SQLite schema, as SQLModel tables.

Designed to be read by a person with plain SQL or Datasette (see README "Database"):
one row per model, prompt and trace, and one row per generated token in `tokens`
(primary key (trace_id, position)), with the top-k alternatives as a JSON array so
`json_each(tokens.top)` unpacks them. Times are ISO-8601 UTC text; entropies and
log-probabilities are in nats.
"""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

# Version 1: first release layout. Version 2 added traces.stop_reason,
# traces.tokens_per_second, traces.host and traces.pid (crash recovery). Version 3 added
# prompts.reference_solution, traces.answer/answer_method/correct and the MI tables
# mi_runs and mi_values. Version 4 added models.tokenizer_hash, traces.origin and the
# token_scores table (a trace's tokens scored by a second model). Version 5 added
# traces.system, traces.enable_thinking (chat template settings) and traces.think_start,
# think_end and answer_start (the thinking part's token span, models/thinking.py) and
# models.backend (the engine: hf or llama.cpp).
SCHEMA_VERSION = 5

# How a trace came to be: generate (a root), fork (a chosen or typed token at a
# position), sample (one of N continuations sampled from a position), rollout (a
# continuation made by the rollout MI estimator), import (a root generated elsewhere and
# scored teacher-forced by `forkview import`; its provenance is in meta, key
# `import:<uid>`).
ORIGINS = ("generate", "fork", "sample", "rollout", "import")

# superseded: a stopped trace that a resumed batch made again (same model, prompt,
# parameters and seed); kept, but no longer counted, listed or exported by default.
STATUSES = ("running", "complete", "stopped", "failed", "superseded")


class Meta(SQLModel, table=True):
    __tablename__ = "meta"

    key: str = Field(primary_key=True)
    value: str


# What identifies a model (a `models` row), database-independently: two loads equal on
# these fields are the same model (Store.upsert_model, forkview merge, an MI run's
# "made with the trace's own model" test in forkview/mi.py).
MODEL_KEY = ("spec", "content_hash", "revision", "dtype", "device", "backend")


class ModelRow(SQLModel, table=True):
    __tablename__ = "models"

    id: int | None = Field(default=None, primary_key=True)
    name: str
    spec: str
    kind: str  # default | gguf | dir | hub | object
    content_hash: str | None = None  # sha256 of a GGUF file, or a file fingerprint
    revision: str | None = None  # hub commit
    # sha256 of the tokenizer's id -> token mapping and special ids: two models with the
    # same hash read the same token ids the same way (forking, rescoring).
    tokenizer_hash: str | None = None
    dtype: str
    device: str
    created_at: str
    # The engine that ran it: hf (transformers) | llama.cpp (models/engine.py).
    backend: str = "hf"


class PromptRow(SQLModel, table=True):
    __tablename__ = "prompts"

    id: int | None = Field(default=None, primary_key=True)
    text: str
    reference_answer: str | None = None
    reference_solution: str | None = None  # worked solution text (MI-Peaks' h_y input)
    source_set: str | None = None  # e.g. "arith"
    source_id: str | None = None  # id within the set
    created_at: str


class TraceRow(SQLModel, table=True):
    __tablename__ = "traces"
    __table_args__ = (
        Index("ix_traces_parent", "parent_trace_id"),
        Index("ix_traces_started", "started_at"),
        Index("ix_traces_model", "model_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    uid: str = Field(unique=True)  # stays the same when databases are merged
    model_id: int = Field(sa_column=Column(Integer, ForeignKey("models.id"), nullable=False))
    prompt_id: int = Field(sa_column=Column(Integer, ForeignKey("prompts.id"), nullable=False))
    parent_trace_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("traces.id"), nullable=True)
    )
    fork_position: int | None = None
    forced_token_ids: str | None = None  # JSON list
    origin: str = "generate"  # generate | fork | sample | rollout | import (ORIGINS)
    prompt_token_ids: str  # JSON list: exactly the ids fed to the model
    raw: bool = False  # True: prompt sent without the chat template
    system: str | None = None  # system message given to the chat template (--system)
    enable_thinking: bool | None = None  # passed to the chat template; NULL: not passed
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int
    seed: int | None = None
    stop: str = "[]"  # JSON list of stop strings
    top_alternatives: int
    status: str  # running | complete | stopped | failed
    stop_reason: str | None = None  # eos | length | stop_string | context | interrupted | crashed
    error: str | None = None
    started_at: str
    finished_at: str | None = None
    text: str = ""
    n_tokens: int = 0
    tokens_per_second: float | None = None
    host: str | None = None
    pid: int | None = None
    forkview_version: str
    answer: str | None = None  # final answer extracted from text
    answer_method: str | None = None  # extractor that found it (boxed, final_answer, ...)
    correct: bool | None = None  # answer equivalent to the prompt's reference answer
    # The thinking part (<think>...</think>), models/thinking.py: token positions
    # [think_start, think_end) of its content; answer_start the first answer position
    # (NULL with a thinking part: cut off while thinking). All NULL: no thinking part,
    # or a branch (not computed for branches).
    think_start: int | None = None
    think_end: int | None = None
    answer_start: int | None = None


class TokenRow(SQLModel, table=True):
    __tablename__ = "tokens"

    trace_id: int = Field(
        sa_column=Column(Integer, ForeignKey("traces.id", ondelete="CASCADE"), primary_key=True)
    )
    position: int = Field(primary_key=True)  # 0 = first generated token
    token_id: int
    text: str
    logprob: float  # ln p(token), T = 1
    rank: int  # 1 = argmax
    entropy: float  # nats, full vocabulary, T = 1
    sampling_entropy: float  # nats, distribution actually sampled from
    top: str = Field(sa_column=Column(Text, nullable=False))  # JSON [{token_id,text,prob}]


class TokenScoreRow(SQLModel, table=True):
    """A stored token as scored (teacher forced) by another model: `forkview rescore`.

    Aligned with tokens.position of the same trace; the values are those of the
    distribution of `model_id` at that step (T = 1, full vocabulary, nats).
    """

    __tablename__ = "token_scores"

    trace_id: int = Field(
        sa_column=Column(Integer, ForeignKey("traces.id", ondelete="CASCADE"), primary_key=True)
    )
    model_id: int = Field(
        sa_column=Column(Integer, ForeignKey("models.id"), primary_key=True)
    )
    position: int = Field(primary_key=True)
    logprob: float  # ln p(token) under model_id
    rank: int  # 1 = that model's argmax
    entropy: float  # nats
    top: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # JSON


class MIRunRow(SQLModel, table=True):
    """One estimator with one full parameter set applied to one trace.

    Re-running with other parameters makes another run, so both sets of values are
    kept; re-running with the same parameters resumes this one.
    """

    __tablename__ = "mi_runs"
    __table_args__ = (
        UniqueConstraint("trace_id", "estimator", "params", name="uq_mi_runs_params"),
    )

    id: int | None = Field(default=None, primary_key=True)
    trace_id: int = Field(
        sa_column=Column(Integer, ForeignKey("traces.id", ondelete="CASCADE"), nullable=False,
                         index=True)
    )
    estimator: str  # hsic | answer-gain | rollout | ...
    params: str  # canonical JSON (sorted keys) of the full parameter set
    info: str = "{}"  # JSON: what the run found (e.g. self_reference, sigma_y, model)
    model_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("models.id"), nullable=True)
    )
    status: str  # running | complete | stopped | failed
    error: str | None = None
    created_at: str
    finished_at: str | None = None


class MIValueRow(SQLModel, table=True):
    """The value of one run at one token; aligned with tokens.position (the value at t
    belongs to the forward step that emitted token t)."""

    __tablename__ = "mi_values"

    run_id: int = Field(
        sa_column=Column(Integer, ForeignKey("mi_runs.id", ondelete="CASCADE"), primary_key=True)
    )
    position: int = Field(primary_key=True)
    value: float | None = None  # nats for answer-gain and rollout; HSIC score for hsic
    detail: str | None = None  # JSON, e.g. a rollout's answer distribution per alternative
