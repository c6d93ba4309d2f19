"""The figures sample_db/README.md quotes, computed from sample_db/arith.db.

    uv run python sample_db/facts.py        # prints each figure as the README writes it

tests/test_schema_doc.py checks that every figure printed here appears in the README
as printed, so the README cannot quote stale counts.
"""

from __future__ import annotations

import sqlite3
import sys
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
DB = HERE / "arith.db"

# name -> (SQL giving one number, how the README writes it)
FACTS = {
    "root traces": ("SELECT COUNT(*) FROM traces WHERE parent_trace_id IS NULL",
                    "**Root traces: {:,}**"),
    "first-stage tokens": (
        "SELECT SUM(n_tokens) FROM traces WHERE parent_trace_id IS NULL "
        "AND (temperature = 0 OR seed BETWEEN 1000 AND 1999)", "({:,} tokens;"),
    "batch tokens": (
        "SELECT SUM(n_tokens) FROM traces WHERE parent_trace_id IS NULL "
        "AND temperature > 0 AND seed NOT BETWEEN 1000 AND 1999", "({:,} tokens;"),
    "rollout children": ("SELECT COUNT(*) FROM traces WHERE origin = 'rollout'",
                         "{:,} rollout continuations"),
    "correct roots": ("SELECT COUNT(*) FROM traces WHERE parent_trace_id IS NULL AND correct",
                      "gets {} of"),
    "cut-off roots": ("SELECT COUNT(*) FROM traces WHERE parent_trace_id IS NULL "
                      "AND answer_method = 'cut_off'", "{} of them stop at the token limit"),
    "control runs": ("SELECT COUNT(*) FROM mi_runs WHERE json_extract(params, '$.control') "
                     "IS NOT NULL", "{:,} control runs"),
    "counterfactual positions": (
        "SELECT COUNT(*) FROM mi_values v JOIN mi_runs r ON r.id = v.run_id "
        "WHERE json_extract(r.params, '$.categories') IS NOT NULL", "{:,} positions"),
    "size MB": ("SELECT page_count * page_size / 1e6 FROM pragma_page_count(), "
                "pragma_page_size()", "**Size**: {:.1f} MB"),
}


def facts(db: Path = DB) -> dict[str, str]:
    con = sqlite3.connect("file:" + urllib.parse.quote(str(db.resolve())) + "?mode=ro",
                          uri=True)
    try:
        return {name: fmt.format(con.execute(sql).fetchone()[0])
                for name, (sql, fmt) in FACTS.items()}
    finally:
        con.close()


def main() -> int:
    for name, text in facts().items():
        print(f"{name}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
