"""Rescoring (`forkview rescore`): a second model's per-token numbers for the same token
ids, stored beside the original; identical tokenizers required; resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from forkview.cli import main
from forkview.pipeline import annotate_prompt
from forkview.rescore import rescore, select_traces
from models.types import GenerationParams
from store import Store, StoreError
from tests.tiny import build_tiny_model_dir

PARAMS = GenerationParams(max_new_tokens=10, temperature=1.0, seed=3, top_alternatives=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """same: the tiny model's very weights under another path; other: other weights,
    same tokenizer; short: the same weights with a 14-token context; foreign: another
    tokenizer."""
    base = tmp_path_factory.mktemp("rescore-models")
    same = base / "same"
    shutil.copytree(tiny_model_dir, same)
    return {
        "same": same,
        "other": build_tiny_model_dir(base / "other", seed=1),
        "short": build_tiny_model_dir(base / "short", context=14),
        "foreign": build_tiny_model_dir(base / "foreign", vocab_size=300),
    }


@pytest.fixture(scope="module")
def lms(models):
    from models.loading import load_model

    return {k: load_model(str(v), device="cpu") for k, v in models.items()}


def _traces(tiny_lm, db_path: Path, n: int = 2) -> tuple[Store, list[int]]:
    store = Store.open(db_path)
    ids = []
    for i in range(n):
        r = annotate_prompt(tiny_lm, store, f"Tom has {i + 3} apples.", PARAMS, answer="3",
                            source_set="toy", source_id=f"t{i}")
        ids.append(r.trace_id)
    return store, ids


def test_tokenizer_fixtures(tiny_lm, lms):
    assert lms["other"].tokenizer_hash == tiny_lm.tokenizer_hash
    assert lms["same"].tokenizer_hash == tiny_lm.tokenizer_hash
    assert lms["foreign"].tokenizer_hash != tiny_lm.tokenizer_hash


def test_same_weights_reproduce_the_stored_numbers(tiny_lm, lms, db_path):
    store, ids = _traces(tiny_lm, db_path)
    (r1, r2) = rescore(lms["same"], store, [store.trace(t) for t in ids])
    assert r1.status == r2.status == "scored"
    for tid in ids:
        (model_id,) = store.scored_models(tid)
        assert model_id != store.trace(tid).model_id
        assert store.model_row(model_id)["spec"] == lms["same"].spec
        scores = store.token_scores(tid, model_id)
        tokens = store.tokens(tid)
        assert [s["position"] for s in scores] == [t.position for t in tokens]
        for s, t in zip(scores, tokens, strict=True):
            assert s["logprob"] == pytest.approx(t.logprob, abs=1e-4)
            assert s["entropy"] == pytest.approx(t.entropy, abs=1e-4)
            assert s["rank"] == t.rank
            assert [a["token_id"] for a in s["top"]] == [a.token_id for a in t.top]
            assert len(s["top"]) == 4


def test_other_model_is_stored_beside_and_resumes(tiny_lm, lms, db_path):
    store, ids = _traces(tiny_lm, db_path)
    infos = [store.trace(t) for t in ids]
    first = rescore(lms["other"], store, infos)
    assert [r.status for r in first] == ["scored", "scored"]
    model_id = next(iter(store.scored_models(ids[0])))
    scores = store.token_scores(ids[0], model_id)
    tokens = store.tokens(ids[0])
    assert len(scores) == len(tokens)
    assert any(abs(s["entropy"] - t.entropy) > 1e-3 for s, t in zip(scores, tokens,
                                                                     strict=True))
    assert [r.status for r in rescore(lms["other"], store, infos)] == ["skipped", "skipped"]
    # The model's own traces are not rescored by itself.
    own = annotate_prompt(lms["other"], store, "Hi.", PARAMS)
    (r,) = rescore(lms["other"], store, [store.trace(own.trace_id)])
    assert r.status == "own" and not store.scored_models(own.trace_id)


def test_branch_scores_its_own_positions(tiny_lm, lms, db_path):
    from forkview import forks

    store, (tid,) = _traces(tiny_lm, db_path, n=1)
    source = forks.load_source(store, tid)
    plan = forks.plan_samples(source, 4, 1, False, GenerationParams(
        max_new_tokens=5, temperature=1.0, seed=9, top_alternatives=4))
    (branch,) = forks.grow(tiny_lm, store, source, 4, plan)
    (r,) = rescore(lms["same"], store, [store.trace(branch.trace_id)])
    assert r.status == "scored" and r.n_scored == len(store.tokens(branch.trace_id))
    (model_id,) = store.scored_models(branch.trace_id)
    scores = store.token_scores(branch.trace_id, model_id)
    own = store.tokens(branch.trace_id)
    assert scores[0]["position"] == 4 == own[0].position
    for s, t in zip(scores, own, strict=True):
        assert s["entropy"] == pytest.approx(t.entropy, abs=1e-4)


def test_context_limit_scores_what_fits(tiny_lm, lms, db_path):
    store, (tid,) = _traces(tiny_lm, db_path, n=1)
    info = store.trace(tid)
    room = 14 - len(info.prompt_token_ids)
    assert 0 < room < info.n_tokens  # the fixture is sized for this
    (r,) = rescore(lms["short"], store, [info])
    assert r.n_scored == room and "context" in r.note


def test_mi_under_the_second_model_is_kept_beside(tiny_lm, lms, db_path):
    from forkview.mi import run_estimator
    from models.estimators import get_estimator

    store, (tid,) = _traces(tiny_lm, db_path, n=1)
    own = run_estimator(tiny_lm, store, tid, get_estimator("hsic"))
    rescore(lms["other"], store, [store.trace(tid)], estimators=[get_estimator("hsic")])
    runs = store.mi_runs(tid)
    assert len(runs) == 2 and {r.status for r in runs} == {"complete"}
    first, second = runs
    assert first.id == own.run_id and "model" not in first.params
    assert second.params["model"].startswith(lms["other"].spec)
    assert store.mi_values(first.id) != store.mi_values(second.id)
    # Again: nothing new.
    rescore(lms["other"], store, [store.trace(tid)], estimators=[get_estimator("hsic")])
    assert len(store.mi_runs(tid)) == 2


def test_selection(tiny_lm, db_path):
    store, ids = _traces(tiny_lm, db_path)
    assert [t.id for t in select_traces(store, set_name="toy")] == ids
    assert [t.id for t in select_traces(store, all_traces=True)] == ids
    assert [t.id for t in select_traces(store, trace_ids=[ids[1]])] == [ids[1]]
    with pytest.raises(StoreError, match="no traces from prompt set 'nope'"):
        select_traces(store, set_name="nope")


# ---------------------------------------------------------------- the command


def test_cli_rescore_json_and_refusal(tiny_lm, models, db_path, capsys):
    store, ids = _traces(tiny_lm, db_path)
    store.close()
    assert main(["rescore", "--db", str(db_path), "--set", "toy", "--model",
                 str(models["other"]), "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(o["trace_id"], o["status"]) for o in out] == [(ids[0], "scored"),
                                                           (ids[1], "scored")]
    # A different tokenizer: one line naming both models, nothing written.
    code = main(["rescore", "--db", str(db_path), "--trace", str(ids[0]), "--model",
                 str(models["foreign"])])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "tokenizer" in err and "foreign" in err and "tiny-model" in err
    store = Store.open(db_path, readonly=True)
    assert len(store.scored_models(ids[0])) == 1


@pytest.mark.parametrize("args, needle, code", [
    (["--all"], "rescore needs --model", 2),
    (["--trace", "99", "--model", "x"], "no trace with id 99", 1),
    (["--set", "nope", "--model", "x"], "no traces from prompt set", 1),
])
def test_cli_bad_requests(tiny_lm, db_path, capsys, args, needle, code):
    _traces(tiny_lm, db_path, n=1)[0].close()
    assert main(["rescore", "--db", str(db_path), *args]) == code
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
