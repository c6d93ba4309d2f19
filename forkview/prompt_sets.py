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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

def load_prompt_set(name: str) -> list[PromptItem]:
    """Resolve "builtin:arith" (or "arith") to the bundled set, or a path to its file."""
    key = name.strip()
    bare = key.removeprefix("builtin:")
    if bare == ARITH_SET:
        return arith_problems()
    if key.startswith("builtin:"):
        raise ValueError(f"unknown prompt set '{key}' (built in: "
                         + ", ".join(f"builtin:{s}" for s in BUILTIN_SETS) + ")")
    path = Path(key).expanduser()
    if path.exists() or path.suffix.lower() in (".jsonl", ".ndjson", ".csv"):
        return read_prompt_file(path)
    raise ValueError(f"unknown prompt set '{key}' (use builtin:arith or a .jsonl/.csv file)")


def read_prompt_file(path: str | Path) -> list[PromptItem]:
    """Prompts from a .jsonl (one object per line) or .csv file with a header.

    Fields: `prompt` (required), `answer`, `id`, `set` (optional). Missing ids become
    "<set>-000", ...; a missing set is the file's stem. Raises ValueError with a
    one-line message naming the file and, where it helps, the line.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "not found"
        raise ValueError(f"prompt file {what}: {p}")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(p)
    elif suffix == ".csv":
        rows = _csv_rows(p)
    else:
        raise ValueError(f"{p}: unsupported prompt file type '{p.suffix}' (use .jsonl or .csv)")
    items: list[PromptItem] = []
    ids: set[str] = set()
    for line, row in rows:
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{p}:{line}: missing or empty 'prompt' field")
        set_name = _text(row.get("set")) or p.stem
        item_id = _text(row.get("id")) or f"{set_name}-{len(items):03d}"
        if item_id in ids:
            raise ValueError(f"{p}:{line}: duplicate id '{item_id}'")
        ids.add(item_id)
        items.append(PromptItem(id=item_id, prompt=prompt, answer=_text(row.get("answer")),
                                set=set_name, solution=_text(row.get("solution")) or ""))
    if not items:
        raise ValueError(f"{p}: no prompts in the file")
    return items


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


def _jsonl_rows(p: Path) -> list[tuple[int, dict[str, object]]]:
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
        rows.append((n, obj))
    return rows


def _csv_rows(p: Path) -> list[tuple[int, dict[str, object]]]:
    reader = csv.DictReader(_read_text(p).splitlines(keepends=True))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if "prompt" not in fields:
        raise ValueError(f"{p}: no 'prompt' column in the CSV header")
    reader.fieldnames = fields
    rows = []
    try:
        for row in reader:
            # line_num counts physical lines, so quoted multi-line prompts still point
            # at the line where the record ends.
            rows.append((reader.line_num, dict(row)))
    except csv.Error as e:
        raise ValueError(f"{p}:{reader.line_num}: bad CSV ({e})") from e
    return rows
