from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import build_tiny_model_dir

# Tests never reach a hub: anything that would download must fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path):
    from models.loading import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a huge context: generation runs until it is stopped, so
    tests of Esc, Ctrl-C and quitting never race a natural end."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-long"), context=1_000_000)


@pytest.fixture(scope="session")
def tiny_lm_unbounded(long_context_model_dir: Path):
    from models.loading import load_model

    return load_model(str(long_context_model_dir), device="cpu")


@pytest.fixture(scope="session")
def real_lm():
    """The embedded SmolLM2-135M, loaded once per test session (integration tests)."""
    from models.loading import load_model

    return load_model("default", device="cpu")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "traces.db"


def db_content(path: Path) -> list[str]:
    """A database's content as SQL text, read without writing (SQLite mode=ro): what
    "nothing changed" means. The file's bytes are no measure of that in WAL mode: a
    checkpoint moves pages from the -wal file into the main file whenever the last
    connection closes, changing its bytes (and change counter) but not its content."""
    import sqlite3
    import urllib.parse

    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    con = sqlite3.connect(uri, uri=True)
    try:
        return list(con.iterdump())
    finally:
        con.close()
