"""Reasoning models: chat templates with a system message and `enable_thinking`, the
thinking span stored per trace (models/thinking.py) and `forkview report --span`.

The model is a tiny random Qwen3 built from a config here, with a byte-level BPE
tokenizer that knows `<think>` / `</think>` as (non-special) added tokens and a short
Qwen3-style chat template: no network, loads in milliseconds.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from forkview.analysis.report import (
    ReportSettings,
    build_report,
    render_json,
    render_markdown,
)
from forkview.cli import build_parser, main, serve_command
from models.thinking import ThinkSpan, find_think_span, prompt_opens_thinking
from models.types import GenerationParams, TokenStep
from store import Store

# Qwen3's template, reduced to what matters here: roles, the generation prompt, and an
# empty thinking part in the generation prompt when enable_thinking is false.
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# DeepSeek-R1 distill: the generation prompt opens the thinking part.
R1_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
CORPUS = ["Let me think step by step: 3 + 5 = 8. The answer is 8.",
          "Hmm, wait. So the total is 12 apples. Final answer: 12",
          "You are a careful assistant. Think before you answer."]


def build_qwen_dir(path: Path, template: str = QWEN_TEMPLATE) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    transformers.logging.disable_progress_bar()
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.add_tokens(["<think>", "</think>"])  # as Qwen3: added, not special
    fast.chat_template = template
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=512, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_dir(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="module")
def qwen_lm(qwen_dir: Path):
    from models.loading import load_model

    return load_model(str(qwen_dir), device="cpu")


def rendered(lm, ids: list[int]) -> str:
    return lm.tokenizer.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------- the span finder
def test_markers_split_over_tokens() -> None:
    pieces = ["<th", "ink>", "Let", " me", " see", "</", "think", ">", "\n\n", "The", " end"]
    assert find_think_span(pieces) == ThinkSpan(2, 5, 8, True)


def test_tokens_straddling_a_marker_count_as_content() -> None:
    # "<think>So" holds content: thinking; "</think>\n" holds answer text: answer
    pieces = ["<think>So", " x", "</think>\n", "A"]
    assert find_think_span(pieces) == ThinkSpan(0, 2, 2, True)
    # one token holding the end of the thinking and the start of the answer: thinking
    pieces = ["<think>", "a", "b</think>c", "d"]
    assert find_think_span(pieces) == ThinkSpan(1, 3, 3, True)


def test_no_markers_no_span() -> None:
    assert find_think_span(["The", " answer", " is", " 8"]) is None
    assert find_think_span([]) is None
    # a stray closing marker after a prompt known not to open the thinking part
    assert find_think_span(["a", "</think>", "b"], prompt_text="<|im_start|>assistant\n") \
        is None


def test_thinking_opened_in_the_prompt() -> None:
    pieces = ["Hmm", ",", " ok", "</think>", "\n\n", "4"]
    prompt = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert prompt_opens_thinking(prompt)
    assert find_think_span(pieces, prompt_text=prompt) == ThinkSpan(0, 3, 4, True)
    assert find_think_span(pieces, opened=True) == ThinkSpan(0, 3, 4, True)
    # unknown prompt: a closing marker with no opening one before it says the same
    assert find_think_span(pieces) == ThinkSpan(0, 3, 4, True)
    # opened in the prompt and cut off: all of it is thinking, unterminated
    assert find_think_span(["a", "b"], prompt_text=prompt) == ThinkSpan(0, 2, None, False)
    # Qwen3 with thinking disabled closes the (empty) part in the prompt
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_unterminated_and_empty_and_held_back_pieces() -> None:
    span = find_think_span(["<think>", "\n", "Let", " me"])
    assert span == ThinkSpan(1, 4, None, False) and not span.terminated and len(span) == 3
    assert find_think_span(["<think>", "</think>", "Hi"]) == ThinkSpan(1, 1, 2, True)
    # an empty piece (bytes held back) goes with the next token that has text; nothing
    # after the closing marker: the answer starts at the end
    assert find_think_span(["<think>", "", "😀", "</think>", ""]) == ThinkSpan(1, 3, 5, True)
    # only the first thinking part counts; other markers can be given
    assert find_think_span(["<think>", "a", "</think>", "b", "<think>", "c"]) \
        == ThinkSpan(1, 2, 3, True)
    assert find_think_span(["[T]", "x", "[/T]", "y"], open_marker="[T]",
                           close_marker="[/T]") == ThinkSpan(1, 2, 3, True)


# ---------------------------------------------------------------------- chat templates
def test_system_and_enable_thinking_change_the_prompt_as_the_template_says(qwen_lm) -> None:
    from models.errors import ModelError
    from models.prompting import chat_messages, encode_prompt, template_kwargs

    plain = encode_prompt(qwen_lm, "2+2?")
    assert rendered(qwen_lm, plain) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert encode_prompt(qwen_lm, "2+2?", enable_thinking=True) == plain
    off = encode_prompt(qwen_lm, "2+2?", enable_thinking=False)
    assert rendered(qwen_lm, off) == rendered(qwen_lm, plain) + "<think>\n\n</think>\n\n"
    assert off[: len(plain)] == plain
    with_system = encode_prompt(qwen_lm, "2+2?", system="Be brief.")
    assert rendered(qwen_lm, with_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + rendered(qwen_lm, plain))
    # the helpers other backends reuse
    assert chat_messages("q", "s") == [{"role": "system", "content": "s"},
                                       {"role": "user", "content": "q"}]
    assert template_kwargs(None) == {} and template_kwargs(False) == {"enable_thinking": False}
    with pytest.raises(ModelError, match="system prompt needs the chat template"):
        encode_prompt(qwen_lm, "2+2?", raw=True, system="Be brief.")


def test_generated_trace_records_its_settings_and_span(qwen_lm, tmp_path) -> None:
    from forkview.pipeline import annotate_prompt
    from models.prompting import encode_prompt

    store = Store.open(tmp_path / "t.db")
    params = GenerationParams(max_new_tokens=6, system="Be brief.", enable_thinking=False)
    result = annotate_prompt(qwen_lm, store, "2+2?", params)
    info = store.trace(result.trace_id)
    assert info.params.system == "Be brief." and info.params.enable_thinking is False
    assert info.prompt_token_ids == encode_prompt(qwen_lm, "2+2?", system="Be brief.",
                                                  enable_thinking=False)
    prompt_text = rendered(qwen_lm, info.prompt_token_ids)
    span = find_think_span([s.text for s in result.steps], prompt_text=prompt_text)
    assert (info.think_start, info.think_end) == ((span.start, span.end) if span else
                                                  (None, None))
    # settings round-trip: a batch re-run finds the trace by its parameters
    assert info.params == result.params


def test_batch_encodes_with_the_template_settings(qwen_lm, tmp_path) -> None:
    from forkview.batch import run_batch
    from forkview.prompt_sets import PromptItem
    from models.prompting import encode_prompt

    store = Store.open(tmp_path / "b.db")
    item = PromptItem(id="p1", prompt="3+5?", answer="8", set="s")
    params = GenerationParams(max_new_tokens=4, system="Think.", enable_thinking=True)
    summary = run_batch(qwen_lm, store, [item], params)
    (tid,) = summary.trace_ids
    info = store.trace(tid)
    assert info.prompt_token_ids == encode_prompt(qwen_lm, "3+5?", system="Think.",
                                                  enable_thinking=True)
    assert info.params.system == "Think." and info.params.enable_thinking is True
    # the same command again: already done
    assert run_batch(qwen_lm, store, [item], params).skipped == 1


def test_record_think_span_reads_the_prompt(qwen_lm, tmp_path) -> None:
    """A DeepSeek-R1-style generation prompt opened the thinking part: a response
    with only `</think>` (or none, cut off) starts inside it."""
    from forkview.pipeline import record_think_span

    store = Store.open(tmp_path / "r.db")
    tok = qwen_lm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                     chat_template=R1_TEMPLATE, add_generation_prompt=True,
                                     tokenize=False)
    assert prompt.endswith("<think>\n")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    tids = [make_trace(store, pieces) for pieces in (["So", " 2", "</think>", "\n\n", "2"],
                                                      ["So", " 2", ","])]
    assert record_think_span(store, tids[0], tok, ids) == ThinkSpan(0, 2, 3, True)
    assert record_think_span(store, tids[1], tok, ids) == ThinkSpan(0, 3, None, False)
    info = store.trace(tids[1])
    assert (info.think_start, info.think_end, info.answer_start) == (0, 3, None)


def test_import_applies_system_and_thinking_and_stores_the_span(qwen_lm, tmp_path) -> None:
    from forkview.importer import import_file
    from models.prompting import apply_template

    path = tmp_path / "in.jsonl"
    response = "<think>\nLet me think: 3 + 5 = 8.\n</think>\n\nThe answer is 8."
    rows = [{"prompt": "3+5?", "response": response, "answer": "8"},
            {"messages": [{"role": "system", "content": "Own system."},
                          {"role": "user", "content": "3+5?"}], "response": response},
            {"messages": [{"role": "user", "content": "3+5?"}], "response": "8"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    store = Store.open(tmp_path / "i.db")
    summary = import_file(qwen_lm, store, path, system="Be brief.", enable_thinking=False)
    assert len(summary.imported) == 3 and not summary.skipped
    first, own, plain = (store.trace(t) for t in summary.imported)
    tok = qwen_lm.tokenizer
    user = [{"role": "user", "content": "3+5?"}]
    assert first.prompt_token_ids == apply_template(
        tok, [{"role": "system", "content": "Be brief."}, *user], False)
    assert first.params.system == "Be brief." and first.params.enable_thinking is False
    # a chat list with its own system message keeps it; --system is not added
    assert own.prompt_token_ids == apply_template(
        tok, [{"role": "system", "content": "Own system."}, *user], False)
    assert own.params.system is None
    pieces = [s.text for s in store.tokens(first.id)]
    span = find_think_span(pieces)
    assert span is not None and span.terminated
    assert (first.think_start, first.think_end, first.answer_start) == (
        span.start, span.end, span.answer_start)
    assert "".join(pieces[span.start:span.end]) == "\nLet me think: 3 + 5 = 8.\n"
    assert "".join(pieces[span.answer_start:]) == "\n\nThe answer is 8."
    assert (plain.think_start, plain.think_end, plain.answer_start) == (None, None, None)


# ---------------------------------------------------------------------- the CLI
def test_cli_flags_reach_the_params() -> None:
    from forkview.cli import _params

    p = build_parser()
    args = p.parse_args(["annotate", "--prompt", "x", "--system", "S", "--no-enable-thinking"])
    assert (_params(args).system, _params(args).enable_thinking) == ("S", False)
    args = p.parse_args(["--enable-thinking"])  # the explorer
    assert (_params(args).system, _params(args).enable_thinking) == (None, True)
    args = p.parse_args(["annotate", "--prompts", "f.jsonl"])
    assert (_params(args).system, _params(args).enable_thinking) == (None, None)
    args = p.parse_args(["import", "f.jsonl", "--system", "S", "--enable-thinking"])
    assert (args.system, args.enable_thinking) == ("S", True)
    served = p.parse_args(serve_command(p.parse_args(
        ["serve", "--system", "-be brief", "--no-enable-thinking"]))[3:])
    assert (served.system, served.enable_thinking) == ("-be brief", False)


def test_cli_refuses_system_with_raw(tmp_path, capsys) -> None:
    rc = main(["annotate", "--prompt", "x", "--raw", "--system", "S",
               "--db", str(tmp_path / "x.db")])
    assert rc == 2
    assert "--system needs the chat template" in capsys.readouterr().err


# ---------------------------------------------------------------------- the store
def make_trace(store: Store, pieces: list[str], *, entropy=None, model_id: int | None = None,
               prompt: str = "p") -> int:
    mid = model_id or store.upsert_model(name="m", spec="m", kind="dir", dtype="float32",
                                         device="cpu")
    pid = store.add_prompt(prompt)
    tid = store.start_trace(model_id=mid, prompt_id=pid, prompt_token_ids=[1],
                            params=GenerationParams(max_new_tokens=len(pieces)))
    with store.writer(tid) as w:
        for i, text in enumerate(pieces):
            e = 0.5 if entropy is None else float(entropy[i])
            w.add(TokenStep(position=i, token_id=i, text=text, logprob=-0.1, rank=1,
                            entropy=e, sampling_entropy=0.0))
        w.finish("complete", "eos")
    return tid


def test_older_database_gains_the_columns_and_its_spans(tmp_path) -> None:
    path = tmp_path / "old.db"
    store = Store.open(path)
    thinking = make_trace(store, ["<think>", "a", " b", "</think>", "c"])
    opened = make_trace(store, ["a", "</think>", "c"])  # R1: opened in the prompt
    plain = make_trace(store, ["a", " b"])
    store.close()
    Store.close_all()
    # make it a version 4 file: without the new columns
    con = sqlite3.connect(path)
    for col in ("system", "enable_thinking", "think_start", "think_end", "answer_start"):
        con.execute(f"ALTER TABLE traces DROP COLUMN {col}")
    con.execute("ALTER TABLE models DROP COLUMN backend")
    con.execute("PRAGMA user_version = 4")
    con.commit()
    con.close()

    store = Store.open(path, readonly=True)  # upgraded first, even for reading
    assert store.schema_version == 5
    cols = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(traces)")}
    assert {"system", "enable_thinking", "think_start", "think_end", "answer_start"} <= cols
    model_cols = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(models)")}
    assert "backend" in model_cols
    spans = {t: (i.think_start, i.think_end, i.answer_start)
             for t in (thinking, opened, plain) for i in [store.trace(t)]}
    assert spans == {thinking: (1, 3, 4), opened: (0, 1, 2), plain: (None, None, None)}
    info = store.trace(plain)
    assert info.params.system is None and info.params.enable_thinking is None
    store.close()


# ---------------------------------------------------------------------- report --span
@pytest.fixture(scope="module")
def span_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, tuple]]:
    """Six traces with a thinking part of different lengths, two without one, one cut
    off while thinking; hsic values at every position."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("span") / "span.db"
    store = Store.open(path)
    words = [" So", " we", " 3", " +", " =", ".", "\n", " Wait"]
    shapes = []
    for i in range(6):
        think = [words[int(k)] for k in rng.integers(len(words), size=20 + 3 * i)]
        answer = [words[int(k)] for k in rng.integers(len(words), size=8 + i)]
        shapes.append(["<think>", *think, "</think>", *answer])
    shapes += [[words[int(k)] for k in rng.integers(len(words), size=15)] for _ in range(2)]
    shapes.append(["<think>", *[words[int(k)] for k in rng.integers(len(words), size=18)]])
    spans = {}
    for i, pieces in enumerate(shapes):
        n = len(pieces)
        h = rng.exponential(0.6, n)
        tid = make_trace(store, pieces, entropy=h, prompt=f"q{i}")
        span = find_think_span(pieces)
        store.set_think_span(tid, span)
        spans[tid] = (n, span)
        run, _ = store.open_mi_run(tid, "hsic", {"bandwidth": 50})
        mi = 0.8 * h + rng.normal(0, 0.25, n)
        store.add_mi_values(run, [(p, float(mi[p]), None) for p in range(n)])
        store.finish_mi_run(run, "complete")
    store.close()
    return path, spans


def span_report(path: Path, span: str):
    store = Store.open(path, readonly=True)
    try:
        return build_report(store, ReportSettings(bootstrap=20, null=20, span=span))
    finally:
        store.close()


def test_report_span_think_and_answer_restrict_positions(span_db) -> None:
    path, spans = span_db
    think_n = sum(len(s) for _, s in spans.values() if s is not None)
    answer_n = sum((n - s.answer_start) if s is not None and s.answer_start is not None
                   else (n if s is None else 0) for n, s in spans.values())
    for name, n_traces, n_tokens in (("think", 7, think_n), ("answer", 8, answer_n),
                                     ("all", 9, sum(n for n, _ in spans.values()))):
        report = span_report(path, name)
        assert report.n_traces == n_traces, name
        (model,) = report.models
        assert model.n_tokens == n_tokens, name
        (row,) = [r for r in report.rows if r.group == "all"]
        assert row.result.n_positions == n_tokens, name
        doc = json.loads(render_json(report))
        assert doc["rows"][0]["n_positions"] == n_tokens
        if name == "all":
            assert "span" not in doc["settings"] and not report.notes
        else:
            assert doc["settings"]["span"]["name"] == name
    think = span_report(path, "think")
    assert any("2 without a thinking part" in n for n in think.notes)
    answer = span_report(path, "answer")
    assert any("1 cut off while thinking" in n for n in answer.notes)


def test_report_span_think_matches_a_database_of_the_spans_alone(span_db, tmp_path) -> None:
    """--span think gives the numbers of a report on traces holding only their thinking
    positions: the slicing is the whole effect."""
    path, spans = span_db
    src = Store.open(path, readonly=True)
    cut = Store.open(tmp_path / "cut.db")
    for tid, (_n, span) in spans.items():
        if span is None or not len(span):
            continue
        steps = src.tokens(tid)[span.start:span.end]
        mi = src.mi_values(src.mi_runs(tid)[0].id)
        new = make_trace(cut, [s.text for s in steps], entropy=[s.entropy for s in steps],
                         prompt=f"cut{tid}")
        run, _ = cut.open_mi_run(new, "hsic", {"bandwidth": 50})
        cut.add_mi_values(run, [(k, mi[span.start + k], None) for k in range(len(steps))])
        cut.finish_mi_run(run, "complete")
    src.close()
    cut.close()
    a = span_report(path, "think").rows[0].result
    b = span_report(tmp_path / "cut.db", "all").rows[0].result
    assert (a.n_positions, a.n_high, a.n_peaks, a.n_both) == (
        b.n_positions, b.n_high, b.n_peaks, b.n_both)
    assert a.primary["estimate"] == pytest.approx(b.primary["estimate"], nan_ok=True)


def test_report_span_in_every_format(span_db, tmp_path, capsys) -> None:
    path, _ = span_db
    md = render_markdown(span_report(path, "think"))
    assert "thinking part only (--span think)" in md and "| span | think:" in md
    for fmt in ("html", "latex", "csv", "json"):
        out = tmp_path / f"r.{fmt}"
        assert main(["report", "--db", str(path), "--span", "answer", "--bootstrap", "10",
                     "--null", "10", "--format", fmt, "-o", str(out)]) == 0
        text = out.read_text(encoding="utf-8")
        assert ("answer only" in text) if fmt != "csv" else (",answer" in text), fmt
    default = render_markdown(span_report(path, "all"))
    assert "--span" not in default and "| span |" not in default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["report", "--span", "nope"])


def test_report_span_without_any_thinking_trace(tmp_path) -> None:
    from forkview.analysis.report import ReportError

    store = Store.open(tmp_path / "none.db")
    make_trace(store, ["a", " b", " c"])
    store.close()
    with pytest.raises(ReportError, match="thinking part"):
        span_report(tmp_path / "none.db", "think")
