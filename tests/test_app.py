"""The Textual explorer: generating, the cursor and panel, stopping, the browser, help.

Pilot tests drive the app with the tiny random model (`tiny_lm`); snapshot tests
reopen traces from a database filled deterministically here (fixed tokens, times and
speeds), so their SVGs never change between runs or machines.
"""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input

from forkview.app import create_app
from forkview.ui.browser import BrowserScreen
from forkview.ui.explorer import ExplorerScreen
from forkview.ui.help import HelpScreen
from forkview.ui.scale import (
    VIRIDIS,
    display_chunks,
    entropy_bin,
    foreground_for,
    high_entropy_positions,
)
from forkview.ui.token_panel import TokenPanel
from forkview.ui.trace_view import TraceView
from models.types import Alternative, GenerationParams, TokenStep
from store import Store

# ------------------------------------------------------------------ fixture database

PIECES = [
    "Tom", " starts", " with", " 3", " apples", " and", " buys", " 5", " more", ".", "\n",
    "So", " he", " has", " 3", " +", " 5", " =", " 8", " apples", ".", "\n\n",
    "Wait", ",", " let", " me", " check", ":", " 3", " +", " 5", " is", " 8", ",", " yes",
    ".", "", " 😀", "\n", "Final", " answer", ":", " 8", "",
]


def _entropy(i: int) -> float:
    # Deterministic and spread over the whole 0..3+ scale, with a few spikes.
    spikes = {2: 3.6, 12: 2.9, 22: 4.7, 23: 3.1, 37: 2.4, 41: 5.2}
    return spikes.get(i, round(0.15 + 0.37 * ((i * 7) % 6), 3))


def fixture_steps() -> list[TokenStep]:
    steps = []
    for i, piece in enumerate(PIECES):
        h = _entropy(i)
        p = max(0.05, min(0.97, math.exp(-h / 1.5)))
        rest = [(f" alt{j}", (1 - p) / (2 ** (j + 1))) for j in range(4)]
        top = [Alternative(1000 + i, piece, round(p, 4))] + [
            Alternative(2000 + 10 * i + j, text, round(q, 4)) for j, (text, q) in enumerate(rest)
        ]
        top.sort(key=lambda a: -a.prob)
        rank = 1 + [a.token_id for a in top].index(1000 + i)
        steps.append(TokenStep(
            position=i, token_id=1000 + i, text=piece, logprob=round(math.log(p), 4),
            rank=rank, entropy=h, sampling_entropy=0.0 if i != 23 else 1.25, top=top[:4],
        ))
    return steps


def fill_db(path: Path) -> list[int]:
    """Three traces with fixed times and speeds; returns their ids (oldest first)."""
    store = Store.open(path)
    ids = []
    specs = [
        ("SmolLM2-135M-Instruct (Q4_1, embedded)", "default",
         "Tom has 3 apples and buys 5 more. How many apples does he have now?",
         fixture_steps(), "complete", "eos"),
        ("tiny-llama", "/models/tiny", "Write a haiku about entropy",
         fixture_steps()[:12], "stopped", "interrupted"),
        ("SmolLM2-135M-Instruct (Q4_1, embedded)", "default",
         "What is the capital of France?\nAnswer in one word.",
         fixture_steps()[:5], "complete", "length"),
    ]
    for n, (name, spec, prompt, steps, status, reason) in enumerate(specs):
        model_id = store.upsert_model(name=name, spec=spec, kind="default", dtype="float32",
                                      device="cpu", content_hash=f"hash{n}", revision=None)
        prompt_id = store.add_prompt(prompt)
        tid = store.start_trace(model_id=model_id, prompt_id=prompt_id,
                                prompt_token_ids=[1, 2, 3], params=GenerationParams())
        with store.writer(tid) as writer:
            for s in steps:
                writer.add(s)
            writer.finish(status, reason)
        ids.append(tid)
    store.close()
    con = sqlite3.connect(path)
    for n, tid in enumerate(ids):
        con.execute(
            "UPDATE traces SET started_at = ?, finished_at = ?, tokens_per_second = ? "
            "WHERE id = ?",
            (f"2025-01-0{n + 1}T10:0{n}:00.000+00:00", f"2025-01-0{n + 1}T10:0{n}:05.000+00:00",
             42.5 + n, tid),
        )
    con.commit()
    con.close()
    return ids


@pytest.fixture
def filled_db(db_path: Path) -> tuple[Path, list[int]]:
    return db_path, fill_db(db_path)


@pytest.fixture(autouse=True)
def _colour_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Snapshots and styles are checked in colour whatever the developer's terminal says.
    monkeypatch.delenv("NO_COLOR", raising=False)


# ------------------------------------------------------------------ pure helpers


def test_display_chunks_mark_newlines_and_empty_pieces():
    assert display_chunks("a\nb") == [("a⏎", True), ("b", False)]
    assert display_chunks("\n\n") == [("⏎", True), ("⏎", True)]
    assert display_chunks("") == [("∅", False)]
    assert display_chunks("x\ty\x1b") == [("x⇥y␛", False)]


def test_scale_is_ordered_and_readable():
    assert [entropy_bin(h) for h in (0, 0.005, 0.01, 0.3, 0.672, 2.99, 3.0, 9.0,
                                     float("nan"))] == [0, 0, 1, 3, 4, 7, 8, 8, 0]
    assert foreground_for(VIRIDIS[0]) == "#ffffff"
    assert foreground_for(VIRIDIS[-1]) == "#000000"
    # Distinct colours survive the downgrade to a 256-colour terminal.
    from rich.color import Color, ColorSystem

    downgraded = {Color.parse(c).downgrade(ColorSystem.EIGHT_BIT).number for c in VIRIDIS}
    assert len(downgraded) == len(VIRIDIS)


def test_high_entropy_is_top_fifth():
    assert high_entropy_positions([0.1, 3.0, 0.2, 2.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]) == [1, 3]
    assert high_entropy_positions([1.0]) == [0]
    assert high_entropy_positions([]) == []


# ------------------------------------------------------------------ pilot tests


async def _until(pilot, condition, timeout: float = 20.0) -> None:
    """Let the app run until `condition()` holds (generous: CI machines are slow)."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError("condition not reached in time")


async def _wait_generation(pilot, screen: ExplorerScreen) -> None:
    if screen.worker is not None:
        await screen.worker.wait()
    await pilot.pause()


async def test_prompt_streams_tokens_and_saves_complete_trace(tiny_lm, db_path):
    params = GenerationParams(max_new_tokens=24)
    app = create_app(db_path=db_path, lm=tiny_lm, params=params)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        assert isinstance(screen, ExplorerScreen)
        assert isinstance(app.focused, Input)
        await pilot.press(*"hello", "enter")
        await _wait_generation(pilot, screen)
        view = screen.query_one(TraceView)
        assert len(view.steps) >= 1
        assert screen.trace_status == "complete"
        tid = screen.trace_id
    store = Store.open(db_path)
    info = store.trace(tid)
    assert info.status == "complete"
    assert info.prompt == "hello"
    assert [s.token_id for s in store.tokens(tid)] == [s.token_id for s in view.steps]
    store.close()


async def test_cursor_panel_and_high_entropy_jumps(filled_db):
    path, ids = filled_db
    app = create_app(db_path=path, browse_only=True, open_trace=ids[0])
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.screen.query_one(TraceView)
        panel = app.screen.query_one(TokenPanel)
        assert app.focused is view
        assert view.cursor == 0 and panel.step.text == "Tom"
        await pilot.press("right", "l")
        assert view.cursor == 2 and panel.step is view.steps[2]
        await pilot.press("h")
        assert view.cursor == 1
        await pilot.press("end")
        assert view.cursor == len(PIECES) - 1
        await pilot.press("home")
        assert view.cursor == 0
        # down moves to the next line ("So" starts after the newline token)
        await pilot.press("down")
        assert view.token_lines(view.cursor)[0] == 1
        await pilot.press("up")
        assert view.cursor == 0
        high = high_entropy_positions([s.entropy for s in view.steps])
        assert view.high_positions == high
        await pilot.press("home", "n")
        assert view.cursor == high[0]
        await pilot.press("n")
        assert view.cursor == high[1]
        await pilot.press("N")
        assert view.cursor == high[0]
        await pilot.press("N")  # wraps around to the last one
        assert view.cursor == high[-1]
        assert panel.high
        text = app.screen.query_one(TokenPanel).render().plain
        assert "entropy" in text and "▶" in text
        # clicking a token selects it
        await pilot.click(TraceView, offset=(1, 0))
        assert view.cursor == 0


async def test_prompt_before_model_is_ready_runs_once_loaded(tiny_model_dir, db_path):
    # No lm given: the app loads the model in a worker; an early Enter is queued.
    app = create_app(db_path=db_path, model_spec=str(tiny_model_dir), device="cpu",
                     params=GenerationParams(max_new_tokens=4))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await pilot.press(*"hi", "enter")
        await _until(pilot, lambda: screen.lm is not None and screen.worker is not None)
        await _wait_generation(pilot, screen)
        assert screen.trace_status == "complete"
        assert len(screen.query_one(TraceView).steps) == 4


async def test_model_load_error_is_shown_not_raised(db_path):
    app = create_app(db_path=db_path, model_spec="/no/such/model.gguf")
    notes: list[str] = []
    app.notify = lambda message, **_kw: notes.append(message)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await _until(pilot, lambda: screen.model_error is not None)
        assert "does not exist" in screen.model_error
        status = str(screen.query_one("#status-model").render())
        assert "model failed" in status
        await pilot.press(*"hi", "enter")
        assert any("No model" in n for n in notes)
    assert app.return_code in (0, None)


async def test_escape_stops_generation_and_keeps_tokens(tiny_lm_unbounded, db_path):
    params = GenerationParams(max_new_tokens=100_000)
    app = create_app(db_path=db_path, lm=tiny_lm_unbounded, params=params)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await pilot.press(*"go", "enter")  # the tiny model never stops on "go"
        view = screen.query_one(TraceView)
        await _until(pilot, lambda: len(view.steps) >= 5)
        await pilot.press("escape")
        await _wait_generation(pilot, screen)
        assert screen.trace_status == "stopped"
        tid, shown = screen.trace_id, len(view.steps)
    store = Store.open(db_path)
    info = store.trace(tid)
    assert info.status == "stopped"
    assert info.n_tokens == shown == len(store.tokens(tid))
    store.close()


async def test_enter_again_restarts_and_keeps_the_first_trace_stopped(tiny_lm_unbounded, db_path):
    app = create_app(db_path=db_path, lm=tiny_lm_unbounded,
                     params=GenerationParams(max_new_tokens=100_000))
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await pilot.press(*"go", "enter")
        view = screen.query_one(TraceView)
        await _until(pilot, lambda: bool(view.steps))
        first = screen.trace_id
        await pilot.press("p", "enter")  # same prompt again: stop this one, run anew
        await _until(pilot, lambda: screen.trace_id not in (None, first) and bool(view.steps))
        assert screen.generating
        await pilot.press("escape")
        await _wait_generation(pilot, screen)
    store = Store.open(db_path)
    assert [t.status for t in store.list_traces()] == ["stopped", "stopped"]
    store.close()


async def test_quitting_while_generating_saves_trace_stopped(tiny_lm_unbounded, db_path):
    app = create_app(db_path=db_path, lm=tiny_lm_unbounded,
                     params=GenerationParams(max_new_tokens=100_000))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press(*"go", "enter")
        view = app.screen.query_one(TraceView)
        await _until(pilot, lambda: app.screen.trace_id is not None and bool(view.steps))
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert app.return_code == 0
    store = Store.open(db_path)
    [info] = store.list_traces()
    assert info.status == "stopped" and info.n_tokens >= 1
    store.close()


async def test_browser_lists_filters_and_opens(filled_db):
    path, ids = filled_db
    app = create_app(db_path=path, browse_only=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, BrowserScreen)
        table = app.screen.query_one(DataTable)
        assert table.row_count == 3
        # newest first
        assert table.coordinate_to_cell_key((0, 0)).row_key.value == str(ids[-1])
        await pilot.press("slash", *"haiku")
        await _until(pilot, lambda: table.row_count == 1)
        await pilot.press("enter")  # leaves the filter for the table
        assert app.focused is table
        await pilot.press("enter")  # opens the trace
        await pilot.pause()
        assert isinstance(app.screen, ExplorerScreen)
        assert app.screen.trace_id == ids[1]
        assert len(app.screen.query_one(TraceView).steps) == 12
        assert app.screen.query_one("#prompt", Input).value == "Write a haiku about entropy"
        # back to the browser, filter by model
        await pilot.press("b")
        assert isinstance(app.screen, BrowserScreen)
        table = app.screen.query_one(DataTable)
        app.screen.query_one("#filter-text", Input).value = ""
        app.screen.query_one("#filter-model", Input).value = "smol"
        await _until(pilot, lambda: table.row_count == 2)
        await pilot.press("escape", "escape")
        assert isinstance(app.screen, ExplorerScreen)


async def test_browse_only_refuses_to_generate(filled_db):
    path, _ = filled_db
    app = create_app(db_path=path, browse_only=True)
    notes: list[str] = []
    app.notify = lambda message, **_kw: notes.append(message)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("escape")
        assert isinstance(app.screen, ExplorerScreen)
        await pilot.press("p", *"hi", "enter")
        await pilot.pause()
        assert app.screen.lm is None and not app.screen.generating
        assert any("browse-only" in n for n in notes)


def test_browse_app_never_imports_torch(filled_db):
    path, _ = filled_db
    code = textwrap.dedent(f"""
        import asyncio, sys
        import forkview.app
        from forkview.app import create_app
        app = create_app(db_path={str(path)!r}, browse_only=True)
        async def main():
            async with app.run_test() as pilot:
                await pilot.press("enter")
                await pilot.press("right", "n", "b")
        asyncio.run(main())
        heavy = [m for m in ("torch", "transformers") if m in sys.modules]
        print("HEAVY", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


async def test_help_opens_and_q_quits(filled_db):
    path, _ = filled_db
    app = create_app(db_path=path, browse_only=True, open_trace=1)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, ExplorerScreen)
        # in the prompt box q is a letter, not quit
        await pilot.press("p", "q")
        assert app.screen.query_one("#prompt", Input).value.endswith("q")
        assert app.is_running
        await pilot.press("escape", "q")
        await pilot.pause()
    assert not app.is_running


async def test_no_color_marks_high_entropy_with_attributes(filled_db, monkeypatch):
    path, ids = filled_db
    monkeypatch.setenv("NO_COLOR", "1")
    app = create_app(db_path=path, browse_only=True, open_trace=ids[0])
    async with app.run_test(size=(80, 24)):
        assert app.no_color
        view = app.screen.query_one(TraceView)
        high = view.high_positions[0]
        assert view.style_for(high).bold and view.style_for(high).underline
        low = next(i for i in range(len(view.steps)) if not view.is_high(i))
        assert not view.style_for(low).underline


# ------------------------------------------------------------------ snapshots

SIZES = [(80, 24), (120, 34)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_snapshot_explorer(snap_compare, filled_db, size):
    path, ids = filled_db
    app = create_app(db_path=path, browse_only=True, open_trace=ids[0])
    # move the cursor onto a high-entropy token so the panel shows a rich example
    assert snap_compare(app, press=["n", "n"], terminal_size=size)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_snapshot_browser(snap_compare, filled_db, size):
    path, _ = filled_db
    assert snap_compare(create_app(db_path=path, browse_only=True), terminal_size=size)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_snapshot_help(snap_compare, filled_db, size):
    path, ids = filled_db
    app = create_app(db_path=path, browse_only=True, open_trace=ids[0])
    assert snap_compare(app, press=["question_mark"], terminal_size=size)
