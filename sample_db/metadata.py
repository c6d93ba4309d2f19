"""Datasette metadata for forkview databases, generated from docs/schema.md.

    uv run python sample_db/metadata.py [--check]   # writes (or checks) sample_db/metadata.json

`datasette -i sample_db/arith.db -m sample_db/metadata.json` then shows every table and
column with the description and unit that docs/schema.md gives it, a label column for
the tables other rows point to (so a trace's model shows by name), and the doc's example
queries as canned queries. Generated, never edited by hand: tests/test_schema_doc.py
checks that the committed file is what this script makes from the current doc.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "schema.md"
OUT = Path(__file__).resolve().parent / "metadata.json"
DATABASE = "arith"
# What a foreign key to the table shows in Datasette instead of the bare id.
LABELS = {"models": "name", "prompts": "source_id", "traces": "uid"}


def _cell(text: str) -> str:
    """A Markdown table cell as plain text: code marks and escapes removed."""
    return re.sub(r"\s+", " ", text.replace("\\|", "|").replace("`", "")).strip()


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [_cell(c) for c in cells]


def _sections(text: str) -> dict[str, str]:
    out = {}
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        m = re.match(r"`(\w+)`\n", part)
        if m:
            out[m.group(1)] = part[m.end():]
    return out


def _table_meta(body: str) -> dict[str, Any]:
    paragraphs = [p.strip() for p in body.split("\n\n") if p.strip()]
    description = _cell(paragraphs[0]) if paragraphs and not paragraphs[0].startswith(
        "|") else ""
    columns: dict[str, str] = {}
    for line in body.splitlines():
        if not line.startswith("| `"):
            continue
        cells = _split_row(line)
        if len(cells) < 3:
            continue
        if len(cells) == 3:  # column | type | meaning (no unit column)
            cells = [cells[0], cells[1], "", cells[2]]
        name, kind, unit, meaning = cells[0], cells[1], cells[2], " ".join(cells[3:])
        extra = f" [{unit}]" if unit else ""
        columns[name] = f"{meaning}{extra} ({kind})"
    return {"description": description, "columns": columns}


def _queries(text: str) -> dict[str, dict[str, str]]:
    """Each ```sql block of the doc with the paragraph before it as its title."""
    out: dict[str, dict[str, str]] = {}
    for m in re.finditer(r"((?:[^\n]+\n)+)\n```sql\n(.*?)```", text, re.S):
        title = " ".join(_cell(line) for line in m.group(1).strip().splitlines())
        key = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")[:60] or "query"
        while key in out:
            key += "_2"
        out[key] = {"title": title.rstrip(":"), "sql": m.group(2).strip()}
    return out


def build(doc: str | None = None) -> dict[str, Any]:
    text = doc if doc is not None else DOC.read_text(encoding="utf-8")
    tables = {}
    for name, body in _sections(text).items():
        meta = _table_meta(body)
        if name in LABELS:
            meta["label_column"] = LABELS[name]
        tables[name] = meta
    return {
        "title": "forkview database",
        "description": "Per-token entropy, MI estimates and forks of language-model "
                       "traces (entropies in nats). Tables and columns as documented "
                       "in docs/schema.md.",
        "databases": {DATABASE: {"tables": tables, "queries": _queries(text)}},
    }


def render(meta: dict[str, Any]) -> str:
    return json.dumps(meta, ensure_ascii=False, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if sample_db/metadata.json is not what the doc gives")
    args = ap.parse_args(argv)
    text = render(build())
    if args.check:
        same = OUT.exists() and OUT.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{OUT} is stale: run sample_db/metadata.py")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
