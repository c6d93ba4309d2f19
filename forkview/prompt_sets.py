"""Prompt sets: the bundled arithmetic word problems and user prompt files.

The arithmetic set gives every trace a gold answer and a worked reference solution
(the text MI-Peaks-style h_y is computed from), so entropy and MI can be related to
whether the model got the answer right. Problems are generated, not hand-written:
a seeded generator builds a short chain of operations on one quantity, tells it as a
story, and computes the answer while it writes the solution. Each item also carries
the chain as an arithmetic expression so a test can check the answer independently.

No torch or Textual here: listing prompts must stay instant.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import one_line

ARITH_SET = "arith"
BUILTIN_SETS = ("arith",)


@dataclass(frozen=True)
class PromptItem:
    """One prompt with, when known, its gold answer and a reference solution."""

    id: str
    prompt: str
    answer: str | None  # integer as text for arith; None when a file gives none
    set: str = ARITH_SET
    solution: str = ""  # worked step-by-step solution ending with the answer
    # The operations as a Python arithmetic expression ("(12 + 5) * 3"); "" when unknown.
    expression: str = ""


# ---------------------------------------------------------------------- arith set

# (name, subject pronoun)
_PEOPLE = [
    ("Maya", "she"), ("Leo", "he"), ("Sara", "she"), ("Omar", "he"), ("Nina", "she"),
    ("Tom", "he"), ("Aisha", "she"), ("Ben", "he"), ("Lucia", "she"), ("Ken", "he"),
    ("Priya", "she"), ("Sam", "he"), ("Emma", "she"), ("Raj", "he"), ("Zoe", "she"),
    ("Ivan", "he"),
]
# (plural noun, edible): edible things can be eaten, the rest get lost.
_OBJECTS = [
    ("apples", True), ("cookies", True), ("oranges", True), ("muffins", True),
    ("candies", True), ("pears", True), ("marbles", False), ("stickers", False),
    ("pencils", False), ("stamps", False), ("shells", False), ("cards", False),
    ("books", False), ("balloons", False),
]
_CONTAINERS = ["bags", "boxes", "packs", "jars", "baskets"]


@dataclass
class _Chain:
    """A story being built: the running value, and the text of each part."""

    name: str
    pron: str
    obj: str
    edible: bool
    value: int
    expr: str
    sentences: list[str]
    steps: list[str]
    n_ops: int = 0

    def apply(self, expr_op: str, operand: str, new_value: int, sentence: str | None,
              step: str) -> None:
        """Record one operation; `sentence` is None when the question tells it."""
        self.expr = f"({self.expr} {expr_op} {operand})"
        self.value = new_value
        if sentence is not None:
            self.sentences.append(sentence)
        self.steps.append(step)
        self.n_ops += 1


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _op_buy(c: _Chain, rng: random.Random, friend: str) -> bool:
    b = rng.randint(2, 15)
    new = c.value + b
    c.apply("+", str(b), new, f"{_cap(c.pron)} buys {b} more {c.obj}.",
            f"{_cap(c.pron)} buys {b} more: {c.value} + {b} = {new}.")
    return True


def _op_gift(c: _Chain, rng: random.Random, friend: str) -> bool:
    b = rng.randint(2, 12)
    new = c.value + b
    # The protagonist stays the subject, so the next "she"/"he" is unambiguous.
    c.apply("+", str(b), new, f"{c.name} gets {b} {c.obj} from {friend}.",
            f"{_cap(c.pron)} gets {b} from {friend}: {c.value} + {b} = {new}.")
    return True


def _op_packs(c: _Chain, rng: random.Random, friend: str) -> bool:
    k, m = rng.randint(2, 4), rng.randint(2, 6)
    box = rng.choice(_CONTAINERS)
    new = c.value + k * m
    c.apply("+", f"{k} * {m}", new,
            f"{_cap(c.pron)} buys {k} {box} with {m} {c.obj} in each.",
            f"{k} {box} of {m} is {k} * {m} = {k * m}, so {c.value} + {k * m} = {new}.")
    return True


def _op_give(c: _Chain, rng: random.Random, friend: str) -> bool:
    if c.value < 4:
        return False
    b = rng.randint(2, min(12, c.value - 2))
    new = c.value - b
    c.apply("-", str(b), new, f"{_cap(c.pron)} gives {b} {c.obj} to {friend}.",
            f"{_cap(c.pron)} gives away {b}: {c.value} - {b} = {new}.")
    return True


def _op_lose(c: _Chain, rng: random.Random, friend: str) -> bool:
    if c.value < 4:
        return False
    b = rng.randint(2, min(9, c.value - 2))
    new = c.value - b
    verb = "eats" if c.edible else "loses"
    c.apply("-", str(b), new, f"{_cap(c.pron)} {verb} {b} of them.",
            f"{_cap(c.pron)} {verb} {b}: {c.value} - {b} = {new}.")
    return True


def _op_double(c: _Chain, rng: random.Random, friend: str) -> bool:
    if c.value > 30:
        return False
    k, word = rng.choice([(2, "doubles"), (3, "triples")]) if c.value <= 15 else (2, "doubles")
    new = c.value * k
    c.apply("*", str(k), new, f"Then the number of {c.obj} {c.name} has {word}.",
            f"It {word}: {c.value} * {k} = {new}.")
    return True


_MIDDLE_OPS: list[Callable[[_Chain, random.Random, str], bool]] = [
    _op_buy, _op_gift, _op_packs, _op_give, _op_lose, _op_double,
]


def _finish(c: _Chain, rng: random.Random) -> str:
    """The closing question, possibly one last operation (share or sell)."""
    kind = rng.choice(["count", "share", "sell"])
    if kind == "share":
        ways = [k for k in range(2, 7) if c.value % k == 0 and c.value // k >= 2]
        if ways:
            k = rng.choice(ways)
            new = c.value // k
            c.apply("/", str(k), new, None, f"Shared among {k}: {c.value} / {k} = {new}.")
            return (f"{_cap(c.pron)} shares all of them equally among {k} friends. "
                    f"How many {c.obj} does each friend get?")
    if kind == "sell" and c.value <= 40:
        p = rng.randint(2, 5)
        new = c.value * p
        c.apply("*", str(p), new, None, f"Sold at {p} dollars each: {c.value} * {p} = {new}.")
        return (f"{_cap(c.pron)} sells all of them for {p} dollars each. "
                f"How many dollars does {c.name} get?")
    return f"How many {c.obj} does {c.name} have now?"


def _problem(rng: random.Random) -> tuple[str, str, str, str]:
    """(prompt, answer, solution, expression) of one 2-4 step problem."""
    while True:
        (name, pron), (friend, _) = rng.sample(_PEOPLE, 2)
        obj, edible = rng.choice(_OBJECTS)
        start = rng.randint(3, 20)
        c = _Chain(name, pron, obj, edible, start, str(start),
                   [f"{name} has {start} {obj}."], [f"{name} starts with {start} {obj}."])
        target = rng.randint(2, 3)  # middle operations; the ending may add one more
        tries, last = 0, None
        while c.n_ops < target and tries < 20:
            tries += 1
            # The same kind of step twice in a row reads like a copy-paste slip.
            op = rng.choice([o for o in _MIDDLE_OPS if o is not last])
            if op(c, rng, friend):
                last = op
        question = _finish(c, rng)
        if 2 <= c.n_ops <= 4 and c.value <= 300:
            break
    prompt = " ".join([*c.sentences, question])
    # Top-level parentheses are noise for a reader.
    expr = c.expr[1:-1] if c.expr.startswith("(") else c.expr
    solution = "\n".join([*c.steps, f"The answer is {c.value}."])
    return prompt, str(c.value), solution, expr


def arith_problems(n: int = 24, seed: int = 0) -> list[PromptItem]:
    """`n` multi-step arithmetic word problems, the same for the same (n, seed).

    Ids are "arith-000", ... for seed 0 and "arith-s<seed>-000", ... otherwise, so
    problems from different seeds never share an id in one database.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"forkview-arith-{seed}")
    prefix = ARITH_SET if seed == 0 else f"{ARITH_SET}-s{seed}"
    items: list[PromptItem] = []
    seen: set[str] = set()
    while len(items) < n:
        prompt, answer, solution, expr = _problem(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        items.append(PromptItem(
            id=f"{prefix}-{len(items):03d}", prompt=prompt, answer=answer,
            set=ARITH_SET, solution=solution, expression=expr,
        ))
    return items


# ---------------------------------------------------------------------- loading

# Where a row's prompt, reference and id are found unless told (--prompt-field ...):
# the first of these fields the row has.
PROMPT_FIELDS = ("prompt", "question", "problem")
ANSWER_FIELDS = ("answer", "solution")
ID_FIELDS = ("id",)
FILE_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".parquet", ".pq")
DATASETS_HINT = "uv sync --extra datasets, or pip install 'forkview[datasets]'"
# owner/name, optionally :config (a Hugging Face dataset id, e.g. openai/gsm8k:main)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?")

# The records a prompt source yields (the planned `forkview import` reuses the loader).
Record = PromptItem


@dataclass(frozen=True)
class Fields:
    """Which field holds the prompt, the reference and the id; None: the defaults
    (PROMPT_FIELDS, ANSWER_FIELDS, ID_FIELDS, the first one a row has)."""

    prompt: str | None = None
    answer: str | None = None
    id: str | None = None

    @property
    def any(self) -> bool:
        return any(f is not None for f in (self.prompt, self.answer, self.id))


def load_prompt_set(name: str, fields: Fields | None = None,
                    split: str | None = None) -> list[PromptItem]:
    """Resolve "builtin:arith" (or "arith"), a prompt file or a dataset: load_records."""
    return load_records(name, fields, split)


def load_records(source: str, fields: Fields | None = None,
                 split: str | None = None) -> list[Record]:
    """Every prompt of a source, in order, with its reference answer and solution.

    `source`: "builtin:arith" (or "arith"); a .jsonl/.ndjson, .csv or .parquet file; a
    Hugging Face dataset, i.e. a `save_to_disk` folder or a hub id `owner/name[:config]`
    (or either after "hf:"), which needs the optional `datasets` extra. `split` picks a
    dataset's split (default "test", else "train"). A reference in GSM8K's form
    ("... #### 72") or with a MATH-style \boxed{...} is split into answer and worked
    solution (split_reference). A malformed row refuses the whole source: ValueError
    with one line naming the file and the line (or row, counted from 1).
    """
    fields = fields or Fields()
    key = source.strip()
    bare = key.removeprefix("builtin:")
    if bare == ARITH_SET or key.startswith("builtin:"):
        if fields.any or split is not None:
            raise ValueError(f"'{key}' is a built-in set: --split and the field options "
                             "go with a prompt file or dataset")
        if bare == ARITH_SET:
            return arith_problems()
        raise ValueError(f"unknown prompt set '{key}' (built in: "
                         + ", ".join(f"builtin:{s}" for s in BUILTIN_SETS) + ")")
    if key.startswith("hf:"):
        return read_dataset(key[3:], fields, split)
    path = Path(key).expanduser()
    if path.is_dir():
        return read_dataset(str(path), fields, split)
    if path.exists() or path.suffix.lower() in FILE_SUFFIXES:
        if split is not None:
            raise ValueError(f"{path}: --split goes with a Hugging Face dataset, not a file")
        return read_prompt_file(path, fields)
    if _HUB_ID.fullmatch(key):
        return read_dataset(key, fields, split)
    raise ValueError(f"unknown prompt set '{key}' (use builtin:arith, a .jsonl/.csv/.parquet "
                     "file, or a Hugging Face dataset folder or owner/name)")


def read_prompt_file(path: str | Path, fields: Fields | None = None) -> list[PromptItem]:
    """Prompts from a .jsonl (one object per line), .csv (with a header) or .parquet file.

    Fields (see load_records and Fields): the prompt (required), its reference answer,
    `id`, `set`, `solution` (optional). Missing ids become "<set>-000", ...; a missing
    set is the file's stem. Raises ValueError with a one-line message naming the file
    and, where it helps, the line (row, for Parquet).
    """
    fields = fields or Fields()
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "not found"
        raise ValueError(f"prompt file {what}: {p}")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows: Iterable[tuple[str, dict[str, Any]]] = _jsonl_rows(p)
    elif suffix == ".csv":
        rows = _csv_rows(p, fields)
    elif suffix in (".parquet", ".pq"):
        rows = _parquet_rows(p, fields)
    else:
        raise ValueError(f"{p}: unsupported prompt file type '{p.suffix}' "
                         "(use .jsonl, .csv or .parquet)")
    items = _items(rows, fields, p.stem)
    if not items:
        raise ValueError(f"{p}: no prompts in the file")
    return items


def read_dataset(spec: str, fields: Fields | None = None,
                 split: str | None = None) -> list[PromptItem]:
    """Prompts from a Hugging Face dataset: a `save_to_disk` folder or a hub id
    `owner/name[:config]`; `split` as in load_records. Needs the `datasets` extra."""
    fields = fields or Fields()
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{spec}: reading a Hugging Face dataset needs the optional "
                         f"`datasets` extra ({DATASETS_HINT})") from None
    local = Path(spec).expanduser()
    try:
        if local.is_dir():
            name = local.resolve().name
            obj = datasets.load_from_disk(str(local))
        else:
            repo, _, config = spec.partition(":")
            name = repo.rsplit("/", 1)[-1]
            obj = datasets.load_dataset(repo, config or None, split=split)
            if split is not None:  # asked for: load_dataset gave that split alone
                obj = datasets.DatasetDict({split: obj})
    except Exception as e:  # missing files, offline, a bad config: one line each
        where = "a saved dataset folder" if local.is_dir() else "a hub dataset"
        raise ValueError(f"{spec}: cannot load it as {where} "
                         f"({type(e).__name__}: {one_line(e)})") from None
    ds, split_name = _pick_split(obj, split, spec)
    src = f"{spec} (split {split_name})" if split_name else spec
    prefix = f"{name}-{split_name}" if split_name else name
    columns = list(ds.column_names)
    _check_columns(src, columns, fields)
    rows = ((f"{src} row {i}", dict(row)) for i, row in enumerate(ds, start=1))
    items = _items(rows, fields, name, id_prefix=prefix)
    if not items:
        raise ValueError(f"{src}: no prompts in the dataset")
    return items


def _pick_split(obj: Any, split: str | None, spec: str) -> tuple[Any, str | None]:
    """The dataset of one split from a DatasetDict (or a lone Dataset as it is)."""
    if isinstance(obj, dict):
        names = list(obj)
        if split is None:
            for default in ("test", "train"):
                if default in names:
                    return obj[default], default
            if len(names) == 1:
                return obj[names[0]], names[0]
            raise ValueError(f"{spec}: no 'test' or 'train' split; --split picks one of "
                             + ", ".join(names))
        if split not in names:
            raise ValueError(f"{spec}: no split '{split}' (splits: {', '.join(names)})")
        return obj[split], split
    own = None if getattr(obj, "split", None) is None else str(obj.split)
    if split is not None and own is not None and own != split:
        raise ValueError(f"{spec}: this folder holds the '{own}' split, not '{split}'")
    return obj, split or own


# ------------------------------------------------------------ references

_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<48/2=24>>" annotations


def split_reference(text: str) -> tuple[str | None, str]:
    """(reference answer, worked solution) of a dataset's reference field.

    GSM8K: "... #### 72" gives "72" and the text before it, its `<<...>>` calculator
    annotations removed. MATH: a solution with \boxed{...} gives the boxed content
    (nested braces kept; the last box wins) and the whole solution. Anything else is
    the answer itself, with no solution.
    """
    text = text.strip()
    mark = text.rfind("####")
    if mark >= 0 and text[mark + 4:].strip():
        return (text[mark + 4:].strip(),
                _CALCULATOR.sub("", text[:mark]).strip())
    if "\\boxed" in text or "\\fbox" in text:
        from models.answers import boxed

        found = boxed(text)
        if found:
            return found, text
    return text or None, ""


# ------------------------------------------------------------ rows to items

def _items(rows: Iterable[tuple[str, dict[str, Any]]], fields: Fields, stem: str,
           id_prefix: str | None = None) -> list[PromptItem]:
    """PromptItems from (where, row) pairs; `where` names the row in messages."""
    items: list[PromptItem] = []
    ids: set[str] = set()
    for where, row in rows:
        prompt_key = _field(where, row, fields.prompt, PROMPT_FIELDS, "--prompt-field")
        prompt = row.get(prompt_key) if prompt_key else None
        if not isinstance(prompt, str) or not prompt.strip():
            named = (f"'{fields.prompt}'" if fields.prompt else "'prompt'") + " field"
            if not fields.prompt:
                named += " (or " + ", ".join(f"'{f}'" for f in PROMPT_FIELDS[1:]) + ")"
            raise ValueError(f"{where}: missing or empty {named}")
        answer_key = _field(where, row, fields.answer, ANSWER_FIELDS, "--answer-field")
        reference = _scalar(where, row, answer_key)
        answer, solution = split_reference(reference) if reference else (None, "")
        if answer_key != "solution":  # a separate worked solution is preferred
            solution = _scalar(where, row, "solution" if "solution" in row else None) \
                or solution
        id_key = _field(where, row, fields.id, ID_FIELDS, "--id-field")
        set_name = _scalar(where, row, "set" if "set" in row else None) or stem
        # A dataset's split goes into default ids: its test and train rows never clash.
        prefix = id_prefix if id_prefix and set_name == stem else set_name
        item_id = _scalar(where, row, id_key) or f"{prefix}-{len(items):03d}"
        if item_id in ids:
            raise ValueError(f"{where}: duplicate id '{item_id}'")
        ids.add(item_id)
        items.append(PromptItem(id=item_id, prompt=prompt, answer=answer, set=set_name,
                                solution=solution))
    return items


def _field(where: str, row: dict[str, Any], named: str | None, defaults: tuple[str, ...],
           option: str) -> str | None:
    """The key a row holds the field under: the one named (which it must have), else
    the first of `defaults` it has; None when it has none."""
    if named is not None:
        if named not in row:
            raise ValueError(f"{where}: no '{named}' field ({option})")
        return named
    return next((f for f in defaults if f in row), None)


def _scalar(where: str, row: dict[str, Any], key: str | None) -> str | None:
    """A field as text: numbers are fine (answers often are), blanks mean absent; a
    list or mapping is refused (it would be stored as its Python spelling)."""
    if key is None:
        return None
    value = row.get(key)
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(f"{where}: field '{key}' is a {type(value).__name__}, not text")
    return _text(value)


def _check_columns(src: str, columns: list[str], fields: Fields) -> None:
    """A table's columns must hold a prompt, and every field named on the command line."""
    have = ", ".join(columns)
    for named, option in ((fields.prompt, "--prompt-field"), (fields.answer, "--answer-field"),
                          (fields.id, "--id-field")):
        if named is not None and named not in columns:
            raise ValueError(f"{src}: no '{named}' column ({option}); columns: {have}")
    if fields.prompt is None and not any(f in columns for f in PROMPT_FIELDS):
        raise ValueError(f"{src}: no 'prompt' column (nor "
                         + ", ".join(f"'{f}'" for f in PROMPT_FIELDS[1:])
                         + f"; --prompt-field NAME names another); columns: {have}")


def _text(value: object) -> str | None:
    """A field as text: numbers are fine (answers often are), blanks mean absent."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _read_text(p: Path) -> str:
    try:
        # utf-8-sig: spreadsheets often prepend a byte-order mark.
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise ValueError(f"cannot read prompt file {p}: {e.strerror}") from e


def _jsonl_rows(p: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for n, line in enumerate(_read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: bad JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{p}:{n}: expected a JSON object with a 'prompt' field")
        rows.append((f"{p}:{n}", obj))
    return rows


def _csv_rows(p: Path, fields: Fields) -> list[tuple[str, dict[str, Any]]]:
    # strict: a quote that is never closed (or text after a closing quote) is an error,
    # not a field that silently swallows the rest of the file.
    reader = csv.reader(_read_text(p).splitlines(keepends=True), strict=True)
    start = 1  # physical line where the record being read starts
    try:
        header = next(reader, None)
        columns = [f.strip() for f in header or []]
        _check_columns(str(p), columns, fields)
        rows = []
        start = reader.line_num + 1
        for record in reader:
            if record:  # a blank line
                # Messages name the line where the record starts (a quoted prompt can
                # run over several lines).
                if len(record) != len(columns):
                    raise ValueError(f"{p}:{start}: {len(record)} fields, the header has "
                                     f"{len(columns)}")
                rows.append((f"{p}:{start}", dict(zip(columns, record, strict=True))))
            start = reader.line_num + 1
    except csv.Error as e:
        why = ("a quoted field opened here is never closed" if "end of data" in str(e)
               else str(e))
        raise ValueError(f"{p}:{start}: bad CSV ({why})") from e
    return rows


def _parquet_rows(p: Path, fields: Fields) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{p}: not a readable Parquet file ({one_line(e)})") from None
    _check_columns(str(p), list(pf.schema_arrow.names), fields)

    def rows() -> Iterator[tuple[str, dict[str, Any]]]:
        n = 0
        try:
            for batch in pf.iter_batches(batch_size=10_000):
                for row in batch.to_pylist():
                    n += 1
                    yield f"{p} row {n}", row
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{p}: unreadable after row {n} ({one_line(e)})") from None

    return rows()
