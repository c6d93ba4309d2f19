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

from forkview.prompt_sets import PromptItem, arith_problems, load_prompt_set, read_prompt_file

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
    f.write_text("question,answer\nWhat?,1\n")
    with pytest.raises(ValueError, match="no 'prompt' column"):
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
