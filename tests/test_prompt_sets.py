from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest

from forkview.prompt_sets import (
    Fields,
    PromptItem,
    arith_problems,
    load_prompt_set,
    load_records,
    read_prompt_file,
    split_reference,
)

# ---------------------------------------------------------------- independent checker

def evaluate(expr: str) -> Fraction:
    """Evaluate the item's expression tree with exact fractions, separately from the
    generator's own running arithmetic; every intermediate count must stay positive
    and every share must come out whole (a story can't split an apple)."""

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        assert isinstance(node, ast.BinOp), f"unexpected node {ast.dump(node)}"
        a, b = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Add):
            out = a + b
        elif isinstance(node.op, ast.Sub):
            out = a - b
        elif isinstance(node.op, ast.Mult):
            out = a * b
        elif isinstance(node.op, ast.Div):
            out = a / b
            assert out.denominator == 1, f"{a} / {b} is not whole"
        else:
            raise AssertionError(f"unexpected operator {node.op}")
        assert out > 0, f"intermediate value {out} in {expr}"
        return out

    return ev(ast.parse(expr, mode="eval").body)


def constants(expr: str) -> Counter[int]:
    return Counter(
        n.value for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Constant)
    )


@pytest.fixture(scope="module")
def items() -> list[PromptItem]:
    return arith_problems()


def test_enough_items_with_unique_ids(items: list[PromptItem]) -> None:
    assert len(items) >= 20
    assert len({i.id for i in items}) == len(items)
    assert len({i.prompt for i in items}) == len(items)
    assert items[0].id == "arith-000"
    assert all(i.set == "arith" for i in items)


def test_deterministic_across_calls(items: list[PromptItem]) -> None:
    assert arith_problems() == items
    assert arith_problems(n=5) == items[:5]
    assert arith_problems(n=24, seed=1) != items


def test_other_seeds_get_distinct_ids() -> None:
    other = arith_problems(n=3, seed=7)
    assert [i.id for i in other] == ["arith-s7-000", "arith-s7-001", "arith-s7-002"]


def test_answers_verified_by_expression_tree(items: list[PromptItem]) -> None:
    for item in items:
        value = evaluate(item.expression)
        assert value.denominator == 1
        assert item.answer == str(int(value)), item.id


def test_expression_matches_the_story(items: list[PromptItem]) -> None:
    """Every number in the prompt is an operand of the expression and vice versa
    (doubling and tripling are said in words)."""
    for item in items:
        in_prompt = Counter(int(n) for n in re.findall(r"\d+", item.prompt))
        expected = constants(item.expression)
        expected -= Counter({2: item.prompt.count(" doubles")})
        expected -= Counter({3: item.prompt.count(" triples")})
        assert in_prompt == expected, item.id


def test_two_to_four_steps(items: list[PromptItem]) -> None:
    steps = [item.expression.count("(") + 1 for item in items]
    assert all(2 <= s <= 4 for s in steps)
    assert len(set(steps)) >= 2  # a mix of lengths


def test_solution_is_worked_and_ends_with_answer(items: list[PromptItem]) -> None:
    for item in items:
        lines = item.solution.splitlines()
        assert len(lines) >= 3
        assert lines[-1] == f"The answer is {item.answer}."
        # Every worked line's equation is right.
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", item.solution):
            assert evaluate(f"{a} {op} {b}") == int(c), (item.id, a, op, b, c)


def test_small_numbers(items: list[PromptItem]) -> None:
    assert all(0 < int(i.answer or 0) <= 300 for i in items)


def test_load_prompt_set_builtin(items: list[PromptItem]) -> None:
    assert load_prompt_set("builtin:arith") == items
    assert load_prompt_set("arith") == items
    with pytest.raises(ValueError, match="unknown prompt set 'builtin:nope'"):
        load_prompt_set("builtin:nope")
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompt_set("nope")


def test_load_prompt_set_file(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"prompt": "2 + 2?", "answer": 4}) + "\n")
    assert load_prompt_set(str(f)) == [PromptItem("mine-000", "2 + 2?", "4", set="mine")]


def test_prompt_sets_import_no_torch() -> None:
    code = ("import sys, forkview.prompt_sets; "
            "assert 'torch' not in sys.modules and 'textual' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- prompt files

def test_read_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "probs.jsonl"
    f.write_text(
        '{"prompt": "What is 3 + 4?", "answer": "7", "id": "q1", "set": "toy"}\n'
        "\n"
        '{"prompt": "Name a colour.", "answer": null}\n'
        '{"prompt": "6 * 7?", "answer": 42, "solution": "6 * 7 = 42"}\n',
        encoding="utf-8",
    )
    got = read_prompt_file(f)
    assert got == [
        PromptItem("q1", "What is 3 + 4?", "7", set="toy"),
        PromptItem("probs-001", "Name a colour.", None, set="probs"),
        PromptItem("probs-002", "6 * 7?", "42", set="probs", solution="6 * 7 = 42"),
    ]


def test_read_csv_with_bom_and_multiline(tmp_path: Path) -> None:
    f = tmp_path / "probs.csv"
    f.write_text(
        '\ufeffid,prompt,answer\na,"Line one\nline two, with comma",12\nb,Plain,\n',
        encoding="utf-8",
    )
    got = read_prompt_file(f)
    assert got == [
        PromptItem("a", "Line one\nline two, with comma", "12", set="probs"),
        PromptItem("b", "Plain", None, set="probs"),
    ]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"prompt file not found: .*nope\.jsonl") as e:
        read_prompt_file(tmp_path / "nope.jsonl")
    assert "\n" not in str(e.value)


def test_bad_json_line_names_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n\n{"prompt": "broken"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: bad JSON") as e:
        read_prompt_file(f)
    assert "\n" not in str(e.value)


def test_json_line_not_an_object(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('["prompt"]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object"):
        read_prompt_file(f)


@pytest.mark.parametrize("line", ['{"answer": "3"}', '{"prompt": "  "}', '{"prompt": 5}'])
def test_missing_prompt_field(tmp_path: Path, line: str) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: missing or empty 'prompt' field"):
        read_prompt_file(f)


def test_csv_without_prompt_column(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text("query,answer\nWhat?,1\n")
    with pytest.raises(ValueError, match=r"no 'prompt' column.*columns: query, answer"):
        read_prompt_file(f)


def test_duplicate_ids(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: duplicate id 'x'"):
        read_prompt_file(f)


def test_empty_and_unsupported_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompt_file(empty)
    txt = tmp_path / "p.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match="unsupported prompt file type"):
        read_prompt_file(txt)


# ---------------------------------------------------------------- datasets in

GSM8K_ANSWER = ("Each box holds 6 * 4 = <<6*4=24>>24 cans.\n"
                "Three boxes hold 24 * 3 = <<24*3=72>>72 cans.\n#### 72")
GSM8K_SOLUTION = "Each box holds 6 * 4 = 24 cans.\nThree boxes hold 24 * 3 = 72 cans."
MATH_SOLUTION = (r"Rationalise: $\frac{1}{\sqrt{2}} = \frac{\sqrt{2}}{2}$, so the answer is "
                 r"$\boxed{\frac{\sqrt{2}}{2}}$.")


def test_split_reference() -> None:
    assert split_reference(GSM8K_ANSWER) == ("72", GSM8K_SOLUTION)
    assert split_reference(MATH_SOLUTION) == (r"\frac{\sqrt{2}}{2}", MATH_SOLUTION)
    assert split_reference(r"\boxed{5} or rather \boxed{\{1, 2\}}")[0] == r"\{1, 2\}"
    assert split_reference(" 42 ") == ("42", "")
    assert split_reference(r"\frac{1}{2}") == (r"\frac{1}{2}", "")
    assert split_reference("see #### ") == ("see ####", "")  # nothing after the marker


def test_gsm8k_jsonl(tmp_path: Path) -> None:
    f = tmp_path / "gsm8k.jsonl"
    rows = [{"question": "Three boxes of 4 packs of 6 cans: how many cans?",
             "answer": GSM8K_ANSWER},
            {"question": "What is 2 + 2?", "answer": "#### 4"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompt_file(f) == [
        PromptItem("gsm8k-000", rows[0]["question"], "72", set="gsm8k",
                   solution=GSM8K_SOLUTION),
        PromptItem("gsm8k-001", "What is 2 + 2?", "4", set="gsm8k"),
    ]


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_math_parquet(tmp_path: Path) -> None:
    f = write_parquet(tmp_path / "math.parquet", {
        "problem": ["Rationalise 1/sqrt(2).", "Add 1 and 2."],
        "solution": [MATH_SOLUTION, r"$1 + 2 = \boxed{3}$"],
        "unique_id": ["algebra/1", "algebra/2"],
    })
    got = load_records(str(f), Fields(id="unique_id"))
    assert got == [
        PromptItem("algebra/1", "Rationalise 1/sqrt(2).", r"\frac{\sqrt{2}}{2}", set="math",
                   solution=MATH_SOLUTION),
        PromptItem("algebra/2", "Add 1 and 2.", "3", set="math",
                   solution=r"$1 + 2 = \boxed{3}$"),
    ]
    # With an `answer` column too (MATH-500's layout): the answer is that, the
    # solution column stays the worked solution.
    g = write_parquet(tmp_path / "m500.parquet", {
        "problem": ["Rationalise 1/sqrt(2)."], "solution": [MATH_SOLUTION],
        "answer": [r"\frac{\sqrt2}{2}"]})
    (item,) = read_prompt_file(g)
    assert (item.answer, item.solution) == (r"\frac{\sqrt2}{2}", MATH_SOLUTION)


def test_field_options(tmp_path: Path) -> None:
    f = tmp_path / "mine.csv"
    f.write_text("uid,q,gold\nu1,What is 3 * 3?,9\n")
    assert read_prompt_file(f, Fields("q", "gold", "uid")) == [
        PromptItem("u1", "What is 3 * 3?", "9", set="mine")]
    with pytest.raises(ValueError, match=r"mine.csv: no 'text' column \(--prompt-field\); "
                                         r"columns: uid, q, gold"):
        read_prompt_file(f, Fields(prompt="text"))
    j = tmp_path / "mine.jsonl"
    j.write_text('{"q": "a", "gold": 1}\n{"q": "b"}\n')
    with pytest.raises(ValueError, match=r"mine.jsonl:2: no 'gold' field \(--answer-field\)"):
        read_prompt_file(j, Fields("q", "gold"))
    p = write_parquet(tmp_path / "mine.parquet", {"q": ["a"]})
    with pytest.raises(ValueError, match=r"no 'id' column \(--id-field\)"):
        read_prompt_file(p, Fields(prompt="q", id="id"))


def test_malformed_rows_name_their_line(tmp_path: Path) -> None:
    """A malformed row refuses the file (as a bad JSON line always did), naming the
    line, or the row of a Parquet file, counted from 1."""
    f = tmp_path / "q.csv"
    f.write_text('id,prompt,answer\na,"Fine, quoted\nover two lines",1\nb,"Never closed,2\n'
                 "c,Plain,3\n")
    with pytest.raises(ValueError, match=r"q.csv:4: bad CSV \(a quoted field opened here "
                                         r"is never closed\)") as e:
        read_prompt_file(f)
    assert "\n" not in str(e.value)
    f.write_text('id,prompt,answer\na,"x"y,1\n')
    with pytest.raises(ValueError, match=r"q.csv:2: bad CSV"):
        read_prompt_file(f)
    f.write_text("id,prompt,answer\na,Fine,1\n\nb,Too,many,fields\n")
    with pytest.raises(ValueError, match=r"q.csv:4: 4 fields, the header has 3"):
        read_prompt_file(f)
    p = write_parquet(tmp_path / "q.parquet", {"question": ["ok", None, "ok too"]})
    with pytest.raises(ValueError, match=r"q.parquet row 2: missing or empty 'prompt' field "
                                         r"\(or 'question', 'problem'\)"):
        read_prompt_file(p)
    p = write_parquet(tmp_path / "r.parquet", {"prompt": ["a", "b"], "answer": [[1], [2]]})
    with pytest.raises(ValueError, match=r"r.parquet row 1: field 'answer' is a list"):
        read_prompt_file(p)
    bad = tmp_path / "s.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"s.parquet: not a readable Parquet file"):
        read_prompt_file(bad)


def test_split_and_fields_only_where_they_apply(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="--split goes with a Hugging Face dataset"):
        load_records(str(f), split="test")
    with pytest.raises(ValueError, match="built-in set"):
        load_records("builtin:arith", Fields(prompt="q"))
    with pytest.raises(ValueError, match="unknown prompt set 'nope'"):
        load_records("nope")


def save_dataset(path: Path, splits: dict[str, list[dict]] | list[dict]) -> Path:
    datasets = pytest.importorskip("datasets")

    def table(rows: list[dict]):
        return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})

    obj = (table(splits) if isinstance(splits, list)
           else datasets.DatasetDict({k: table(v) for k, v in splits.items()}))
    obj.save_to_disk(str(path))
    return path


GSM_SPLITS = {
    "train": [{"question": "Train 1 + 1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"}],
    "test": [{"question": "Test 2 * 3?", "answer": "2 * 3 = <<2*3=6>>6\n#### 6"},
             {"question": "Test 5 - 1?", "answer": "#### 4"}],
}


def test_dataset_saved_to_disk(tmp_path: Path) -> None:
    d = save_dataset(tmp_path / "gsm", GSM_SPLITS)
    test = [PromptItem("gsm-test-000", "Test 2 * 3?", "6", set="gsm", solution="2 * 3 = 6"),
            PromptItem("gsm-test-001", "Test 5 - 1?", "4", set="gsm")]
    assert load_records(str(d)) == test  # "test" by default
    assert load_records(str(d), split="test") == test
    assert load_records(f"hf:{d}", split="train") == [
        PromptItem("gsm-train-000", "Train 1 + 1?", "2", set="gsm", solution="1 + 1 = 2")]
    with pytest.raises(ValueError, match=r"no split 'dev' \(splits: train, test\)"):
        load_records(str(d), split="dev")
    with pytest.raises(ValueError, match=r"\(split test\): no 'q' column \(--prompt-field\)"):
        load_records(str(d), Fields(prompt="q"))
    only = save_dataset(tmp_path / "one", [{"problem": "1 + 1?", "solution": r"\boxed{2}"}])
    assert load_records(str(only)) == [
        PromptItem("one-000", "1 + 1?", "2", set="one", solution=r"\boxed{2}")]
    empty = tmp_path / "not-a-dataset"
    empty.mkdir()
    with pytest.raises(ValueError, match="not-a-dataset: cannot load it as a saved dataset"):
        load_records(str(empty))


def test_dataset_without_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    d = tmp_path / "gsm"
    d.mkdir()
    for spec in (str(d), "someone/some-set"):
        with pytest.raises(ValueError, match=r"needs the optional `datasets` extra \(uv sync "
                                             r"--extra datasets, or pip install "
                                             r"'forkview\[datasets\]'\)") as e:
            load_records(spec)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- annotate with them

def annotate_refs(tiny_model_dir: Path, db: Path, capsys: pytest.CaptureFixture,
                  *args: str) -> list[tuple]:
    from forkview.cli import main
    from store import Store

    assert main(["annotate", *args, "--model", str(tiny_model_dir), "--db", str(db),
                 "--max-new-tokens", "3"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    store = Store.open(db, readonly=True)
    infos = [store.trace(i) for i in ids]
    return [(t.source_set, t.source_id, t.prompt, t.reference_answer, t.reference_solution)
            for t in infos]


def test_annotate_gsm8k_jsonl_and_math_parquet(tiny_model_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "gsm8k.jsonl"
    f.write_text(json.dumps({"question": "Cans?", "answer": GSM8K_ANSWER}) + "\n")
    db = tmp_path / "t.db"
    assert annotate_refs(tiny_model_dir, db, capsys, "--prompts", str(f)) == [
        ("gsm8k", "gsm8k-000", "Cans?", "72", GSM8K_SOLUTION)]
    p = write_parquet(tmp_path / "math.parquet", {
        "problem": ["Rationalise."], "solution": [MATH_SOLUTION], "unique_id": ["alg/1"]})
    assert annotate_refs(tiny_model_dir, db, capsys, "--prompts", str(p),
                         "--id-field", "unique_id") == [
        ("math", "alg/1", "Rationalise.", r"\frac{\sqrt{2}}{2}", MATH_SOLUTION)]


def test_annotate_dataset_folder(tiny_model_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    d = save_dataset(tmp_path / "gsm", GSM_SPLITS)
    assert annotate_refs(tiny_model_dir, tmp_path / "t.db", capsys, "--prompts", str(d),
                         "--split", "test") == [
        ("gsm", "gsm-test-000", "Test 2 * 3?", "6", "2 * 3 = 6"),
        ("gsm", "gsm-test-001", "Test 5 - 1?", "4", None)]


def test_annotate_prompt_set_options_need_prompts(capsys: pytest.CaptureFixture) -> None:
    from forkview.cli import main

    assert main(["annotate", "--prompt", "hi", "--split", "test"]) == 2
    assert "--split goes with --prompts" in capsys.readouterr().err
