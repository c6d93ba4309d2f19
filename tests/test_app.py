"""The Textual explorer: generating, the cursor and panel, stopping, the browser, help,
and the MI views (overlays, strip chart, panel, the background MI worker).

Pilot tests drive the app with the tiny random model (`tiny_lm`); snapshot tests
reopen traces from a database filled deterministically here (fixed tokens, times and
speeds), so their SVGs never change between runs or machines.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from textual.widgets import DataTable, Input

from forkview.analysis.peaks import RULES, bin_edges, find_peaks, quantile, scale_bin, scale_range
from forkview.app import create_app
from forkview.ui.browser import BrowserScreen
from forkview.ui.chart import LABEL_W, StripChart
from forkview.ui.explorer import ExplorerScreen
from forkview.ui.help import HelpScreen
from forkview.ui.mi_data import rollout_alternatives, short_params
from forkview.ui.scale import (
    NEUTRAL_STYLE,
    VIRIDIS,
    bin_style,
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


PIECES_H = [_entropy(i) for i in range(len(PIECES))]
HSIC_SPIKES = {7: 0.41, 18: 0.55, 22: 0.38, 42: 0.62}
GAIN_SPIKES = {18: 2.1, 41: 0.9, 42: 3.4}
ROLLOUT_POSITIONS = [2, 5, 12, 22, 23, 30, 37, 41]


def fixture_mi_values(estimator: str, n: int) -> dict[int, float | None]:
    """Fixed MI values: small everywhere with a few spikes (some on high-entropy
    tokens, some not), answer-gain missing at the last token."""
    if estimator == "hsic":
        return {i: HSIC_SPIKES.get(i, round(0.02 + 0.01 * ((i * 5) % 7), 4)) for i in range(n)}
    if estimator == "answer-gain":
        values: dict[int, float | None] = {
            i: GAIN_SPIKES.get(i, round(-0.05 + 0.02 * ((i * 3) % 5), 4)) for i in range(n)}
        values[n - 1] = None
        return values
    return {p: round(0.1 * (k % 4), 4) for k, p in enumerate(ROLLOUT_POSITIONS)}


def rollout_detail(position: int) -> dict:
    return {
        "classes": ["8", "7", None],
        "alternatives": [
            {"token_id": 1000 + position, "text": PIECES[position], "prob": 0.62,
             "weight": 0.7, "emitted": True, "counts": [6, 1, 1]},
            {"token_id": 5000 + position, "text": " so", "prob": 0.27, "weight": 0.3,
             "emitted": False, "counts": [2, 5, 1]},
        ],
    }


def add_fixture_mi(store: Store, trace_id: int, n: int) -> None:
    """Three MI runs on the first trace: hsic and answer-gain complete, a stratified
    rollout pass stopped early (with per-alternative answer details)."""
    runs = [
        ("hsic", {"bandwidth": 50.0, "eps": 1e-5, "layer": -1, "normalised": True,
                  "reference": "auto"}, "complete"),
        ("answer-gain", {"cue": "\nFinal answer: ", "reference": "auto", "stride": 1},
         "complete"),
        ("rollout", {"samples": 8, "min_prob": 0.05, "max_new_tokens": 256,
                     "temperature": 1.0, "miller_madow": True, "seed": 0}, "stopped"),
    ]
    for name, params, status in runs:
        run_id, _ = store.open_mi_run(trace_id, name, params)
        values = fixture_mi_values(name, n)
        store.add_mi_values(run_id, [
            (p, v, rollout_detail(p) if name == "rollout" else None)
            for p, v in values.items()])
        store.finish_mi_run(run_id, status, info={"fixture": True})


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
    add_fixture_mi(store, ids[0], len(fixture_steps()))
    store.close()
    con = sqlite3.connect(path)
    con.execute("UPDATE mi_runs SET created_at = '2025-01-01T11:00:00.000+00:00', "
                "finished_at = '2025-01-01T11:00:05.000+00:00'")
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


def test_quantiles_and_peak_rules():
    values = [0.1, 0.4, 0.2, 0.3, 5.0]
    assert quantile(values, 0.5) == 0.3
    assert quantile(values, 0.25) == pytest.approx(0.2)  # numpy's "linear" method
    assert quantile([1.0, 2.0], 0.75) == pytest.approx(1.75)
    series = {i: v for i, v in enumerate(values)} | {5: None, 6: float("nan")}
    tukey, topk, topr = RULES
    # Q1 0.2, Q3 0.4, fence 0.4 + 1.5 * 0.2 = 0.7: only the spike
    assert find_peaks(series, tukey) == [4]
    assert tukey.label == "tukey τ=1.5" and topk.label == "top-k k=20"
    assert find_peaks(series, topk) == [0, 1, 2, 3, 4]  # fewer values than k
    assert find_peaks(series, topr) == [4]  # ceil(0.2 * 5) = 1
    assert find_peaks({}, tukey) == []
    # a flat trace has no Tukey peaks
    assert find_peaks({i: 1.0 for i in range(10)}, tukey) == []


def test_mi_scale_and_binning():
    values = {i: float(i) for i in range(101)}
    assert scale_range(values) == (5.0, 95.0)  # the 5th..95th percentile
    assert scale_bin(0.0, 5.0, 95.0) == 0 and scale_bin(100.0, 5.0, 95.0) == 8
    assert scale_bin(None, 5.0, 95.0) is None
    assert scale_range({0: None}) is None
    assert scale_range({0: 2.0, 1: 2.0}) == (2.0, 2.0)
    assert bin_edges(3, 10) == [(0, 1), (1, 2), (2, 3)]
    edges = bin_edges(100, 30)
    assert len(edges) == 30 and edges[0][0] == 0 and edges[-1][1] == 100
    assert all(a[1] == b[0] for a, b in itertools.pairwise(edges))


def test_short_params_and_rollout_details():
    assert short_params("hsic", {"bandwidth": 50.0, "layer": -1, "eps": 1e-5,
                                 "normalised": True, "reference": "auto"}) == "σ=50"
    assert short_params("hsic", {"bandwidth": "median", "layer": 12, "eps": 1e-5,
                                 "normalised": False, "reference": "auto"}) == (
        "σ=median layer=12 norm=off")
    assert short_params("answer-gain", {"cue": "\nFinal answer: ", "stride": 4,
                                        "reference": "auto"}) == "stride=4"
    from models.estimators import REGISTRY

    expected = {"hsic": "σ=50", "answer-gain": "", "rollout": "S=8 p>0.05"}
    for name, label in expected.items():  # at their defaults: the headline parameters only
        assert short_params(name, dict(REGISTRY[name].defaults)) == label, name
    assert short_params("someday", {"a": 1, "b": 2, "c": 3}) == "a=1 b=2"
    [emitted, other] = rollout_alternatives(rollout_detail(22))
    assert emitted.emitted and emitted.text == "Wait" and emitted.prob == 0.62
    assert emitted.answers == [("8", 6), ("7", 1), ("∅", 1)]
    assert other.answers[0] == ("7", 5)
    # other spellings of the histogram, and details that are not rollouts
    [alt] = rollout_alternatives({"alternatives": [{"token": "x", "p": 0.5,
                                                    "answers": {"3": 2, "4": 6}}]})
    assert alt.answers == [("4", 6), ("3", 2)]
    assert rollout_alternatives({"sigma_x": 3.0}) == []
    assert rollout_alternatives(None) == []


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
    async with app.run_test(size=(80, 24)) as pilot:
        assert app.no_color
        view = app.screen.query_one(TraceView)
        high = view.high_positions[0]
        assert view.style_for(high).bold and view.style_for(high).underline
        low = next(i for i in range(len(view.steps)) if not view.is_high(i))
        assert not view.style_for(low).underline
        # the "both" view: high entropy bold, MI peaks underlined
        await pilot.press("v", "v")
        peak = 7  # an hsic peak that is not a high-entropy token
        assert not view.is_high(peak) and view.is_peak(peak)
        assert view.style_for(peak).underline and not view.style_for(peak).bold
        assert view.style_for(high).bold and not view.style_for(high).underline


# ------------------------------------------------------------------ MI in the explorer


class SlowEstimator:
    """A test estimator: one value per position, one chunk each, slowly, so a pass can
    be stopped halfway. Needs no reference."""

    name = "slow-test"
    needs: ClassVar[frozenset[str]] = frozenset()
    defaults: ClassVar[dict[str, Any]] = {"delay": 0.05}
    default_positions = "all"

    def __init__(self, params: dict[str, Any] | None = None):
        self.params = {**self.defaults, **(params or {})}

    def run(self, lm: Any, trace: Any, positions: Sequence[int]) -> Iterator[Any]:
        from models.estimators import EstimatorChunk

        for p in positions:
            time.sleep(self.params["delay"])
            yield EstimatorChunk(values={p: 0.01 * p})


class BrokenEstimator(SlowEstimator):
    name = "broken-test"

    def run(self, lm: Any, trace: Any, positions: Sequence[int]) -> Iterator[Any]:
        from models.errors import ModelError

        raise ModelError("this model has no hidden states")
        yield


@pytest.fixture
def test_estimators(monkeypatch: pytest.MonkeyPatch) -> None:
    from models.estimators import REGISTRY

    monkeypatch.setitem(REGISTRY, SlowEstimator.name, SlowEstimator)
    monkeypatch.setitem(REGISTRY, BrokenEstimator.name, BrokenEstimator)


@pytest.fixture
def extractable_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny random model never writes a number: pretend every text ends in one, so
    the reference-needing estimators (hsic, answer-gain) have an answer to use."""
    import models.answers
    from models.answers import ExtractedAnswer

    monkeypatch.setattr(models.answers, "extract_answer",
                        lambda text, methods=(): ExtractedAnswer("8", "last_number"))


def _notes(app) -> list[str]:
    notes: list[str] = []
    app.notify = lambda message, **_kw: notes.append(message)
    return notes


async def _wait_mi(pilot, screen: ExplorerScreen) -> None:
    await _until(pilot, lambda: screen.mi_worker is not None and not screen.mi_running)
    await pilot.pause()


async def test_generation_runs_mi_and_panel_shows_it(tiny_lm, db_path, extractable_answer):
    app = create_app(db_path=db_path, lm=tiny_lm, params=GenerationParams(max_new_tokens=16))
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        await pilot.press(*"hello", "enter")
        await _wait_generation(pilot, screen)
        await _wait_mi(pilot, screen)
        tid = screen.trace_id
        n = len(screen.trace_view.steps)
        runs = screen.store.mi_runs(tid)
        assert [(r.estimator, r.status, r.n_values) for r in runs] == [
            ("hsic", "complete", n), ("answer-gain", "complete", n)]
        panel = screen.query_one(TokenPanel).render().plain
        assert "MI at this token" in panel and "hsic σ=50" in panel and "answer-gain" in panel
        assert screen.mi.current.label == "hsic σ=50"
        assert "MI" not in str(screen.query_one("#status-trace").render())  # idle again


async def test_mi_without_a_reference_is_skipped_with_a_notice(tiny_lm, db_path):
    app = create_app(db_path=db_path, lm=tiny_lm, params=GenerationParams(max_new_tokens=8))
    notes = _notes(app)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await pilot.press(*"hello", "enter")
        await _wait_generation(pilot, screen)
        await _wait_mi(pilot, screen)
        assert screen.store.mi_runs(screen.trace_id) == []  # no failed runs left behind
        assert any("hsic, answer-gain skipped: no reference answer" in n for n in notes)


async def test_m_runs_mi_on_an_opened_trace(tiny_lm, db_path):
    from forkview.pipeline import annotate_prompt

    store = Store.open(db_path)
    result = annotate_prompt(tiny_lm, store, "What is 3 + 5?",
                             GenerationParams(max_new_tokens=12), answer="8")
    store.close()
    app = create_app(db_path=db_path, lm=tiny_lm, open_trace=result.trace_id)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        assert screen.mi.current is None
        await pilot.press("m")
        await _wait_mi(pilot, screen)
        assert {r.estimator: r.n_values for r in screen.store.mi_runs(result.trace_id)} == {
            "hsic": 12, "answer-gain": 12}
        assert screen.mi.current is not None
        await pilot.press("v")
        assert screen.legend.text.startswith("MI hsic σ=50")


async def test_escape_during_mi_stops_and_keeps_finished_values(tiny_lm, db_path,
                                                                 test_estimators):
    app = create_app(db_path=db_path, lm=tiny_lm, params=GenerationParams(max_new_tokens=40),
                     mi_estimators=["slow-test"])
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await pilot.press(*"go", "enter")
        await _wait_generation(pilot, screen)
        n = len(screen.trace_view.steps)
        await _until(pilot, lambda: screen.mi_progress is not None
                     and screen.mi_progress.done >= 3)
        assert "slow-test" in str(screen.query_one("#status-trace").render())
        await pilot.press("escape")
        await _wait_mi(pilot, screen)
        [run] = screen.store.mi_runs(screen.trace_id)
        assert run.status == "stopped" and 3 <= run.n_values < n
        kept = screen.store.mi_values(run.id)
        assert screen.trace_status == "complete"  # Esc stopped MI, not the trace
        # m resumes the same run: the stored values stay, the rest is computed
        await pilot.press("m")
        await _wait_mi(pilot, screen)
        [run] = screen.store.mi_runs(screen.trace_id)
        assert run.status == "complete" and run.n_values == n
        values = screen.store.mi_values(run.id)
        assert all(values[p] == v for p, v in kept.items())


async def test_quitting_during_mi_leaves_the_run_stopped(tiny_lm, db_path, test_estimators):
    app = create_app(db_path=db_path, lm=tiny_lm, params=GenerationParams(max_new_tokens=40),
                     mi_estimators=["slow-test"])
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await pilot.press(*"go", "enter")
        await _wait_generation(pilot, screen)
        await _until(pilot, lambda: screen.mi_progress is not None
                     and screen.mi_progress.done >= 2)
        tid = screen.trace_id
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert app.return_code == 0
    store = Store.open(db_path)
    [run] = store.mi_runs(tid)
    assert run.status == "stopped" and run.n_values >= 2
    store.close()


async def test_mi_errors_are_notified_not_raised(tiny_lm, db_path, test_estimators):
    app = create_app(db_path=db_path, lm=tiny_lm, params=GenerationParams(max_new_tokens=6),
                     mi_estimators=["broken-test", "no-such-estimator"])
    notes = _notes(app)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await pilot.press(*"go", "enter")
        await _wait_generation(pilot, screen)
        await _wait_mi(pilot, screen)
        assert any("unknown estimator 'no-such-estimator'" in n for n in notes)
        screen.mi_estimators = ("broken-test",)
        await pilot.press("m")
        await _wait_mi(pilot, screen)
        assert any("broken-test: this model has no hidden states" in n for n in notes)
        assert app.is_running


async def test_views_estimators_and_peak_rules_follow_keys(filled_db):
    path, ids = filled_db
    app = create_app(db_path=path, browse_only=True, open_trace=ids[0])
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        view = screen.trace_view
        legend = screen.legend
        assert legend.text.startswith("entropy") and "top 20%" in legend.text
        await pilot.press("v")
        assert screen.view_mode == "mi"
        assert legend.text.startswith("MI hsic σ=50 ") and "p5–p95" in legend.text
        assert "peaks tukey τ=1.5: 4" in legend.text
        assert view.peak_positions == sorted(HSIC_SPIKES)
        hsic = fixture_mi_values("hsic", len(PIECES))
        assert view.peak_positions == find_peaks(hsic)
        peak = view.peak_positions[0]
        assert view.style_for(peak).underline and view.style_for(peak).bold
        await pilot.press("v")
        assert screen.view_mode == "both"
        assert legend.text.startswith("H ") and "peaks hsic σ=50 tukey τ=1.5: 4" in legend.text
        # both: entropy colours, peaks still marked
        assert view.style_for(peak).bgcolor == bin_style(entropy_bin(PIECES_H[peak])).bgcolor
        assert view.style_for(peak).underline
        await pilot.press("v")
        assert screen.view_mode == "entropy" and legend.text.startswith("entropy")
        assert not view.style_for(peak).underline
        # e: the next series; from the entropy view it switches to the MI view
        await pilot.press("e")
        assert screen.view_mode == "mi" and legend.text.startswith("MI answer-gain ")
        last = len(PIECES) - 1  # answer-gain has no value there: drawn neutral
        assert view.style_for(last) == NEUTRAL_STYLE
        await pilot.press("e")
        assert legend.text.startswith("MI rollout S=8 p>0.05 ")
        await pilot.press("e")
        assert legend.text.startswith("MI hsic σ=50 ")
        # r: the peak rule, shown with its parameter
        await pilot.press("r")
        assert "peaks top-k k=20: 20" in legend.text
        await pilot.press("r")
        assert "peaks top-r ρ=0.2: 9" in legend.text
        await pilot.press("r")
        assert "tukey τ=1.5" in legend.text
        # ] and [ walk the peaks
        await pilot.press("home", "right_square_bracket")
        assert view.cursor == sorted(HSIC_SPIKES)[0]
        await pilot.press("left_square_bracket")
        assert view.cursor == sorted(HSIC_SPIKES)[-1]
        panel = screen.query_one(TokenPanel).render().plain
        assert "▸hsic σ=50" in panel and "0.6200▲" in panel


async def test_chart_follows_the_cursor_and_clicks_move_it(filled_db):
    path, ids = filled_db
    app = create_app(db_path=path, browse_only=True, open_trace=ids[0])
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        view = screen.trace_view
        chart = screen.query_one(StripChart)
        assert chart.cursor == view.cursor == 0
        await pilot.press("right", "right", "n")
        assert chart.cursor == view.cursor and chart.column_of(view.cursor) == view.cursor
        await pilot.press("end")
        assert chart.cursor == len(PIECES) - 1
        assert chart.entropies == [s.entropy for s in view.steps]
        assert chart.peaks == set(HSIC_SPIKES)
        # one column per token here: click the MI row at token 18's column
        await pilot.click(StripChart, offset=(1 + LABEL_W + 18, 1))
        assert view.cursor == 18 and chart.cursor == 18
        # the marker row of a many-tokens column jumps to its peak
        chart.entropies = chart.entropies * 3  # pretend 132 tokens: columns hold several
        col = chart.column_of(42)
        assert chart.position_at(col, 2) == 42
        line = chart.render_line(2).text
        assert "▲" in line and "◆" in line and "•" in line
        # positions with a keep-vs-redraw result: ◇ where nothing else is marked, an
        # underline under another mark
        chart.entropies = chart.entropies[:len(PIECES)]
        plain = next(i for i in range(len(PIECES))
                     if i not in chart.peaks and i not in chart.high)
        marked = sorted(chart.peaks)[0]
        chart.set_counterfactual({plain, marked})
        strip = chart.render_line(2)
        assert strip.text[LABEL_W + plain] == "◇"
        cells = [seg for seg in strip if seg.text.strip()]
        assert any(seg.style.underline for seg in cells if seg.text == "▲" or seg.text == "◆")


async def test_browse_only_m_says_it_needs_a_model(filled_db):
    path, ids = filled_db
    app = create_app(db_path=path, browse_only=True, open_trace=ids[1])
    notes = _notes(app)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("m")
        await pilot.pause()
        assert any("needs a model" in n for n in notes)
        assert not app.screen.mi_running
        # a trace without MI: the MI view says how to get it
        await pilot.press("v")
        assert "no values on this trace" in app.screen.legend.text
        assert "forkview mi" in app.screen.legend.text


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


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_snapshot_mi_view(snap_compare, filled_db, size):
    path, ids = filled_db
    app = create_app(db_path=path, browse_only=True, open_trace=ids[0])
    # colour by hsic, cursor on its second peak
    assert snap_compare(app, press=["v", "right_square_bracket", "right_square_bracket"],
                        terminal_size=size)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_snapshot_both_view(snap_compare, filled_db, size):
    path, ids = filled_db
    app = create_app(db_path=path, browse_only=True, open_trace=ids[0])
    # entropy colours with hsic peaks; the cursor on a peak that is also a rollout
    # position, so the panel shows the answers per forked alternative
    assert snap_compare(app, press=["v", "v"] + ["right_square_bracket"] * 3,
                        terminal_size=size)
