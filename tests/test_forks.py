"""Forks, headless: branch growth (models.branch), saving and replaying branches
(forkview.forks), family queries (store) and the fork / tree / replay commands."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import threading

import pytest

from forkview import forks
from forkview.cli import main
from forkview.pipeline import annotate_prompt
from models.branch import BranchRequest, PrefixCache, grow_branches
from models.errors import ModelError
from models.generate import encode_prompt, stream_annotated
from models.types import GenerationParams
from store import Store, StoreError
from tests.conftest import db_content
from tests.test_cli import assert_one_line_error, run_cli

GREEDY = GenerationParams(max_new_tokens=24)
SAMPLED = GenerationParams(max_new_tokens=24, temperature=1.0, seed=11)


@pytest.fixture(scope="module")
def prompt_ids(tiny_lm):
    return encode_prompt(tiny_lm, "Sam has 4 pens and buys 3 more. How many?")


# ------------------------------------------------------------------ models.branch
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_branch_from_position_zero_is_the_trace_itself(tiny_lm, prompt_ids, params):
    """With no prefix and nothing forced, a branch row samples exactly as
    stream_annotated does: same seed, same tokens, same annotations."""
    steps = list(stream_annotated(tiny_lm, prompt_ids, params))
    (out,) = grow_branches(tiny_lm, prompt_ids, [], 0, [BranchRequest((), params)])
    assert out.token_ids == [s.token_id for s in steps]
    assert out.text == "".join(s.text for s in steps)
    for a, b in zip(out.steps, steps, strict=True):
        assert a.entropy == pytest.approx(b.entropy, abs=1e-5)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_keeping_the_token_of_a_greedy_trace_reproduces_it(tiny_lm, prompt_ids):
    steps = list(stream_annotated(tiny_lm, prompt_ids, GREEDY))
    ids = [s.token_id for s in steps]
    cache = PrefixCache(tiny_lm, prompt_ids, ids)
    for pos in (0, 7, len(ids) - 1):
        (out,) = grow_branches(tiny_lm, prompt_ids, ids, pos,
                               [BranchRequest((ids[pos],), GREEDY)], prefix_cache=cache)
        assert out.token_ids[: len(ids) - pos] == ids[pos:]
        assert out.steps[0].position == pos
        # The fork step's distribution is the parent's: same entropy, and the forced
        # token's probability is the parent's recorded one.
        assert out.steps[0].entropy == pytest.approx(steps[pos].entropy, abs=1e-4)
        assert out.steps[0].logprob == pytest.approx(steps[pos].logprob, abs=1e-4)


def test_alternative_probability_equals_the_recorded_one(tiny_lm, prompt_ids):
    steps = list(stream_annotated(tiny_lm, prompt_ids, GREEDY))
    ids = [s.token_id for s in steps]
    pos = 5
    alt = steps[pos].top[2]
    (out,) = grow_branches(tiny_lm, prompt_ids, ids, pos, [BranchRequest((alt.token_id,),
                                                                         GREEDY)])
    assert out.steps[0].token_id == alt.token_id
    assert out.steps[0].rank == 3
    assert out.steps[0].logprob == pytest.approx(math.log(alt.prob), abs=1e-4)


def test_prefix_cache_and_fresh_prefix_give_the_same_branch(tiny_lm, prompt_ids):
    ids = [s.token_id for s in stream_annotated(tiny_lm, prompt_ids, GREEDY)]
    req = [BranchRequest((ids[3], ids[4]), SAMPLED)]
    fresh = grow_branches(tiny_lm, prompt_ids, ids, 3, req)[0]
    cached = grow_branches(tiny_lm, prompt_ids, ids, 3, req,
                           prefix_cache=PrefixCache(tiny_lm, prompt_ids, ids))[0]
    assert fresh.token_ids == cached.token_ids
    assert fresh.token_ids[:2] == [ids[3], ids[4]]


def test_a_batch_row_equals_the_same_branch_grown_alone(tiny_lm, prompt_ids):
    ids = [s.token_id for s in stream_annotated(tiny_lm, prompt_ids, GREEDY)]
    reqs = [BranchRequest((), dataclasses.replace(SAMPLED, seed=s, max_new_tokens=16))
            for s in range(6)]
    batch = grow_branches(tiny_lm, prompt_ids, ids, 4, reqs)
    assert len({tuple(b.token_ids) for b in batch}) > 1  # different seeds, different draws
    for r, out in zip(reqs, batch, strict=True):
        assert out.token_ids == grow_branches(tiny_lm, prompt_ids, ids, 4, [r])[0].token_ids
        assert out.params.seed == r.params.seed


def test_rows_stop_independently_and_report_why(tiny_lm, prompt_ids):
    eos = min(tiny_lm.eos_token_ids)
    reqs = [BranchRequest((eos,), GREEDY),
            BranchRequest((), dataclasses.replace(GREEDY, max_new_tokens=3)),
            BranchRequest((), dataclasses.replace(GREEDY, max_new_tokens=9))]
    a, b, c = grow_branches(tiny_lm, prompt_ids, [], 0, reqs)
    assert a.stop_reason == "eos" and a.token_ids == [eos]
    assert b.stop_reason in ("length", "eos") and len(b.steps) <= 3
    assert len(c.steps) <= 9 and c.token_ids[: len(b.steps)] == b.token_ids


def test_cancel_keeps_every_row_s_tokens(tiny_lm_unbounded):
    lm = tiny_lm_unbounded
    ids = encode_prompt(lm, "go on")
    cancel = threading.Event()
    seen = []

    def on_step(row, step):
        seen.append(row)
        if len(seen) >= 12:
            cancel.set()

    reqs = [BranchRequest((), dataclasses.replace(SAMPLED, seed=i, max_new_tokens=10_000))
            for i in range(3)]
    outs = grow_branches(lm, ids, [], 0, reqs, cancel=cancel, on_step=on_step)
    assert all(o.stop_reason in ("interrupted", "eos") for o in outs)
    assert sum(len(o.steps) for o in outs) == len(seen)


def test_bad_branch_requests_fail_clearly(tiny_lm, prompt_ids):
    with pytest.raises(ModelError, match="out of range"):
        grow_branches(tiny_lm, prompt_ids, [1, 2], 3, [BranchRequest((), GREEDY)])
    with pytest.raises(ModelError, match="vocabulary"):
        grow_branches(tiny_lm, prompt_ids, [1, 2], 1, [BranchRequest((10**9,), GREEDY)])
    with pytest.raises(ModelError, match="share"):
        grow_branches(tiny_lm, prompt_ids, [1, 2], 1, [BranchRequest((), GREEDY),
                                                       BranchRequest((), SAMPLED)])


def test_context_limit_ends_branches_with_reason_context(tiny_model_dir, tmp_path):
    from models.loading import load_model
    from tests.tiny import build_tiny_model_dir

    lm = load_model(str(build_tiny_model_dir(tmp_path / "short", context=40)))
    ids = encode_prompt(lm, "hi")
    room = 40 - len(ids)
    (out,) = grow_branches(lm, ids, [], 0, [BranchRequest((), dataclasses.replace(
        GREEDY, max_new_tokens=500))])
    assert out.stop_reason in ("context", "eos")
    assert len(out.steps) <= room


# ------------------------------------------------------------------ forkview.forks + store
@pytest.fixture
def parent(tiny_lm, db_path):
    store = Store.open(db_path)
    result = annotate_prompt(tiny_lm, store, "Sam has 4 pens and buys 3 more. How many?",
                             GREEDY, answer="7")
    return store, result.trace_id


def test_grown_branches_are_saved_with_their_provenance(tiny_lm, parent):
    store, tid = parent
    source = forks.load_source(store, tid)
    params = forks.branch_params(source, max_new_tokens=8)
    plan = forks.plan_alternatives(source, 6, 2, params)
    results = forks.grow(tiny_lm, store, source, 6, plan)
    assert len(results) == 2
    for b, r in zip(plan, results, strict=True):
        info = store.trace(r.trace_id)
        assert info.parent_trace_id == tid and info.fork_position == 6
        assert info.forced_token_ids == b.forced and info.origin == "fork"
        assert info.status == "complete" and info.params.max_new_tokens == 8
        assert info.params.seed is None  # greedy: nothing to seed
        full = store.full_tokens(r.trace_id)
        assert [s.token_id for s in full[:6]] == source.token_ids[:6]
        assert full[6].token_id == b.forced[0] != source.token_ids[6]
        assert [s.position for s in full] == list(range(len(full)))
        # Only the branch's own tokens are stored under it.
        assert store.tokens(r.trace_id)[0].position == 6
        assert info.text == "".join(s.text for s in full[6:])
    assert [c.id for c in store.children(tid)] == [r.trace_id for r in results]


def test_sampled_branches_and_branches_of_branches(tiny_lm, parent):
    store, tid = parent
    source = forks.load_source(store, tid)
    params = forks.branch_params(source, max_new_tokens=6, seed=100, sampling=True)
    assert params.temperature == 1.0  # a greedy parent samples at T = 1
    kept = forks.grow(tiny_lm, store, source, 3, forks.plan_samples(source, 3, 3, True, params))
    redrawn = forks.grow(tiny_lm, store, source, 3,
                         forks.plan_samples(source, 3, 2, False, params))
    assert [store.trace(r.trace_id).params.seed for r in kept] == [100, 101, 102]
    for r in kept:
        info = store.trace(r.trace_id)
        assert info.origin == "sample" and info.forced_token_ids == [source.token_ids[3]]
    for r in redrawn:
        assert store.trace(r.trace_id).forced_token_ids == []
    # A branch of a branch: its prefix runs through both ancestors.
    child = forks.load_source(store, kept[0].trace_id)
    (grand,) = forks.grow(tiny_lm, store, child, 5, [forks.PlannedBranch(
        forks.encode_text(tiny_lm, " 7"), forks.branch_params(child, max_new_tokens=4),
        "fork", "typed")])
    full = store.full_tokens(grand.trace_id)
    assert [s.token_id for s in full[:3]] == source.token_ids[:3]
    assert [s.token_id for s in full[3:5]] == child.token_ids[3:5]
    assert store.ancestors(grand.trace_id)[0].id == tid
    assert store.root_id(grand.trace_id) == tid
    tree = forks.family_tree(store, grand.trace_id)
    assert tree.trace_id == tid and len(tree.children) == 5
    node = next(c for c in tree.children if c.trace_id == kept[0].trace_id)
    assert [g.trace_id for g in node.children] == [grand.trace_id]
    assert tree.to_json()["children"][0]["trace_id"] == tree.children[0].trace_id


@pytest.mark.parametrize("origin", ["root", "fork", "sample"])
def test_replay_confirms_token_for_token(tiny_lm, db_path, origin):
    store = Store.open(db_path)
    root = annotate_prompt(tiny_lm, store, "Count: 1, 2, 3,", SAMPLED).trace_id
    tid = root
    if origin != "root":
        source = forks.load_source(store, root)
        params = forks.branch_params(source, max_new_tokens=12)
        plan = (forks.plan_alternatives(source, 4, 1, params) if origin == "fork"
                else forks.plan_samples(source, 4, 4, False, params))
        tid = forks.grow(tiny_lm, store, source, 4, plan)[-1].trace_id
    result = forks.replay(tiny_lm, store, tid)
    assert result.matches, result
    assert result.first_mismatch is None and result.compared == store.trace(tid).n_tokens
    assert result.max_logprob_diff < 1e-4


def test_replay_reports_where_a_tampered_trace_differs(tiny_lm, parent):
    store, tid = parent
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE tokens SET token_id = token_id + 1 WHERE trace_id = ? AND "
                     "position = 5", (tid,))
    result = forks.replay(tiny_lm, store, tid)
    assert not result.matches and result.first_mismatch == 5


def test_fork_refusals(tiny_lm, parent):
    store, tid = parent
    source = forks.load_source(store, tid)
    with pytest.raises(forks.ForkError, match="out of range"):
        forks.check_position(source, source.info.n_tokens)
    with pytest.raises(forks.ForkError, match="empty"):
        forks.encode_text(tiny_lm, "")
    with pytest.raises(StoreError, match="no trace with id 999"):
        forks.load_source(store, 999)
    other = dataclasses.replace(tiny_lm, name="Other", spec="other")
    other.__dict__["_tokenizer_hash"] = "0" * 64
    with pytest.raises(forks.ForkError, match="tokenizer differs"):
        forks.check_tokenizer(store, source, other)
    running = store.start_trace(model_id=source.info.model_id, prompt_id=source.info.prompt_id,
                                prompt_token_ids=[1], params=GREEDY)
    with pytest.raises(forks.ForkError, match="still running"):
        forks.load_source(store, running)


def test_delete_removes_a_subtree_and_refuses_a_root_with_branches(tiny_lm, parent):
    store, tid = parent
    source = forks.load_source(store, tid)
    a, b = forks.grow(tiny_lm, store, source, 2,
                      forks.plan_alternatives(source, 2, 2, forks.branch_params(
                          source, max_new_tokens=4)))
    child = forks.load_source(store, a.trace_id)
    (g,) = forks.grow(tiny_lm, store, child, 4, forks.plan_alternatives(
        child, 4, 1, forks.branch_params(child, max_new_tokens=4)))
    with pytest.raises(StoreError, match="root with 3 branches"):
        store.delete_branch(tid)
    assert sorted(store.delete_branch(a.trace_id)) == sorted([a.trace_id, g.trace_id])
    assert [t.id for t in store.family(tid)] == [tid, b.trace_id]
    assert len(store.tokens(tid)) == source.info.n_tokens  # the root is untouched
    with sqlite3.connect(store.path) as conn:
        n = conn.execute("SELECT count(*) FROM tokens WHERE trace_id IN (?, ?)",
                         (a.trace_id, g.trace_id)).fetchone()[0]
    assert n == 0


def test_family_queries_use_the_parent_index_on_1000_branches(db_path):
    store = Store.open(db_path)
    m = store.upsert_model(name="m", spec="m", kind="dir", dtype="float32", device="cpu")
    p = store.add_prompt("p")
    root = store.start_trace(model_id=m, prompt_id=p, prompt_token_ids=[1], params=GREEDY)
    ids = [root]
    with store.engine.begin() as conn:
        for i in range(1000):
            parent_id = ids[i // 3]  # a ternary tree, 7 levels deep
            conn.exec_driver_sql(
                "INSERT INTO traces (uid, model_id, prompt_id, parent_trace_id, "
                "fork_position, origin, prompt_token_ids, raw, max_new_tokens, temperature, "
                "top_p, top_k, stop, top_alternatives, status, started_at, text, n_tokens, "
                "forkview_version) VALUES (?, ?, ?, ?, 0, 'fork', '[1]', 0, 1, 0, 1, 0, '[]', "
                "1, 'complete', '2026', '', 0, 'x')", (f"u{i}", m, p, parent_id))
            ids.append(conn.exec_driver_sql("SELECT last_insert_rowid()").scalar())
    assert len(store.descendant_ids(root)) == 1000
    assert len(store.family(ids[-1])) == 1001
    assert store.root_id(ids[-1]) == root
    assert len(store.ancestors(ids[-1])) == 7
    with store.engine.connect() as conn:
        plan = " ".join(str(r) for r in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT id FROM traces WHERE parent_trace_id = ?", (1,)))
    assert "ix_traces_parent" in plan


def test_schema_3_files_get_origins(tmp_path):
    """Before version 4 only rollout continuations had parents."""
    from store.db import MIGRATIONS

    path = tmp_path / "v3.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE models (id INTEGER PRIMARY KEY)")
        conn.execute("CREATE TABLE traces (id INTEGER PRIMARY KEY, parent_trace_id INTEGER)")
        conn.executemany("INSERT INTO traces VALUES (?, ?)", [(1, None), (2, 1)])
        MIGRATIONS[3](conn)
        rows = conn.execute("SELECT id, origin FROM traces ORDER BY id").fetchall()
    assert rows == [(1, "generate"), (2, "rollout")]


# ------------------------------------------------------------------ commands
def test_fork_tree_replay_commands(tiny_model_dir, db_path, capsys):
    model = ["--model", str(tiny_model_dir), "--db", str(db_path)]
    assert main(["annotate", "--prompt", "Add 2 and 2.", "--max-new-tokens", "16", *model]) == 0
    root = int(capsys.readouterr().out)
    db = ["--db", str(db_path)]
    assert main(["fork", *db, "--trace", str(root), "--position", "3", "--top", "2",
                 "--max-new-tokens", "5"]) == 0
    top_ids = [int(x) for x in capsys.readouterr().out.split()]
    assert len(top_ids) == 2
    assert main(["fork", *db, "--trace", str(root), "--position", "2", "--sample", "3",
                 "--keep-token", "--max-new-tokens", "4", "--seed", "5", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["params"]["seed"] for r in rows] == [5, 6, 7]
    for r in rows:
        assert r["parent_trace_id"] == root and r["fork_position"] == 2
        assert r["origin"] == "sample" and len(r["forced_token_ids"]) == 1
        assert r["tokens"][0]["position"] == 2
        assert r["full_text"].endswith(r["text"])
    assert main(["fork", *db, "--trace", str(top_ids[0]), "--position", "4", "--token",
                 " seven", "--json"]) == 0
    typed = json.loads(capsys.readouterr().out)
    assert typed["parent_trace_id"] == top_ids[0]
    assert main(["tree", *db, "--trace", str(typed["trace_id"])]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith(f"#{root} generate")
    assert f"@4 #{typed['trace_id']} fork" in text and text.count("sample") == 3
    assert main(["tree", *db, "--trace", str(root), "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert len(tree["children"]) == 5
    assert main(["replay", *db, "--trace", str(typed["trace_id"])]) == 0
    assert "replays token for token" in capsys.readouterr().out


def test_fork_bad_inputs_are_one_line_errors(tiny_model_dir, db_path, capsys):
    assert main(["annotate", "--prompt", "Hi", "--max-new-tokens", "6", "--model",
                 str(tiny_model_dir), "--db", str(db_path)]) == 0
    root = capsys.readouterr().out.strip()
    before = db_content(db_path)
    db = ["--db", str(db_path)]
    cases = [
        (["fork", *db, "--trace", root, "--position", "99", "--top", "1"], "out of range", 1),
        (["fork", *db, "--trace", "42", "--position", "0", "--top", "1"], "no trace", 1),
        (["fork", *db, "--trace", root, "--position", "0", "--token", ""], "empty", 2),
        (["fork", *db, "--trace", root, "--position", "0", "--top", "1", "--keep-token"],
         "--keep-token", 2),
        (["replay", *db, "--trace", "42"], "no trace", 1),
        (["tree", *db, "--trace", "42"], "no trace", 1),
    ]
    for argv, needle, code in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)
    assert db_content(db_path) == before  # a refused request changes nothing


def test_fork_of_a_running_trace_is_refused_in_a_subprocess(db_path):
    store = Store.open(db_path)
    m = store.upsert_model(name="m", spec="m", kind="dir", dtype="float32", device="cpu")
    tid = store.start_trace(model_id=m, prompt_id=store.add_prompt("p"), prompt_token_ids=[1],
                            params=GREEDY)
    with store.writer(tid) as w:
        w.add(_step())
        w.flush()
        proc = run_cli("fork", "--db", str(db_path), "--trace", str(tid), "--position", "0",
                       "--top", "1")
        assert_one_line_error(proc, "still running")
        w.finish("complete")


def _step():
    from models.types import Alternative, TokenStep

    return TokenStep(position=0, token_id=5, text="x", logprob=-0.1, rank=1, entropy=0.2,
                     sampling_entropy=0.0, top=[Alternative(5, "x", 0.9)])


def test_mi_reads_a_branch_as_its_whole_response(tiny_lm, parent):
    """MI values of a branch line up with its full-response positions."""
    from forkview.mi import trace_data

    store, tid = parent
    source = forks.load_source(store, tid)
    (r,) = forks.grow(tiny_lm, store, source, 5, forks.plan_alternatives(
        source, 5, 1, forks.branch_params(source, max_new_tokens=6)))
    data = trace_data(store, r.trace_id)
    full = store.full_tokens(r.trace_id)
    assert data.token_ids == [s.token_id for s in full]
    assert data.token_ids[:5] == source.token_ids[:5]
    assert data.text == "".join(s.text for s in full)
