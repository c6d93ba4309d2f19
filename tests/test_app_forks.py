"""Forks in the explorer: the fork panel (alternative, typed text, sample N), the
branch queue, the family tree (open, delete, compare) and the compare view.

Pilot tests grow real branches with the tiny random model; snapshot tests use a
database written directly (fixed tokens, as tests/test_app.py does) and a stand-in
model object, so their SVGs never change between runs or machines.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from textual.widgets import Checkbox, Input, OptionList

from forkview.app import create_app
from forkview.pipeline import annotate_prompt
from forkview.ui.compare import CompareScreen, common_prefix
from forkview.ui.explorer import ExplorerScreen
from forkview.ui.fork_panel import ForkPanel
from forkview.ui.fork_queue import ForkRequest
from forkview.ui.trace_view import TraceView
from forkview.ui.tree import ConfirmScreen, RolloutGroup, TreeScreen
from models.types import Alternative, GenerationParams, TokenStep
from store import Store
from tests.test_app import SlowEstimator, _until, fill_db

PROMPT = "What is 3 + 5?"


@pytest.fixture(autouse=True)
def _colour_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)


def make_source(lm: Any, db_path: Path, n: int = 12) -> int:
    """A greedy trace of the tiny model to branch from."""
    store = Store.open(db_path)
    result = annotate_prompt(lm, store, PROMPT, GenerationParams(max_new_tokens=n), answer="8")
    store.close()
    return result.trace_id


def fork_app(lm: Any, db_path: Path, trace_id: int, max_new_tokens: int = 6) -> Any:
    return create_app(db_path=db_path, lm=lm, open_trace=trace_id, mi_estimators=[],
                      params=GenerationParams(max_new_tokens=max_new_tokens))


def _notes(app: Any) -> list[str]:
    notes: list[str] = []
    app.notify = lambda message, **_kw: notes.append(message)
    return notes


async def _idle(pilot: Any, screen: ExplorerScreen) -> None:
    """Until every queued branch job has finished."""
    await _until(pilot, lambda: screen.fork_job is None and not screen.fork_queue)
    await pilot.pause()


async def _open_panel(pilot: Any, position: int) -> ForkPanel:
    app = pilot.app
    app.screen.trace_view.select(position)
    await pilot.press("enter")
    await _until(pilot, lambda: isinstance(app.screen, ForkPanel))
    return app.screen


# ------------------------------------------------------------------ the fork panel


async def test_choose_an_alternative_makes_a_branch_in_view_tree_and_store(tiny_lm, db_path):
    source = make_source(tiny_lm, db_path)
    app = fork_app(tiny_lm, db_path, source)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        parent_steps = screen.store.tokens(source)
        panel = await _open_panel(pilot, 3)
        step = parent_steps[3]
        # Every alternative with exactly the probability the parent recorded.
        options = panel.query_one("#fork-alts", OptionList)
        shown = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert len(shown) == len(step.top)
        for alt, text in zip(step.top, shown, strict=True):
            assert f"p {alt.prob:.4f}" in text and repr(alt.text)[:10] in text
        assert "entropy" in str(panel.query_one("#fork-token").render())
        highlighted = step.top[options.highlighted]
        assert highlighted.token_id != step.token_id  # the trace's own token is not offered
        await pilot.press("enter")
        await _until(pilot, lambda: screen.fork_job is not None or screen.trace_id != source)
        await _idle(pilot, screen)
        [child] = screen.store.children(source)
        assert (child.parent_trace_id, child.fork_position) == (source, 3)
        assert child.forced_token_ids == [highlighted.token_id]
        assert child.origin == "fork" and child.status == "complete"
        assert child.params.max_new_tokens == 6 and child.params.greedy  # as its parent
        full = screen.store.full_tokens(child.id)
        assert [s.token_id for s in full[:3]] == [s.token_id for s in parent_steps[:3]]
        assert full[3].token_id == highlighted.token_id
        # The branch streamed into the view: its whole response, the prefix faded.
        view = screen.trace_view
        assert screen.trace_id == child.id and screen.branch_of == (source, 3)
        assert [s.token_id for s in view.steps] == [s.token_id for s in full]
        assert view.dim_before == 3 and view.style_for(0).dim and not view.style_for(3).dim
        assert f"⑂#{source}@3" in str(screen.query_one("#status-trace").render())
        # ... and it is in the tree.
        await pilot.press("t")
        assert isinstance(app.screen, TreeScreen)
        tree = app.screen
        assert tree.root_id == source and child.id in tree.trace_nodes
        assert repr(highlighted.text) in str(tree.trace_nodes[child.id].label)
        # Enter on the root opens it again.
        tree.family.move_cursor(tree.family.root)
        await pilot.press("enter")
        assert isinstance(app.screen, ExplorerScreen) and screen.trace_id == source
        assert screen.trace_view.dim_before == 0 and screen.branch_of is None


async def test_typed_text_is_forced_and_empty_text_makes_nothing(tiny_lm, db_path):
    source = make_source(tiny_lm, db_path)
    app = fork_app(tiny_lm, db_path, source, max_new_tokens=4)
    notes = _notes(app)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        panel = await _open_panel(pilot, 5)
        panel.query_one("#fork-text", Input).focus()
        await pilot.press("enter")
        assert isinstance(app.screen, ForkPanel)  # stays open
        assert any("The text is empty" in n for n in notes)
        assert screen.store.children(source) == []
        await pilot.press(*"hi there", "enter")
        await _until(pilot, lambda: isinstance(app.screen, ExplorerScreen))
        await _idle(pilot, screen)
        [child] = screen.store.children(source)
        ids = tiny_lm.tokenizer.encode("hi there", add_special_tokens=False)
        assert child.forced_token_ids == ids and child.fork_position == 5
        own = screen.store.tokens(child.id)
        assert [s.token_id for s in own[: len(ids)]] == ids
        assert own[0].position == 5
        assert len(own) == len(ids) + 4
        assert any(f"Branch #{child.id} of #{source} at 5" in n for n in notes)
        # Esc closes the panel without making anything.
        await _open_panel(pilot, 2)
        await pilot.press("escape")
        assert isinstance(app.screen, ExplorerScreen)
        assert len(screen.store.children(source)) == 1


async def test_sample_n_grows_a_batch_and_shows_the_answers(tiny_lm, db_path):
    source = make_source(tiny_lm, db_path)
    app = fork_app(tiny_lm, db_path, source, max_new_tokens=5)
    notes = _notes(app)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        token = screen.store.tokens(source)[4]
        panel = await _open_panel(pilot, 4)
        assert panel.query_one("#fork-n", Input).value == "8"  # the default
        panel.query_one("#fork-n", Input).value = "3"
        panel.query_one("#fork-keep", Checkbox).value = True
        panel.query_one("#fork-n", Input).focus()
        await pilot.press("enter")
        await _until(pilot, lambda: isinstance(app.screen, ExplorerScreen))
        await _idle(pilot, screen)
        kids = screen.store.children(source)
        assert len(kids) == 3
        assert all(k.origin == "sample" and k.fork_position == 4 for k in kids)
        assert all(k.forced_token_ids == [token.token_id] for k in kids)
        assert all(k.params.temperature == 1.0 for k in kids)  # a greedy parent: T = 1
        assert len({k.params.seed for k in kids}) == 3
        assert screen.trace_id == source  # a batch does not take over the view
        [summary] = [n for n in notes if n.startswith("3 samples of")]
        assert "token kept" in summary and "answers:" in summary and "original:" in summary
        # Resampling: the token at the fork is drawn too; same trace, so the prefix
        # cache is reused, not rebuilt.
        assert screen.fork_slot.builds == 1
        panel = await _open_panel(pilot, 4)
        panel.query_one("#fork-n", Input).value = "2"
        await pilot.click("#fork-sample")
        await _idle(pilot, screen)
        resampled = [k for k in screen.store.children(source) if k.forced_token_ids == []]
        assert len(resampled) == 2
        assert screen.fork_slot.builds == 1


async def test_keep_vs_redraw_runs_one_batch_and_shows_both_distributions(tiny_lm, db_path):
    """The fork panel's counterfactual: N kept and N redrawn continuations in one batch
    from one prefix cache, the two answer distributions side by side with their TV."""
    from forkview.ui.fork_queue import ForkJob, ForkRequest, counterfactual_text

    source = make_source(tiny_lm, db_path)
    app = fork_app(tiny_lm, db_path, source, max_new_tokens=5)
    notes = _notes(app)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        token = screen.store.tokens(source)[4]
        panel = await _open_panel(pilot, 4)
        panel.query_one("#fork-n", Input).value = "3"
        await pilot.click("#fork-cf")
        await _until(pilot, lambda: isinstance(app.screen, ExplorerScreen))
        await _idle(pilot, screen)
        kids = sorted(screen.store.children(source), key=lambda k: k.id)
        assert len(kids) == 6 and screen.fork_slot.builds == 1
        assert [k.forced_token_ids for k in kids[:3]] == [[token.token_id]] * 3
        assert all(k.forced_token_ids == [] for k in kids[3:])
        [summary] = [n for n in notes if n.startswith("counterfactual at position 4")]
        assert "kept:" in summary and "redrawn:" in summary and "TV " in summary
    # the numbers: kept all "7", redrawn half "7" half "9" -> TV 0.5, changes 50%
    job = ForkJob(1, source, 4, ForkRequest("counterfactual", n=2), 5, [], "cf")
    rows = [(1, "complete", "7", True, 3), (2, "complete", "7", True, 3),
            (3, "complete", "7", True, 3), (4, "complete", "9", False, 3)]
    text = counterfactual_text(job, rows)
    assert "TV 0.50" in text and "answer changes 50%" in text
    assert "0% of kept×kept" in text  # the two kept agree: the baseline is 0


async def test_branch_requests_queue_and_run_one_after_another(tiny_lm, db_path):
    source = make_source(tiny_lm, db_path)
    app = fork_app(tiny_lm, db_path, source, max_new_tokens=30)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        info = screen.store.trace(source)
        steps = screen.store.tokens(source)
        alt = next(a for a in steps[2].top if a.token_id != steps[2].token_id)
        screen._fork_requested(info, 2, steps[:2], ForkRequest("choice", token_id=alt.token_id,
                                                                text=alt.text))
        screen._fork_requested(info, 6, steps[:6], ForkRequest("text", text="so"))
        # one grows, the other waits its turn; the UI keeps answering keys meanwhile
        assert screen.fork_job is not None and screen.fork_job.position == 2
        assert [j.position for j in screen.fork_queue] == [6]
        await pilot.press("v")
        assert screen.view_mode == "mi"
        await _idle(pilot, screen)
        first, second = sorted(screen.store.children(source), key=lambda t: t.id)
        assert (first.fork_position, second.fork_position) == (2, 6)
        assert first.finished_at <= second.started_at
        assert first.status == second.status == "complete"


async def test_escape_stops_growth_and_quitting_keeps_tokens(tiny_lm_unbounded, db_path):
    lm = tiny_lm_unbounded
    source = make_source(lm, db_path)
    app = fork_app(lm, db_path, source, max_new_tokens=100_000)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await _open_panel(pilot, 3)
        await pilot.press("enter")
        view = screen.query_one(TraceView)
        await _until(pilot, lambda: screen.view_fork is not None and len(view.steps) >= 10)
        assert screen.trace_status == "running"
        await pilot.press("escape")
        await _idle(pilot, screen)
        [child] = screen.store.children(source)
        assert child.status == "stopped" and child.stop_reason == "interrupted"
        assert child.n_tokens == len(screen.store.tokens(child.id)) >= 7
        assert screen.trace_status == "stopped"
        # a second one, left growing when the app quits
        screen.open_trace(source)
        await _open_panel(pilot, 5)
        await pilot.press("enter")
        await _until(pilot, lambda: screen.fork_job is not None and screen.fork_job.tokens >= 5)
        await pilot.press("ctrl+q")
        await pilot.pause()
    assert app.return_code == 0
    store = Store.open(db_path)
    kids = store.children(source)
    assert [k.status for k in kids] == ["stopped", "stopped"]
    assert kids[1].n_tokens >= 5 and kids[1].n_tokens == len(store.tokens(kids[1].id))
    store.close()


class SlowerEstimator(SlowEstimator):
    defaults: ClassVar[dict[str, Any]] = {"delay": 0.1}


async def test_a_branch_request_pauses_mi_which_resumes_after(tiny_lm, db_path, monkeypatch):
    from models.estimators import REGISTRY

    monkeypatch.setitem(REGISTRY, SlowEstimator.name, SlowerEstimator)
    app = create_app(db_path=db_path, lm=tiny_lm, mi_estimators=["slow-test"],
                     params=GenerationParams(max_new_tokens=30))
    notes = _notes(app)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = app.screen
        await pilot.press(*"go", "enter")
        await _until(pilot, lambda: screen.mi_progress is not None
                     and screen.mi_progress.done >= 2)
        root = screen.trace_id
        steps = screen.store.tokens(root)
        alt = next(a for a in steps[4].top if a.token_id != steps[4].token_id)
        # what the fork panel returns on Enter; MI steps aside for the branch ...
        screen._fork_requested(screen.store.trace(root), 4, steps[:4],
                               ForkRequest("choice", token_id=alt.token_id, text=alt.text))
        assert screen.mi_cancel.is_set() and screen.mi_next is not None
        await _until(pilot, lambda: bool(screen.store.children(root)))
        await _idle(pilot, screen)
        # ... and resumes on the root once it is done, keeping what it had
        await _until(pilot, lambda: not screen.mi_running and screen.mi_next is None
                     and screen.store.mi_runs(root)[0].status == "complete", timeout=30)
        [run] = screen.store.mi_runs(root)
        assert run.n_values == 30
        assert any("MI paused for the branches" in n for n in notes)
        [child] = screen.store.children(root)
        assert child.status == "complete" and screen.store.mi_runs(child.id) == []


# ------------------------------------------------------------------ tree, delete, compare

TAIL_A = [" alt0", " the", " answer", " is", " 7", "."]
TAIL_B = ["Wait", ",", " 3", " +", " 5", " =", " 8"]
TAIL_C = [" So", " 8"]
TAIL_A1 = [" maybe", " 9", "?"]


def tail_steps(start: int, pieces: list[str], base_id: int) -> list[TokenStep]:
    steps = []
    for k, piece in enumerate(pieces):
        h = round(0.2 + 0.6 * ((k * 5) % 7), 3)
        p = max(0.05, min(0.95, math.exp(-h)))
        top = [Alternative(base_id + k, piece, round(p, 4)),
               Alternative(base_id + 500 + k, " or", round((1 - p) / 2, 4))]
        steps.append(TokenStep(position=start + k, token_id=base_id + k, text=piece,
                               logprob=round(math.log(p), 4), rank=1, entropy=h,
                               sampling_entropy=0.0, top=top))
    return steps


def add_branch(store: Store, parent: int, position: int, forced: list[int], origin: str,
               steps: list[TokenStep], status: str, answer: str | None,
               correct: bool | None) -> int:
    info = store.trace(parent)
    tid = store.start_trace(model_id=info.model_id, prompt_id=info.prompt_id,
                            prompt_token_ids=info.prompt_token_ids,
                            params=GenerationParams(seed=7), parent_trace_id=parent,
                            fork_position=position, forced_token_ids=forced, origin=origin)
    with store.writer(tid) as writer:
        for s in steps:
            writer.add(s)
        writer.finish(status, "eos" if status == "complete" else "interrupted")
    store.set_answer(tid, answer, "last_number" if answer else None, correct)
    return tid


def fill_family(path: Path) -> dict[str, int]:
    """test_app's three traces plus, on the first (44 tokens): an alternative branch at
    22 with a branch of its own, a kept-token sample and a resampled one at 22, and three
    rollout continuations at 12."""
    ids = fill_db(path)
    store = Store.open(path)
    root = ids[0]
    alt0 = 2000 + 10 * 22  # ' alt0' among the recorded alternatives at position 22
    a = add_branch(store, root, 22, [alt0], "fork", tail_steps(22, TAIL_A, alt0), "complete",
                   "7", False)
    b = add_branch(store, root, 22, [1022], "sample", tail_steps(22, TAIL_B, 1022),
                   "complete", "8", True)
    c = add_branch(store, root, 22, [], "sample", tail_steps(22, TAIL_C, 3000), "stopped",
                   "8", True)
    a1 = add_branch(store, a, 24, [4000, 4001], "fork", tail_steps(24, TAIL_A1, 4000),
                    "complete", None, None)
    for k, answer in enumerate(["8", "8", "7"]):
        store.add_child_trace(root, fork_position=12, forced_token_ids=[1012],
                              params=GenerationParams(temperature=1.0, seed=k),
                              text_=" he has 8", steps=None, n_tokens=3, stop_reason="eos",
                              answer=answer, answer_method="last_number")
    store.close()
    return {"root": root, "a": a, "b": b, "c": c, "a1": a1, "other": ids[1]}


@pytest.fixture
def family_db(db_path: Path) -> tuple[Path, dict[str, int]]:
    return db_path, fill_family(db_path)


async def _cursor_to(pilot: Any, tree: TreeScreen, trace_id: int) -> None:
    await pilot.pause()
    tree.family.move_cursor(tree.trace_nodes[trace_id])
    await pilot.pause()
    assert tree.selected_trace() == trace_id


async def test_tree_groups_rollouts_and_opens_a_branch_whole(family_db, tiny_lm):
    path, f = family_db
    app = create_app(db_path=path, browse_only=True, open_trace=f["root"])
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("t")
        tree = app.screen
        assert isinstance(tree, TreeScreen)
        assert "4 branches · 3 rollout continuations" in str(
            tree.query_one("#tree-title").render())
        labels = {tid: str(node.label) for tid, node in tree.trace_nodes.items()}
        assert "@22 ' alt0' fork · complete · 6 tok · answer '7' ✗" in labels[f["a"]]
        assert "@22 'Wait' sample" in labels[f["b"]] and "✓" in labels[f["b"]]
        assert "@22 resampled sample · stopped" in labels[f["c"]]
        assert "@24 ' maybe 9' fork" in labels[f["a1"]]
        [group] = [n for n in tree.family.root.children if isinstance(n.data, RolloutGroup)]
        assert "3 rollout continuations" in str(group.label) and not group.is_expanded
        assert not group.children  # filled only when opened
        group.expand()
        await pilot.pause()
        assert len(group.children) == 3
        # Enter on a branch opens its whole response in the explorer, prefix faded
        await _cursor_to(pilot, tree, f["a1"])
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, ExplorerScreen) and screen.trace_id == f["a1"]
        view = screen.trace_view
        assert len(view.steps) == 24 + len(TAIL_A1) and view.dim_before == 24
        assert view.cursor == 24
        assert "".join(s.text for s in view.steps[22:24]) == " alt0 the"


async def test_delete_asks_then_removes_the_branch_and_its_subtree_only(family_db, tiny_lm):
    path, f = family_db
    app = create_app(db_path=path, lm=tiny_lm, open_trace=f["a1"], mi_estimators=[])
    notes = _notes(app)
    async with app.run_test(size=(80, 24)) as pilot:
        store = app.screen.store
        before = {t.id for t in store.list_traces()}
        await pilot.press("t")
        tree = app.screen
        assert tree.selected_trace() == f["a1"]  # the cursor starts on the trace shown
        await _cursor_to(pilot, tree, f["a"])
        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen)
        assert f"branch #{f['a']} and the 1 trace below it" in str(
            app.screen.query_one("#confirm-message").render())
        await pilot.press("n")  # kept
        assert app.screen is tree and {t.id for t in store.list_traces()} == before
        await pilot.press("d", "y")
        await pilot.pause()
        assert {t.id for t in store.list_traces()} == before - {f["a"], f["a1"]}
        assert f["a"] not in tree.trace_nodes and f["b"] in tree.trace_nodes
        assert any(f"Deleted 2 traces: #{f['a']}, #{f['a1']}" in n for n in notes)
        # the root still has branches: refused with the store's message, nothing deleted
        await _cursor_to(pilot, tree, f["root"])
        await pilot.press("d")
        await pilot.pause()
        assert app.screen is tree
        assert any("is a root with" in n and "delete the branches first" in n for n in notes)
        assert {t.id for t in store.list_traces()} == before - {f["a"], f["a1"]}
        assert store.trace(f["root"]).n_tokens == 44
        # back in the explorer: the deleted trace that was on screen gives way to the
        # nearest trace left above it
        await pilot.press("escape")
        screen = app.screen
        assert isinstance(screen, ExplorerScreen) and screen.trace_id == f["root"]


async def test_compare_two_branches_side_by_side(family_db):
    path, f = family_db
    app = create_app(db_path=path, browse_only=True, open_trace=f["root"])
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("t")
        tree = app.screen
        await _cursor_to(pilot, tree, f["a"])
        await pilot.press("c")
        assert tree.marked == f["a"] and str(tree.trace_nodes[f["a"]].label).startswith("◆")
        await _cursor_to(pilot, tree, f["b"])
        await pilot.press("c")
        compare = app.screen
        assert isinstance(compare, CompareScreen)
        a, b = compare.views
        assert compare.common == 22
        assert a.dim_before == b.dim_before == 22 and a.cursor == b.cursor == 22
        assert a.steps[22].text == " alt0" and b.steps[22].text == "Wait"
        # the cursor moves both columns together
        await pilot.press("right", "right")
        assert a.cursor == b.cursor == 24
        await pilot.press("v")
        assert a.view_mode == b.view_mode == "mi"
        await pilot.press("escape")
        assert app.screen is tree and tree.marked is None


def test_common_prefix():
    steps = tail_steps(0, ["a", "b", "c"], 10)
    other = tail_steps(0, ["a", "b", "x"], 10)
    other[2].token_id = 99
    assert common_prefix(steps, other) == 2
    assert common_prefix(steps, steps[:1]) == 1
    assert common_prefix([], steps) == 0


# ------------------------------------------------------------------ snapshots

STAND_IN = SimpleNamespace(  # what the explorer reads of a model; nothing is generated
    name="SmolLM2-135M-Instruct (Q4_1, embedded)", spec="default", device="cpu",
    dtype="float32", tokenizer_hash=None, kind="default")


def test_snapshot_fork_panel(snap_compare, family_db):
    path, f = family_db
    app = create_app(db_path=path, lm=STAND_IN, open_trace=f["root"], mi_estimators=[])
    # on a high-entropy token with MI values and rollout answers
    assert snap_compare(app, press=["n", "n", "enter"], terminal_size=(80, 24))


def test_snapshot_tree(snap_compare, family_db):
    path, f = family_db
    app = create_app(db_path=path, browse_only=True, open_trace=f["b"])
    # the rollout group opened, the cursor on it
    assert snap_compare(app, press=["t", "up", "up", "up", "space"], terminal_size=(80, 24))


def test_snapshot_compare(snap_compare, family_db):
    path, f = family_db
    app = create_app(db_path=path, browse_only=True, open_trace=f["a"])
    assert snap_compare(app, press=["t", "c", "down", "down", "c"], terminal_size=(80, 24))
