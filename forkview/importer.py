"""`forkview import`: traces generated elsewhere, scored teacher-forced and stored.

A JSONL (one object per line) or Parquet file holds one trace per line or row:

- the prompt: `prompt` (text; also `question`, `problem`) or `messages` (a chat list of
  {"role", "content"}), or the field `--prompt-field` names (text or a chat list). Text is
  encoded exactly as `forkview annotate` encodes a prompt (models.prompting.encode_prompt:
  the chat template unless --raw, with --system and --enable-thinking); a chat list goes
  through the model's chat template with the generation prompt added (--system put first
  when the list has no system message; --enable-thinking passed to the template). A chat
  list whose last message is the assistant's and no response field: that message is the
  response.
- the response: its token ids (`response_ids`, `token_ids`), taken as given, or its text
  (`response`, `completion`), tokenised with the model's tokenizer without special tokens
  (ids win when a row has both); `--response-field` names another field, text or ids.
  Text does not carry the end-of-sequence token a generation may have ended with; ids do.
- optional: `answer` (or `solution`; `--answer-field`; GSM8K's "#### 72" and \\boxed{}
  are split as for prompt files), `solution`, `id` (`--id-field`), `set` (default the
  file's stem; `--set NAME` overrides), and the sampling settings it was generated with,
  `temperature` (default 1), `top_p`, `top_k`, `seed`, stored with the trace
  (`sampling_entropy` is that of the distribution those settings give).

Each trace is one forward pass over prompt + response (or one padded batch of several,
right-padded so that no real token sees a pad): per token the full-vocabulary entropy at
T = 1, log-prob, rank and top-k alternatives, computed by the function generation uses
(models.generate._annotate) from the logits before the token, so position t holds what
generation would have recorded for token t. Traces are stored with origin `import`,
status complete, stop_reason "import", their answer extracted as for generated traces
and their thinking span found as for generated traces (models/thinking.py).

Provenance: meta row `import:<trace uid>` = JSON {"file": absolute path, "line" (JSONL)
or "row" (Parquet), "sha256": of the line's bytes without its line ending (of the row's
canonical JSON for Parquet), "format", "imported_at"}; the prompt row has the set and
id. A line whose sha256 is already there for a complete trace of the same model row
(same model, dtype and device) is refused as already imported, so importing a file
twice adds nothing; so is a repeat of an earlier line of the same file.

Bad lines are skipped with one reason each (`on_skip`); the rest is imported.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forkview.prompt_sets import ANSWER_FIELDS, ID_FIELDS, PROMPT_FIELDS, split_reference
from models.engine import vocab_size as engine_vocab_size
from models.errors import one_line
from models.types import GenerationParams, TokenStep
from store import Store

if TYPE_CHECKING:
    from models.estimators import Estimator
    from models.loading import LoadedModel

IMPORT_SUFFIXES = (".jsonl", ".ndjson", ".parquet", ".pq")
MESSAGES_FIELD = "messages"
IMPORT_PROMPT_FIELDS = (*PROMPT_FIELDS, MESSAGES_FIELD)
RESPONSE_ID_FIELDS = ("response_ids", "token_ids")
RESPONSE_TEXT_FIELDS = ("response", "completion")
DEFAULT_TEMPERATURE = 1.0  # rows that do not say how they were sampled
STOP_REASON = "import"


class LineError(ValueError):
    """Why one line or row cannot be imported (one line of text, no location)."""


@dataclass(frozen=True)
class ImportFields:
    """Which field holds the prompt, the response, the reference and the id; None: the
    defaults (the first of IMPORT_PROMPT_FIELDS, RESPONSE_ID_FIELDS + RESPONSE_TEXT_FIELDS,
    ANSWER_FIELDS, ID_FIELDS a row has)."""

    prompt: str | None = None
    response: str | None = None
    answer: str | None = None
    id: str | None = None


@dataclass
class SourceRow:
    """One line (JSONL) or row (Parquet) as read, before it is understood."""

    where: str  # "file:line" or "file row n", for messages
    number: int  # line number (JSONL) or row number (Parquet), from 1
    sha256: str
    row: dict[str, Any] | None = None
    error: str | None = None  # unreadable: bad JSON, not UTF-8, not an object


@dataclass
class ImportItem:
    """A line understood and tokenised: what one imported trace will hold."""

    source: SourceRow
    prompt_text: str  # prompts.text: the prompt, or a chat list's JSON
    prompt_ids: list[int]
    response_ids: list[int]
    params: GenerationParams
    answer: str | None = None
    solution: str | None = None
    set_name: str | None = None
    source_id: str | None = None
    ids_given: bool = False


@dataclass
class Skipped:
    where: str
    number: int
    reason: str
    duplicate: bool = False  # already imported (or repeated in the file)


@dataclass
class ImportSummary:
    imported: list[int] = field(default_factory=list)  # trace ids, in file order
    skipped: list[Skipped] = field(default_factory=list)
    tokens: int = 0
    mi_runs: int = 0
    mi_failed: int = 0  # estimator runs that could not run (skipped) or failed
    interrupted: bool = False

    @property
    def duplicates(self) -> int:
        return sum(s.duplicate for s in self.skipped)


# ---------------------------------------------------------------------- reading
def check_source(path: str | Path) -> Path:
    """The file, if it is one forkview can import (ValueError with one line if not)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{p}: {'is a directory' if p.is_dir() else 'not found'}")
    if p.suffix.lower() not in IMPORT_SUFFIXES:
        raise ValueError(f"{p}: unsupported file type '{p.suffix}' (import reads .jsonl "
                         "or .parquet)")
    return p


def read_rows(path: str | Path) -> Iterator[SourceRow]:
    """Every non-blank line (or row) of the file, in order, each with its hash."""
    p = check_source(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        yield from _parquet_rows(p)
    else:
        yield from _jsonl_rows(p)


def _jsonl_rows(p: Path) -> Iterator[SourceRow]:
    with open(p, "rb") as f:
        for n, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\r\n")
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a byte-order mark
            if not line.strip():
                continue
            src = SourceRow(where=f"{p}:{n}", number=n,
                            sha256=hashlib.sha256(line).hexdigest())
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                src.error = f"not UTF-8 text ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                src.error = f"bad JSON ({e.msg} at column {e.colno})"
            else:
                if isinstance(obj, dict):
                    src.row = obj
                else:
                    src.error = f"expected a JSON object, got {type(obj).__name__}"
            yield src


def _parquet_rows(p: Path) -> Iterator[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{p}: not a readable Parquet file ({one_line(e)})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            canon = json.dumps(row, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False, default=str)
            yield SourceRow(where=f"{p} row {n}", number=n,
                            sha256=hashlib.sha256(canon.encode("utf-8")).hexdigest(),
                            row=row)


# ---------------------------------------------------------------------- understanding
def _pick(row: dict[str, Any], named: str | None, defaults: Sequence[str],
          option: str) -> str | None:
    if named is not None:
        if named not in row:
            raise LineError(f"no '{named}' field ({option})")
        return named
    return next((f for f in defaults if row.get(f) is not None), None)


def _text(row: dict[str, Any], key: str | None) -> str | None:
    if key is None:
        return None
    value = row.get(key)
    if isinstance(value, (list, tuple, dict)):
        raise LineError(f"field '{key}' is a {type(value).__name__}, not text")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise LineError(f"'{key}' is an empty chat list")
    out = []
    for i, m in enumerate(value):
        if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)):
            raise LineError(f"'{key}' message {i} is not an object with text 'role' and "
                            "'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _token_ids(value: Any, key: str, vocab: int) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise LineError(f"'{key}' is not a list of token ids")
    ids = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise LineError(f"'{key}' holds {v!r}, not a token id")
        if not 0 <= v < vocab:
            raise LineError(f"'{key}' holds token id {v}, outside the model's vocabulary "
                            f"(0..{vocab - 1})")
        ids.append(int(v))
    return ids


def _number(row: dict[str, Any], key: str, kind: type, lo: float, hi: float) -> Any:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None  # absent (Parquet writes a missing number as null or NaN)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise LineError(f"'{key}' must be a number in [{lo:g}, {hi:g}], got {value!r}")
    if kind is int and value != int(value):
        raise LineError(f"'{key}' must be a whole number, got {value!r}")
    return kind(value)


def encode_messages(lm: LoadedModel, messages: list[dict[str, str]], *,
                    system: str | None = None,
                    enable_thinking: bool | None = None) -> list[int]:
    """Token ids of a chat list through the model's chat template, the generation
    prompt added: what encode_prompt does for one user message, with the same
    `system` (put first only when the list has no system message) and
    `enable_thinking` settings (models.generate.with_system, template_kwargs)."""
    from models.prompting import apply_template, with_system

    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise LineError("a chat list needs a chat template and this model's tokenizer "
                        "has none (give the prompt as text)")
    ids = apply_template(tok, with_system(messages, system), enable_thinking)
    if lm.context_length and len(ids) >= lm.context_length:
        raise LineError(f"the prompt is {len(ids)} tokens but the model's context is "
                        f"{lm.context_length} tokens")
    return ids


def parse_row(lm: LoadedModel, src: SourceRow, fields: ImportFields, *, stem: str,
              set_name: str | None = None, raw: bool = False, alternatives: int = 10,
              vocab: int | None = None, system: str | None = None,
              enable_thinking: bool | None = None) -> ImportItem:
    """One line understood and tokenised; LineError with the reason when it cannot be."""
    from models.errors import ModelError
    from models.prompting import encode_prompt

    if src.error is not None:
        raise LineError(src.error)
    row = src.row or {}
    vocab = vocab or engine_vocab_size(lm)
    pkey = _pick(row, fields.prompt, IMPORT_PROMPT_FIELDS, "--prompt-field")
    if pkey is None:
        raise LineError("no prompt: no 'prompt' (or " + ", ".join(
            f"'{f}'" for f in IMPORT_PROMPT_FIELDS[1:]) + ") field")
    pvalue = row.get(pkey)
    response_value: Any = None
    rkey = _pick(row, fields.response, (*RESPONSE_ID_FIELDS, *RESPONSE_TEXT_FIELDS),
                 "--response-field")
    if isinstance(pvalue, (list, tuple)):
        if raw:
            raise LineError(f"--raw: the chat list '{pkey}' needs the chat template "
                            "(give the prompt as text)")
        messages = _messages(pvalue, pkey)
        if rkey is None and messages[-1]["role"] == "assistant" and len(messages) > 1:
            response_value, rkey = messages[-1]["content"], f"{pkey}[-1]"
            messages = messages[:-1]
        prompt_ids = encode_messages(lm, messages, system=system,
                                     enable_thinking=enable_thinking)
        if any(m["role"] == "system" for m in messages):
            system = None  # the list's own system message was used, not --system
        single = len(messages) == 1 and messages[0]["role"] == "user"
        prompt_text = (messages[0]["content"] if single
                       else json.dumps(messages, ensure_ascii=False))
    else:
        if pvalue is not None and not isinstance(pvalue, str):
            raise LineError(f"'{pkey}' is a {type(pvalue).__name__}, not text or a chat "
                            "list")
        prompt_text = pvalue or ""
        if not prompt_text.strip():
            raise LineError(f"empty prompt ('{pkey}')")
        try:
            prompt_ids = encode_prompt(lm, prompt_text, raw=raw, system=system,
                                       enable_thinking=enable_thinking)
        except ModelError as e:
            raise LineError(str(e)) from None
    if rkey is None:
        raise LineError("no response: no 'response' (or " + ", ".join(
            f"'{f}'" for f in (*RESPONSE_TEXT_FIELDS[1:], *RESPONSE_ID_FIELDS))
            + ") field")
    if response_value is None:
        response_value = row.get(rkey)
    if isinstance(response_value, (list, tuple)):
        response_ids, ids_given = _token_ids(response_value, rkey, vocab), True
    elif isinstance(response_value, str):
        if not response_value.strip():
            raise LineError(f"empty response ('{rkey}')")
        response_ids = [int(i) for i in lm.tokenizer(
            response_value, add_special_tokens=False)["input_ids"]]
        ids_given = False
    elif response_value is None:
        raise LineError(f"empty response ('{rkey}')")
    else:
        raise LineError(f"'{rkey}' is a {type(response_value).__name__}, not text or a "
                        "list of token ids")
    if not response_ids:
        raise LineError(f"empty response ('{rkey}')")
    total = len(prompt_ids) + len(response_ids)
    if lm.context_length and total > lm.context_length:
        raise LineError(f"prompt + response are {total} tokens but the model's context is "
                        f"{lm.context_length} tokens")
    akey = _pick(row, fields.answer, ANSWER_FIELDS, "--answer-field")
    reference = _text(row, akey)
    answer, solution = split_reference(reference) if reference else (None, "")
    if akey != "solution":
        solution = _text(row, "solution") or solution
    temperature = _number(row, "temperature", float, 0.0, 100.0)
    top_p = _number(row, "top_p", float, 0.0, 1.0)
    top_k = _number(row, "top_k", int, 0, 10**9)
    seed = _number(row, "seed", int, -(2**63), 2**63 - 1)
    if top_p == 0.0:
        raise LineError("'top_p' must be in (0, 1], got 0")
    params = GenerationParams(
        max_new_tokens=len(response_ids),
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p, top_k=top_k or 0, seed=seed,
        top_alternatives=alternatives, raw=raw, system=system,
        enable_thinking=enable_thinking)
    return ImportItem(
        source=src, prompt_text=prompt_text, prompt_ids=prompt_ids,
        response_ids=response_ids, params=params, answer=answer, solution=solution or None,
        set_name=set_name or _text(row, "set") or stem,
        source_id=_text(row, _pick(row, fields.id, ID_FIELDS, "--id-field")),
        ids_given=ids_given)


# ---------------------------------------------------------------------- scoring
def score_batch(lm: LoadedModel, items: Sequence[ImportItem]) -> list[list[TokenStep]]:
    """Teacher-forced annotation of several traces, in as few forward passes as the
    engine allows (models.engine.score_many)."""
    from models.engine import score_many

    return score_many(lm, [(it.prompt_ids, it.response_ids, it.params) for it in items])


# ---------------------------------------------------------------------- storing
def store_item(store: Store, model_id: int, item: ImportItem, steps: Sequence[TokenStep],
               path: Path, fmt: str, tokenizer: Any = None) -> int:
    """One scored item as a complete trace with origin `import` and its provenance, and
    its thinking span (the rendered prompt decoded with `tokenizer` tells whether the
    prompt opened the thinking part; without one, the response alone does)."""
    from forkview.pipeline import record_answer, record_think_span
    from store.db import now_iso

    prompt_id = store.add_prompt(item.prompt_text, reference_answer=item.answer,
                                 reference_solution=item.solution,
                                 source_set=item.set_name, source_id=item.source_id)
    tid = store.start_trace(model_id=model_id, prompt_id=prompt_id,
                            prompt_token_ids=item.prompt_ids, params=item.params,
                            origin="import")
    where = "row" if fmt == "parquet" else "line"
    store.add_import_provenance(tid, {
        "file": str(path.resolve()), where: item.source.number, "sha256": item.source.sha256,
        "format": fmt, "response": "token_ids" if item.ids_given else "text",
        "imported_at": now_iso(),
    })
    # One write at the end: the tokens are all known.
    with store.writer(tid, flush_every=len(steps) + 1, flush_seconds=math.inf) as w:
        w.add_all(steps)
        w.finish("complete", STOP_REASON)
    record_answer(store, tid, "".join(s.text for s in steps), item.answer,
                  stop_reason=STOP_REASON)
    record_think_span(store, tid, tokenizer, item.prompt_ids, [s.text for s in steps])
    return tid


def import_file(
    lm: LoadedModel,
    store: Store,
    path: str | Path,
    *,
    fields: ImportFields | None = None,
    set_name: str | None = None,
    raw: bool = False,
    system: str | None = None,
    enable_thinking: bool | None = None,
    batch: int = 8,
    alternatives: int = 10,
    estimators: Sequence[Estimator] = (),
    cancel: threading.Event | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
    on_trace: Callable[[int, ImportItem], None] | None = None,
    on_mi: Callable[[int, str, str], None] | None = None,
) -> ImportSummary:
    """Import every good line of the file (see the module docstring); `batch` traces
    share a forward pass. Then, with `estimators`, each runs on each imported trace
    (forkview.mi.run_many; one that cannot run or fails is reported through `on_mi` and
    the rest go on). Ctrl-C stops cleanly: what is stored stays, `interrupted` is set."""
    from forkview.mi import MIOutcome, jobs_for, run_many
    from forkview.pipeline import model_row_id

    fields = fields or ImportFields()
    p = check_source(path)
    fmt = "parquet" if p.suffix.lower() in (".parquet", ".pq") else "jsonl"
    model_id = model_row_id(store, lm)
    seen = dict(store.imported_hashes(model_id))  # sha256 -> trace id (or -line)
    vocab = engine_vocab_size(lm)
    summary = ImportSummary()

    def skip(src: SourceRow, reason: str, duplicate: bool = False) -> None:
        s = Skipped(src.where, src.number, reason, duplicate)
        summary.skipped.append(s)
        if on_skip:
            on_skip(s)

    def flush(pending: list[ImportItem]) -> None:
        if not pending:
            return
        for item, steps in zip(pending, score_batch(lm, pending), strict=True):
            tid = store_item(store, model_id, item, steps, p, fmt, lm.tokenizer)
            summary.imported.append(tid)
            summary.tokens += len(steps)
            if on_trace:
                on_trace(tid, item)
        pending.clear()

    pending: list[ImportItem] = []
    try:
        for src in read_rows(p):
            if cancel is not None and cancel.is_set():
                summary.interrupted = True
                break
            earlier = seen.get(src.sha256)
            if earlier is not None:
                skip(src, f"already imported as trace {earlier}" if earlier > 0 else
                     f"the same as line {-earlier}" if fmt == "jsonl" else
                     f"the same as row {-earlier}", duplicate=True)
                continue
            try:
                item = parse_row(lm, src, fields, stem=p.stem, set_name=set_name, raw=raw,
                                 alternatives=alternatives, vocab=vocab, system=system,
                                 enable_thinking=enable_thinking)
            except LineError as e:
                skip(src, str(e))
                continue
            seen[src.sha256] = -src.number
            pending.append(item)
            if len(pending) >= batch:
                flush(pending)
        flush(pending)
    except KeyboardInterrupt:
        summary.interrupted = True
        return summary
    def mi_done(o: MIOutcome) -> None:
        # one estimator on one trace that cannot run or fails: reported, the rest go on
        if o.status in ("complete", "stopped"):
            summary.mi_runs += 1
        elif o.status in ("skipped", "failed"):
            summary.mi_failed += 1
        if on_mi:
            on_mi(o.job.trace_id, o.job.estimator.name, o.label)

    try:
        runs = run_many(lm, store, jobs_for(summary.imported, estimators), model_id=model_id,
                        own_model=True, cancel=cancel, on_outcome=mi_done)
    except KeyboardInterrupt:
        summary.interrupted = True
        return summary
    summary.interrupted = runs.interrupted
    return summary
