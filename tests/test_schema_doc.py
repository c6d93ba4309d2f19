"""docs/schema.md stays true: every table and column of store/schema.py is described in
its table's section, and every ```sql example runs on the sample database.

The sample is opened read-only (SQLite mode=ro). If it is from an older schema than
this forkview writes, the queries run on an upgraded temporary copy instead (opening
the committed file for writing would change its bytes).
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "schema.md"
SAMPLE = ROOT / "sample_db" / "arith.db"


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect("file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro",
                           uri=True)


def _sql_blocks() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def _sections() -> dict[str, str]:
    """Table name -> text of its '## `name`' section."""
    text = DOC.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.M)
    out = {}
    for part in parts[1:]:
        m = re.match(r"`(\w+)`", part)
        if m:
            out[m.group(1)] = part
    return out


@pytest.fixture(scope="module")
def sample_con(tmp_path_factory: pytest.TempPathFactory):
    from store.schema import SCHEMA_VERSION

    con = _ro(SAMPLE)
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version < SCHEMA_VERSION:
        con.close()
        copy = tmp_path_factory.mktemp("sample") / "arith.db"
        shutil.copyfile(SAMPLE, copy)
        from store import Store

        Store.open(copy).close()  # upgrades the copy
        con = _ro(copy)
    yield con
    con.close()


def test_every_table_and_column_is_documented():
    from sqlmodel import SQLModel

    import store.schema  # noqa: F401  (registers the tables)

    sections = _sections()
    missing = []
    for name, table in SQLModel.metadata.tables.items():
        if name not in sections:
            missing.append(f"table {name}")
            continue
        for col in table.columns:
            if f"`{col.name}`" not in sections[name]:
                missing.append(f"{name}.{col.name}")
    assert not missing, f"not described in docs/schema.md: {', '.join(missing)}"


def test_doc_mentions_the_tools():
    text = DOC.read_text(encoding="utf-8")
    assert "datasette sample_db/arith.db" in text
    assert "sqlite3 -readonly sample_db/arith.db" in text


def test_there_are_examples():
    assert len(_sql_blocks()) >= 8


@pytest.mark.parametrize("index", range(len(_sql_blocks())))
def test_sql_example_runs_on_the_sample(sample_con, index):
    sql = _sql_blocks()[index]
    rows = sample_con.execute(sql).fetchall()
    # Rescoring examples may be empty on a database nobody rescored; the others read
    # tables the sample fills, so they must return something.
    if "token_scores" not in sql:
        assert rows, f"example {index} returned no rows:\n{sql}"


def test_sample_untouched_by_this_test():
    assert not (SAMPLE.parent / "arith.db-wal").exists()


def test_datasette_metadata_is_generated_from_the_doc():
    """sample_db/metadata.json is exactly what sample_db/metadata.py makes from this doc
    (regenerate: uv run python sample_db/metadata.py), with every table described, every
    column of the doc there, and the doc's queries as canned queries that run."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("sample_metadata",
                                                  ROOT / "sample_db" / "metadata.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    made = mod.render(mod.build())
    assert (ROOT / "sample_db" / "metadata.json").read_text(encoding="utf-8") == made
    db = json.loads(made)["databases"]["arith"]
    for name, text in _sections().items():
        meta = db["tables"][name]
        assert meta["description"], name
        for col in re.findall(r"^\| `(\w+)` \|", text, re.M):
            assert col in meta["columns"], (name, col)
    assert len(db["queries"]) == len(_sql_blocks())
    con = _ro(SAMPLE)
    try:
        for q in db["queries"].values():
            con.execute(q["sql"]).fetchall()
    finally:
        con.close()


def test_sample_readme_quotes_the_figures_of_the_file():
    """Every figure sample_db/facts.py computes from arith.db is in sample_db/README.md
    exactly as it prints it: the README cannot quote stale counts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_facts",
                                                  ROOT / "sample_db" / "facts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = " ".join((ROOT / "sample_db" / "README.md").read_text(encoding="utf-8").split())
    for name, text in mod.facts().items():
        assert text in readme, (name, text)
