"""`forkview import`: traces made elsewhere, scored teacher-forced, equal to what
generation records for the same tokens; bad lines skipped with their line numbers;
provenance in meta; a repeated import adds nothing."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from forkview.cli import main
from store import Store
from tests.tiny import build_tiny_model_dir

TOL = 1e-4


def annotate(capsys, model: Path, db: Path, prompt: str, *extra: str) -> dict:
    assert main(["annotate", "--prompt", prompt, "--max-new-tokens", "12", "--json",
                 "--model", str(model), "--db", str(db), *extra]) == 0
    return json.loads(capsys.readouterr().out)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def run_import(capsys, path: Path, model: Path, db: Path, *extra: str) -> tuple[int, list[int],
                                                                                  str]:
    rc = main(["import", str(path), "--model", str(model), "--db", str(db), *extra])
    out = capsys.readouterr()
    return rc, [int(x) for x in out.out.split()], out.err


def max_difference(generated: dict, store: Store, trace_id: int) -> float:
    """Compare every token of an imported trace with the generated one: ids, ranks and
    alternatives' ids exactly, the numbers within TOL. Returns the largest difference."""
    got = store.tokens(trace_id)
    want = generated["tokens"]
    assert [t.token_id for t in got] == [t["token_id"] for t in want]
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        assert g.position == w["position"]
        assert g.rank == w["rank"]
        assert g.text == w["text"]
        assert [a.token_id for a in g.top] == [a["token_id"] for a in w["top"]]
        diffs = [abs(g.entropy - w["entropy"]), abs(g.logprob - w["logprob"]),
                 abs(g.sampling_entropy - w["sampling_entropy"]),
                 *(abs(a.prob - b["prob"]) for a, b in zip(g.top, w["top"], strict=True))]
        worst = max(worst, *diffs)
    assert worst <= TOL
    return worst


@pytest.fixture(scope="module")
def words_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, able to write only whole words (' has', ' apples', ...): the
    output rows of every other token are zero. Its text is plain ASCII and tokenises
    back to the very ids it was generated as, which a random model's text does not."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    d = build_tiny_model_dir(tmp_path_factory.mktemp("words-model"))
    tok = AutoTokenizer.from_pretrained(d)
    words = {i for i in range(len(tok))
             if re.fullmatch(r" [A-Za-z]+", tok.decode([i]))
             and tok(tok.decode([i]), add_special_tokens=False)["input_ids"] == [i]}
    weights = load_file(d / "model.safetensors")
    for i in range(weights["lm_head.weight"].shape[0]):
        if i not in words:
            weights["lm_head.weight"][i] = 0
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    return d


# ------------------------------------------------------------------ equal to generation
@pytest.mark.parametrize("batch", ["1", "2"])
def test_imported_ids_score_as_generated(tiny_model_dir, tmp_path, capsys, batch):
    """Greedy and sampled traces from `annotate`, their prompts and response ids in a
    JSONL: the import records every token as generation did (batch 2: one padded
    forward pass for prompts and responses of different lengths)."""
    db = tmp_path / "t.db"
    greedy = annotate(capsys, tiny_model_dir, db, "Tom has 3 apples.")
    sampled = annotate(capsys, tiny_model_dir, db, "What is 3 + 5? Think step by step.",
                       "--temperature", "1", "--seed", "11", "--top-k", "50")
    rows = [
        {"prompt": g["prompt"], "response_ids": [t["token_id"] for t in g["tokens"]],
         **{k: g["params"][k] for k in ("temperature", "top_p", "top_k", "seed")},
         "answer": "8", "id": f"q{i}"}
        for i, g in enumerate((greedy, sampled))
    ]
    path = write_jsonl(tmp_path / "traces.jsonl", rows)
    rc, ids, err = run_import(capsys, path, tiny_model_dir, db, "--batch", batch)
    assert rc == 0, err
    assert len(ids) == 2
    assert "2 traces imported (24 tokens), 0 skipped" in err
    store = Store.open(db, readonly=True)
    worst = 0.0
    lines = path.read_bytes().splitlines()
    for n, (tid, gen) in enumerate(zip(ids, (greedy, sampled), strict=True), start=1):
        info = store.trace(tid)
        assert (info.origin, info.status, info.stop_reason) == ("import", "complete", "import")
        assert info.parent_trace_id is None
        assert info.prompt_token_ids == gen["prompt_token_ids"]
        assert info.text == gen["text"]
        assert info.params.temperature == gen["params"]["temperature"]
        assert info.reference_answer == "8"
        assert (info.source_set, info.source_id) == ("traces", f"q{n - 1}")
        prov = store.import_provenance(tid)
        assert prov["file"] == str(path.resolve())
        assert prov["line"] == n
        assert prov["sha256"] == hashlib.sha256(lines[n - 1]).hexdigest()
        assert prov["response"] == "token_ids"
        worst = max(worst, max_difference(gen, store, tid))
    print(f"max |difference| import vs generation (ids, batch {batch}): {worst:.3g}")


def test_imported_text_tokenises_and_scores_as_generated(words_model_dir, tmp_path, capsys):
    db = tmp_path / "t.db"
    gen = annotate(capsys, words_model_dir, db, "Tom has 3 apples.")
    assert gen["text"].isascii() and len(gen["tokens"]) == 12
    path = write_jsonl(tmp_path / "text.jsonl",
                       [{"prompt": gen["prompt"], "response": gen["text"], "temperature": 0}])
    rc, (tid,), err = run_import(capsys, path, words_model_dir, db)
    assert rc == 0, err
    store = Store.open(db, readonly=True)
    assert store.import_provenance(tid)["response"] == "text"
    worst = max_difference(gen, store, tid)
    print(f"max |difference| import vs generation (text): {worst:.3g}")


# ------------------------------------------------------------------ bad lines
def test_bad_lines_are_named_and_skipped(tiny_model_dir, tmp_path, capsys):
    db = tmp_path / "t.db"
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "Tom has 3 apples.", "response": " has"},           # 1 good
        "{not json",                                                  # 2
        {"response": "hello"},                                        # 3 no prompt
        {"prompt": "hi", "response": ""},                             # 4 empty response
        "",                                                           # 5 blank: ignored
        {"prompt": "hi", "response_ids": []},                         # 6 empty ids
        {"prompt": "hi", "token_ids": [1, 99999]},                    # 7 outside the vocab
        {"prompt": "hi"},                                             # 8 no response
        [1, 2],                                                       # 9 not an object
        {"prompt": "  ", "response": "x"},                            # 10 empty prompt
        {"prompt": "hi", "response": "x", "temperature": "hot"},      # 11 bad temperature
        {"prompt": "Tom has 3 apples.", "token_ids": [40, 41]},       # 12 good
    ])
    rc, ids, err = run_import(capsys, path, tiny_model_dir, db)
    assert rc == 0
    assert len(ids) == 2
    reasons = {int(m.group(1)): m.group(2) for m in
               re.finditer(r"mixed\.jsonl:(\d+): (.*); skipped", err)}
    assert sorted(reasons) == [2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert "bad JSON" in reasons[2]
    assert "no prompt" in reasons[3]
    assert "empty response" in reasons[4] and "empty response" in reasons[6]
    assert "99999" in reasons[7] and "vocabulary" in reasons[7]
    assert "no response" in reasons[8]
    assert "JSON object" in reasons[9]
    assert "empty prompt" in reasons[10]
    assert "temperature" in reasons[11]
    assert err.strip().splitlines()[-1].endswith("2 traces imported (3 tokens), 9 skipped")
    store = Store.open(db, readonly=True)
    assert [store.import_provenance(t)["line"] for t in ids] == [1, 12]

    nothing = write_jsonl(tmp_path / "bad.jsonl", ["nope", {"prompt": "x"}])
    rc, ids, err = run_import(capsys, nothing, tiny_model_dir, db)
    assert rc == 1 and ids == []
    assert "0 traces imported (0 tokens), 2 skipped" in err


def test_missing_or_unknown_file_is_a_usage_error(tiny_model_dir, tmp_path, capsys):
    db = tmp_path / "t.db"
    assert main(["import", str(tmp_path / "nope.jsonl"), "--model", str(tiny_model_dir),
                 "--db", str(db)]) == 2
    assert "not found" in capsys.readouterr().err
    other = tmp_path / "x.txt"
    other.write_text("hi\n")
    assert main(["import", str(other), "--model", str(tiny_model_dir), "--db", str(db)]) == 2
    assert "unsupported file type" in capsys.readouterr().err
    assert not db.exists()  # refused before the database is opened


# ------------------------------------------------------------------ messages, fields
def test_messages_go_through_the_chat_template(tiny_lm, tiny_model_dir, tmp_path, capsys):
    db = tmp_path / "t.db"
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tom has 3 apples."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [chat[1]], "response": " has apples"},
        {"prompt": "Tom has 3 apples.", "response": " has apples"},
        {"messages": [*chat, {"role": "assistant", "content": " has apples"}]},
        {"messages": chat, "response": " has", "answer": "3"},
        {"messages": [{"role": "user"}], "response": "x"},
    ])
    rc, ids, err = run_import(capsys, path, tiny_model_dir, db)
    assert rc == 0, err
    assert "chat.jsonl:5: 'messages' message 0 is not an object" in err
    store = Store.open(db, readonly=True)
    one, text, assistant, plain = (store.trace(t) for t in ids)
    # One user message is the text prompt, encoded as `annotate` encodes it.
    assert one.prompt_token_ids == text.prompt_token_ids
    assert one.prompt == text.prompt == "Tom has 3 apples."
    assert one.prompt_id == text.prompt_id  # the same prompt row
    assert [t.entropy for t in store.tokens(one.id)] == pytest.approx(
        [t.entropy for t in store.tokens(text.id)], abs=TOL)
    templated = tiny_lm.tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                                      tokenize=True)
    templated = templated["input_ids"] if not isinstance(templated, list) else templated
    assert assistant.prompt_token_ids == list(templated)
    assert assistant.text == " has apples"  # the assistant's message was the response
    assert json.loads(assistant.prompt) == chat
    assert plain.reference_answer == "3"

    rc, ids, err = run_import(capsys, write_jsonl(tmp_path / "raw.jsonl", [
        {"messages": chat, "response": "x"}]), tiny_model_dir, db, "--raw")
    assert rc == 1 and "--raw" in err and "chat template" in err


def test_parquet_with_mapped_fields(tiny_model_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    db = tmp_path / "t.db"
    path = tmp_path / "dump.parquet"
    pq.write_table(pa.table({
        "question": ["Tom has 3 apples.", "What is 3 + 5?"],
        "output": [[40, 41, 42], [43]],
        "key": ["a", "b"],
        "gold": ["#### 3", "8"],
    }), path)
    rc, ids, err = run_import(capsys, path, tiny_model_dir, db, "--prompt-field", "question",
                              "--response-field", "output", "--id-field", "key",
                              "--answer-field", "gold", "--set", "dump-set", "--batch", "4")
    assert rc == 0, err
    store = Store.open(db, readonly=True)
    a, b = (store.trace(t) for t in ids)
    assert [t.token_id for t in store.tokens(a.id)] == [40, 41, 42]
    assert (a.source_set, a.source_id, a.reference_answer) == ("dump-set", "a", "3")
    assert (b.source_id, b.reference_answer) == ("b", "8")
    assert store.import_provenance(b.id)["row"] == 2
    assert store.import_provenance(b.id)["format"] == "parquet"

    missing = run_import(capsys, path, tiny_model_dir, tmp_path / "other.db",
                         "--response-field", "nope")
    assert missing[0] == 1 and "no 'nope' field (--response-field)" in missing[2]


# ------------------------------------------------------------------ idempotence, MI
def test_importing_again_adds_nothing(tiny_model_dir, tmp_path, capsys):
    db = tmp_path / "t.db"
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "Tom has 3 apples.", "response": " has apples"},
        {"prompt": "Tom has 3 apples.", "response": " has apples"},  # the same line again
        {"prompt": "Tom has 3 apples.", "response": " has"},
    ])
    rc, first, err = run_import(capsys, path, tiny_model_dir, db)
    assert rc == 0 and len(first) == 2
    assert "t.jsonl:2: the same as line 1; skipped" in err
    rc, again, err = run_import(capsys, path, tiny_model_dir, db)
    assert rc == 1 and again == []
    assert f"t.jsonl:1: already imported as trace {first[0]}; skipped" in err
    assert "0 traces imported (0 tokens), 3 skipped, 3 of them already imported" in err
    store = Store.open(db, readonly=True)
    assert store.count_traces() == 2
    # Another model (here: another dtype) is another models row: imported anew.
    rc, other, _ = run_import(capsys, path, tiny_model_dir, db, "--dtype", "bfloat16")
    assert rc == 0 and len(other) == 2


def test_mi_runs_after_import(tiny_model_dir, tmp_path, capsys):
    db = tmp_path / "t.db"
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "Tom has 3 apples and buys 5 more. How many?",
         "response": " The answer is 8.", "answer": "8"},
    ])
    rc, (tid,), err = run_import(capsys, path, tiny_model_dir, db, "--mi", "answer-gain")
    assert rc == 0, err
    assert "MI runs: 1 computed" in err
    store = Store.open(db, readonly=True)
    info = store.trace(tid)
    assert (info.answer, info.correct) == ("8", True)  # extracted as for generated traces
    (run,) = store.mi_runs(tid)
    assert (run.estimator, run.status) == ("answer-gain", "complete")
    assert run.n_values == info.n_tokens
