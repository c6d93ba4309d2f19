"""The `forkview` command.

Imports stay inside the commands: `forkview --help`, `traces`, `export` and `browse`
never import torch, so they answer at once on a machine where loading torch takes
seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from models.types import GenerationParams

PROG = "forkview"


class UsageError(Exception):
    """A bad command-line value: reported on one line, exit status 2."""


def usage_line(message: str, prog: str = PROG) -> str:
    """The one line every usage error prints: `forkview: error: ... (see PROG --help)`,
    PROG being `forkview` or `forkview COMMAND`."""
    return f"{PROG}: error: {' '.join(str(message).split())} (see {prog} --help)"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2 instead of the usage
    block. The main parser and every subparser are of this class (`parser_class`)."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, usage_line(message, self.prog) + "\n")

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        # Unknown arguments after a command end up here, in the main parser: point at
        # the command's own --help, not the main one.
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(ns, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            self.exit(2, usage_line(f"unrecognized arguments: {' '.join(extras)}", prog)
                      + "\n")
        return ns


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _float_range(lo: float, hi: float, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value != value or value > hi or value < lo or (lo_open and value == lo):
            bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be in {bound}, got {text}")
        return value

    return parse


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=os.environ.get("FORKVIEW_MODEL", "default"), metavar="SPEC",
        help="'default' (embedded SmolLM2-135M-Instruct), a Hugging Face directory, a hub id, "
        "or a .gguf file (env FORKVIEW_MODEL)",
    )
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    _backend_option(g)


def _backend_option(p: Any) -> None:
    from models.engine import BACKENDS

    p.add_argument("--backend", default=os.environ.get("FORKVIEW_BACKEND", "hf"),
                   choices=BACKENDS,
                   help="engine: hf (transformers, every estimator) or llama.cpp (GGUF files "
                   "on the CPU, the `llama` extra; estimators needing hidden states load "
                   "the same file on transformers) (env FORKVIEW_BACKEND)")


def _explorer_options(p: argparse.ArgumentParser) -> None:
    """What the explorer takes (the bare `forkview` and `forkview serve`): its MI
    estimators, the model and the database."""
    p.add_argument("--mi", default="hsic,answer-gain", metavar="NAMES",
                   help="MI estimators the explorer computes after each generation "
                   "(default hsic,answer-gain; 'none' for none)")
    _model_options(p)
    _db_option(p)


def _trace_model_options(p: argparse.ArgumentParser, help_: str) -> None:
    """--model / --device / --dtype for commands that work on saved traces: the model
    defaults to the one that made each trace (args.trace_model is None then)."""
    p.add_argument("--model", dest="trace_model", default=None, metavar="SPEC", help=help_)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    _backend_option(p)


def _db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="PATH", default=None,
                   help="SQLite database (default: env FORKVIEW_DB or the user data directory)")


def _generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=_positive_int, default=512, metavar="N")
    g.add_argument("--temperature", type=_float_range(0.0, 100.0), default=0.0, metavar="T",
                   help="0 = greedy (default); T > 0 samples")
    g.add_argument("--top-p", type=_float_range(0.0, 1.0, lo_open=True), default=1.0,
                   metavar="P")
    g.add_argument("--top-k", type=_non_negative_int, default=0, metavar="K",
                   help="0 = off")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="sampling seed (a random one is chosen and stored if omitted)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable)")
    g.add_argument("--alternatives", type=_non_negative_int, default=10, metavar="K",
                   help="top-k alternatives recorded per token (default 10)")
    g.add_argument("--raw", action="store_true",
                   help="send the prompt as plain text, without the chat template")
    _template_options(g)


def _template_options(g: Any) -> None:
    """--system / --enable-thinking: what the chat template is given besides the prompt
    (models.prompting.chat_messages, template_kwargs); stored with each trace."""
    g.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message before the prompt (chat template)")
    g.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="pass enable_thinking=true (or false) to the chat template, for "
                   "templates that take it (Qwen3-style); default: not passed")


def _check_template_options(args: argparse.Namespace) -> None:
    if args.raw and args.system is not None:
        raise UsageError("--system needs the chat template (leave out --raw)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        # Subcommand options like `fork --top` must not be read as abbreviations of the
        # explorer's --top-p / --top-k.
        allow_abbrev=False,
        description="Watch a language model reason token by token: entropy per token, "
        "kept in SQLite. Without a command, opens the explorer.",
    )
    from models.types import SAMPLE_TEMPERATURE, forkview_version

    p.add_argument("--version", action="version", version=f"%(prog)s {forkview_version()}")
    _explorer_options(p)
    _generation_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    b = sub.add_parser("browse", help="browse saved traces without loading a model")
    b.add_argument("db_file", nargs="?", metavar="DB", help="database file (default: --db)")
    _db_option(b)

    a = sub.add_parser("annotate", help="generate annotated traces (one prompt, or a prompt "
                       "set in batches) and save them")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompts", metavar="SOURCE", help="a .jsonl, .csv or .parquet file "
                     "(fields prompt, answer, id, set), a Hugging Face dataset (a save_to_disk "
                     "folder or owner/name[:config]; the datasets extra) or builtin:arith: "
                     "every prompt, --samples each, in batches; re-run to finish an "
                     "interrupted batch")
    a.add_argument("--answer", default=None, metavar="REF", help="reference answer")
    a.add_argument("--samples", type=_positive_int, default=1, metavar="N",
                   help="with --prompts: samples per prompt, grown as one batch (seeds derived "
                   "from --seed, default 0; temperature 1 unless given)")
    a.add_argument("--set", dest="set_name", default=None, metavar="NAME",
                   help="with --prompts: store every prompt under this set name")
    a.add_argument("--split", default=None, metavar="NAME",
                   help="with a dataset: its split (default test, else train)")
    a.add_argument("--prompt-field", default=None, metavar="NAME",
                   help="with --prompts: the prompt's field (default prompt, question or "
                   "problem)")
    a.add_argument("--answer-field", default=None, metavar="NAME",
                   help="with --prompts: the reference's field (default answer, else "
                   "solution; GSM8K's '#### 72' and \\boxed{} are split into answer and "
                   "solution)")
    a.add_argument("--id-field", default=None, metavar="NAME",
                   help="with --prompts: the id's field (default id)")
    a.add_argument("--json", action="store_true", help="print the trace as one JSON object "
                   "(with --prompts: one summary object per trace and line)")
    a.add_argument("--mi", default="", metavar="NAMES",
                   help="MI estimators to run right after generation, e.g. hsic,answer-gain")
    _model_options(a)
    _db_option(a)
    _generation_options(a)
    # None = not given: greedy for one trace, T = 1 for several samples of a prompt.
    a.set_defaults(temperature=None)

    e = sub.add_parser("export", help="export per-token rows (with their trace's model, "
                       "prompt, sampling, MI and answer) as JSONL, CSV or Parquet")
    _db_option(e)
    e.add_argument("--trace", type=int, action="append", metavar="ID",
                   help="trace id (repeatable; default: all traces)")
    e.add_argument("--format", choices=["jsonl", "csv", "parquet"], default="jsonl",
                   help="columns as in docs/schema.md, 'Export columns' (default jsonl)")
    e.add_argument("-o", "--output", metavar="FILE",
                   help="write here instead of stdout (required for parquet)")
    e.add_argument("--superseded", action="store_true",
                   help="without --trace: also export superseded traces (stopped copies a "
                   "resumed batch made again)")

    m = sub.add_parser("mi", help="compute an MI estimator on saved traces (resumable)")
    _db_option(m)
    sel = m.add_mutually_exclusive_group(required=True)
    sel.add_argument("--trace", type=int, action="append", metavar="ID", help="repeatable")
    sel.add_argument("--all", action="store_true",
                     help="every finished trace that is not itself a branch or rollout")
    m.add_argument("--estimator", required=True, metavar="NAME",
                   help="hsic, answer-gain or rollout")
    m.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="estimator parameter (repeatable), e.g. bandwidth=median")
    m.add_argument("--positions", default=None, metavar="SPEC",
                   help="all, stratified, categories (see below) or P1,P2,... (default: "
                   "the estimator's own)")
    m.add_argument("--samples", type=_positive_int, default=None, metavar="S",
                   help="continuations per alternative (rollout)")
    m.add_argument("--control", choices=["wrong-reference", "bandwidth"], default=None,
                   help="a run of its own that the report compares with the real one: "
                   "wrong-reference (hsic, answer-gain) scores each trace against another "
                   "prompt's reference; bandwidth (hsic) uses the other bandwidth rule "
                   "(median heuristic, or 50 if the run uses the median)")
    cat = m.add_argument_group(
        "categories", "--positions categories: per trace, K positions each of E only, P only "
        "and E∩P (E: top 20% of the trace's entropy; P: peaks of the latest complete "
        "--peaks-from run) and one matched control (neither; same relative-position bin and "
        "token class) per selected position; the draw is stored with the run")
    cat.add_argument("--per-category", type=_positive_int, default=None, metavar="K",
                     help="positions per category and trace (default 5)")
    cat.add_argument("--peaks-from", default=None, metavar="NAME",
                     help="estimator whose stored run gives the MI peaks P, e.g. hsic")
    cat.add_argument("--peak-rule", choices=["tukey", "topk", "topr"], default=None,
                     help="peak rule (default tukey)")
    cat.add_argument("--peak-param", type=float, default=None, metavar="X",
                     help="the rule's parameter (tukey tau 1.5, topk k 20, topr rho 0.2)")
    cat.add_argument("--seed", dest="draw_seed", type=int, default=None, metavar="S",
                     help="seed of the draw (default 0)")
    m.add_argument("--budget-tokens", type=_positive_int, default=None, metavar="N",
                   help="rollout: cap on the continuation tokens of the whole command; it "
                   "stops cleanly before a position whose worst case would pass N (re-run "
                   "to continue)")
    _trace_model_options(m, "model to use (default: the model that made each trace)")

    f = sub.add_parser("fork", help="grow branches from a position of a saved trace")
    _db_option(f)
    f.add_argument("--trace", type=int, required=True, metavar="ID")
    f.add_argument("--position", type=int, required=True, metavar="P",
                   help="position as in 'annotate --json' (0 = first generated token); the "
                   "branch's token(s) replace the token there")
    what = f.add_mutually_exclusive_group(required=True)
    what.add_argument("--token", metavar="TEXT",
                      help="force this text (one or more tokens) at P, then generate")
    what.add_argument("--top", type=_positive_int, metavar="K",
                      help="one branch per recorded alternative: the K most likely tokens "
                      "other than the one the trace took")
    what.add_argument("--sample", type=_positive_int, metavar="N",
                      help=f"N continuations sampled in one batch (default temperature "
                      f"{SAMPLE_TEMPERATURE:g} when the trace was greedy)")
    f.add_argument("--keep-token", action="store_true",
                   help="with --sample: keep the trace's token at P (default: draw it anew)")
    f.add_argument("--max-new-tokens", type=_positive_int, default=None, metavar="N",
                   help="tokens generated after the forced ones (default: the trace's)")
    f.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of the first branch (branch i gets S + i; default: random)")
    f.add_argument("--temperature", type=_float_range(0.0, 100.0), default=None, metavar="T",
                   help="default: the trace's (1 for --sample from a greedy trace)")
    f.add_argument("--json", action="store_true",
                   help="one JSON object per branch and line, as 'annotate --json' plus "
                   "parent_trace_id, fork_position and forced_token_ids")
    _trace_model_options(f, "default: the model that made the trace (another model must "
                         "have the same tokenizer)")

    tr = sub.add_parser("tree", help="show a trace's family: root, branches, rollouts")
    _db_option(tr)
    tr.add_argument("--trace", type=int, required=True, metavar="ID",
                    help="any member of the family")
    tr.add_argument("--json", action="store_true", help="nested JSON")
    tr.add_argument("--rollouts", action="store_true",
                    help="list rollout continuations one by one (default: summarised)")

    rp = sub.add_parser("replay", help="regenerate a trace from its stored provenance and "
                        "check it matches token for token")
    _db_option(rp)
    rp.add_argument("--trace", type=int, required=True, metavar="ID")
    rp.add_argument("--json", action="store_true")
    _trace_model_options(rp, "default: the model that made the trace")

    t = sub.add_parser("traces", help="list saved traces, newest first")
    _db_option(t)
    t.add_argument("--json", action="store_true", help="print a JSON list")
    t.add_argument("--search", default=None, help="only traces whose prompt or text contains this")
    t.add_argument("--model", dest="model_filter", default=None,
                   help="only traces whose model name or spec contains this")
    t.add_argument("--limit", type=_positive_int, default=None)
    t.add_argument("--branches", action="store_true",
                   help="also list branches and rollout continuations (traces with a parent)")
    t.add_argument("--superseded", action="store_true",
                   help="also list superseded traces (stopped copies a resumed batch made "
                   "again; not counted by reports)")

    rs = sub.add_parser("rescore", help="score saved traces' tokens with a second model "
                        "(same tokenizer) and keep its entropy beside the original")
    _db_option(rs)
    which = rs.add_mutually_exclusive_group(required=True)
    which.add_argument("--trace", type=int, action="append", metavar="ID", help="repeatable")
    which.add_argument("--set", dest="set_name", metavar="NAME",
                       help="the root traces of this prompt set")
    which.add_argument("--all", action="store_true", help="every root trace")
    rs.add_argument("--mi", default="", metavar="NAMES",
                    help="also run these MI estimators with the second model (roots only)")
    rs.add_argument("--json", action="store_true", help="one JSON object per trace and line")
    _model_options(rs)
    rs.set_defaults(model=None)  # the second model is always named

    im = sub.add_parser("import", help="score traces generated elsewhere (JSONL or Parquet: "
                        "prompt or messages, response text or token ids) teacher-forced and "
                        "store them (origin import)")
    im.add_argument("file", metavar="FILE", help="a .jsonl or .parquet file, one trace per "
                    "line or row")
    im.add_argument("--prompt-field", default=None, metavar="NAME",
                    help="the prompt's field: text or a chat list (default prompt, question, "
                    "problem or messages)")
    im.add_argument("--response-field", default=None, metavar="NAME",
                    help="the response's field: text or a list of token ids (default "
                    "response_ids, token_ids, response or completion)")
    im.add_argument("--answer-field", default=None, metavar="NAME",
                    help="the reference's field (default answer, else solution)")
    im.add_argument("--id-field", default=None, metavar="NAME",
                    help="the prompt id's field (default id)")
    im.add_argument("--set", dest="set_name", default=None, metavar="NAME",
                    help="store every prompt under this set name (default: the row's set, "
                    "else the file's stem)")
    im.add_argument("--raw", action="store_true",
                    help="encode text prompts without the chat template")
    _template_options(im)
    im.add_argument("--batch", type=_positive_int, default=8, metavar="N",
                    help="traces per forward pass (default 8)")
    im.add_argument("--alternatives", type=_non_negative_int, default=10, metavar="K",
                    help="top-k alternatives recorded per token (default 10)")
    im.add_argument("--mi", default="", metavar="NAMES",
                    help="MI estimators to run on the imported traces, e.g. hsic,answer-gain")
    _model_options(im)
    _db_option(im)

    mg = sub.add_parser("merge", help="merge databases (from several machines) into one, "
                        "without duplicating a trace")
    mg.add_argument("out", metavar="OUT.db", help="database to merge into (created if missing)")
    mg.add_argument("inputs", nargs="+", metavar="IN.db", help="databases to read (never changed)")
    rep = sub.add_parser("report", help="overlap report: high-entropy tokens against MI "
                         "peaks per model x estimator (md, html, json, csv)")
    _db_option(rep)
    from forkview.report_cmd import add_arguments as _report_arguments  # argparse only

    _report_arguments(rep)

    fg = sub.add_parser("figure", help="one trace as an SVG figure, its tokens coloured as "
                        "in the explorer (by entropy, or by an MI estimator)")
    _db_option(fg)
    fg.add_argument("--trace", type=int, required=True, metavar="ID")
    fg.add_argument("--by", choices=["entropy", "mi"], default="entropy",
                    help="colour by entropy (absolute scale, nats; default) or by the "
                    "latest complete MI run of --estimator (per-trace scale, peaks marked)")
    fg.add_argument("--estimator", default=None, metavar="NAME",
                    help="with --by mi: the estimator (default: the trace's only one)")
    fg.add_argument("--width", type=_int_at_least(40), default=100, metavar="COLS",
                    help="text width in columns (default 100)")
    fg.add_argument("--theme", choices=["light", "dark"], default="light",
                    help="background (default light)")
    fg.add_argument("-o", "--output", metavar="FILE.svg",
                    help="write here instead of stdout")

    sv = sub.add_parser("serve", help="serve the explorer (or the browser) in a web browser; "
                        "for SSH: ssh -L 8000:127.0.0.1:8000 HOST, then open "
                        "http://127.0.0.1:8000", allow_abbrev=False)
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; there "
                    "is no login, so anyone who can reach another address can use it)")
    sv.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    sv.add_argument("--public-url", default=None, metavar="URL",
                    help="the address the web browser uses, when it is not http://HOST:PORT "
                    "(e.g. a tunnel to another local port)")
    sv.add_argument("--browse", action="store_true",
                    help="serve 'forkview browse' (saved traces, no model) instead of the "
                    "explorer")
    _explorer_options(sv)
    _generation_options(sv)

    co = sub.add_parser("completion", help="print a shell completion script, e.g. "
                        "eval \"$(forkview completion bash)\"")
    co.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    sub.add_parser("db-path", help="print the default database path (env FORKVIEW_DB, else "
                   "forkview.db in the user data directory)")
    return p


def _port(text: str) -> int:
    port = _positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {port}")
    return port


def _params(args: argparse.Namespace) -> GenerationParams:
    from models.types import GenerationParams

    _check_template_options(args)
    return GenerationParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        top_alternatives=args.alternatives,
        raw=args.raw,
        system=args.system,
        enable_thinking=args.enable_thinking,
    )


def _status(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, _frame: Any) -> None:
    # SIGTERM / SIGHUP (the SSH session or window closing) take the same path as
    # Ctrl-C, so the trace is closed as `stopped` with every token so far. During a
    # database write the interrupt waits for the write to end (store.db.write_section).
    from store.db import interrupt_or_defer

    interrupt_or_defer()


# ---------------------------------------------------------------------- commands
def cmd_annotate(args: argparse.Namespace) -> int:
    from store import Store

    if args.prompts is not None:
        return cmd_annotate_batch(args)
    for flag, value in (("--samples", args.samples != 1), ("--set", args.set_name),
                        ("--split", args.split), ("--prompt-field", args.prompt_field),
                        ("--answer-field", args.answer_field), ("--id-field", args.id_field)):
        if value:
            raise UsageError(f"{flag} goes with --prompts")
    if args.temperature is None:
        args.temperature = 0.0
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    params = _params(args)
    estimators = _estimators([n for n in args.mi.split(",") if n.strip()], [])
    store = Store.open(args.db)  # fail on a bad database before spending time on the model
    from forkview.pipeline import annotate_prompt
    from models.engine import load as load_model

    quiet = args.json or not sys.stderr.isatty()
    lm = load_model(args.model, args.device, args.dtype, args.backend,
                    status=None if quiet else _status)
    started: list[int] = []
    show = _token_printer() if not quiet else None
    try:
        result = annotate_prompt(
            lm, store, args.prompt, params, answer=args.answer,
            on_start=lambda r: started.append(r.trace_id),
            on_step=show,
        )
    except KeyboardInterrupt:
        if started:
            info = store.trace(started[0])
            _status(f"interrupted: trace {info.id} kept with {info.n_tokens} tokens (stopped)")
            if not args.json:
                print(info.id)
        return 130
    if show is not None:
        print(file=sys.stderr)
    mi: dict[str, dict[int, float | None]] = {}
    failed = False
    if estimators:
        from forkview.mi import jobs_for, run_many

        def outcome(o: Any) -> None:
            if o.status in ("skipped", "failed"):
                _status(o.line)

        runs = run_many(lm, store, jobs_for([result.trace_id], estimators), own_model=True,
                        on_run=None if quiet else
                        lambda job, _step, _steps: _status(f"computing {job.estimator.name}..."),
                        on_outcome=outcome)
        failed = bool(runs.count("failed"))
        mi = store.latest_mi(result.trace_id)
    if args.json:
        info = store.trace(result.trace_id)
        out = {
            "trace_id": result.trace_id,
            "model": lm.name,
            "model_spec": lm.spec,
            "device": lm.device,
            "dtype": lm.dtype,
            "prompt": args.prompt,
            "reference_answer": args.answer,
            "prompt_token_ids": result.prompt_ids,
            "params": result.params.to_json(),
            "status": info.status,
            "stop_reason": info.stop_reason,
            "text": result.text,
            "answer": info.answer,
            "correct": info.correct,
            "tokens": [_with_mi(s.to_json(), mi) for s in result.steps],
        }
        json.dump(out, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(result.trace_id)
    return 1 if failed else 0


def cmd_annotate_batch(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from forkview import batch
    from forkview.prompt_sets import Fields, load_records
    from store import Store

    if args.answer is not None:
        raise UsageError("--answer goes with --prompt (a prompt file carries its answers)")
    try:
        fields = Fields(args.prompt_field, args.answer_field, args.id_field)
        items = batch.with_set(load_records(args.prompts, fields, args.split), args.set_name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.temperature is None:
        from models.types import SAMPLE_TEMPERATURE

        args.temperature = SAMPLE_TEMPERATURE if args.samples > 1 else 0.0
    params = _params(args)
    from models.errors import ModelError

    try:
        batch.plan_jobs(items[:1], args.samples, params)  # refuses greedy copies up front
    except ModelError as e:
        raise UsageError(str(e)) from None
    estimators = _estimators([n for n in args.mi.split(",") if n.strip()], [])
    store = Store.open(args.db)
    from models.engine import load as load_model

    quiet = args.json or not sys.stderr.isatty()
    lm = load_model(args.model, args.device, args.dtype, args.backend,
                    status=None if quiet else _status)
    try:
        summary = batch.run_batch(lm, store, items, params, samples=args.samples,
                                  estimators=estimators,
                                  progress=None if quiet else batch.RichBatchProgress())
    finally:
        store.close()  # callers in the same process (sample_db/build.py) reuse the file
    for job in summary.jobs:
        if job.trace_id is None:
            continue
        if args.json:
            print(json.dumps(asdict(job), ensure_ascii=False))
        else:
            print(job.trace_id)
    for line in summary.mi_not_run:
        _status(line)
    stopped = f", {summary.stopped} of them stopped" if summary.stopped else ""
    replaced = (f"; {summary.superseded} stopped cop{'ies' if summary.superseded != 1 else 'y'}"
                " marked superseded" if summary.superseded else "")
    _status(f"{len(items)} prompts x {args.samples}: {summary.generated} traces generated "
            f"({summary.tokens} tokens in {summary.seconds:.1f} s{stopped}), "
            f"{summary.skipped} already complete{replaced}; "
            f"MI runs: {summary.mi_runs} computed, "
            f"{summary.mi_skipped} already complete"
            + (f", {len(summary.mi_not_run)} not run" if summary.mi_not_run else "")
            + ("; interrupted: re-run the same command to finish"
               if summary.interrupted else ""))
    return 130 if summary.interrupted else 0


def _with_mi(token: dict[str, Any], mi: dict[str, dict[int, float | None]]) -> dict[str, Any]:
    if mi:
        token["mi"] = {name: values.get(token["position"]) for name, values in mi.items()}
    return token


def _estimators(names: Sequence[str], params: Sequence[str]) -> list[Any]:
    """Estimator objects, validated before any model is loaded."""
    from models.estimators import get_estimator, parse_params

    out = []
    for name in names:
        name = name.strip()
        out.append(get_estimator(name, parse_params(name, params)))
    return out


def cmd_mi(args: argparse.Namespace) -> int:
    from forkview.mi import resolve_positions, trace_data
    from store import Store

    categories = args.positions == "categories"
    if not categories:
        for flag, value in (("--per-category", args.per_category),
                            ("--peaks-from", args.peaks_from), ("--peak-rule", args.peak_rule),
                            ("--peak-param", args.peak_param), ("--seed", args.draw_seed)):
            if value is not None:
                raise UsageError(f"{flag} is only for --positions categories")
    elif args.peaks_from is None:
        raise UsageError("--positions categories needs --peaks-from NAME (the estimator "
                         "whose stored run gives the MI peaks, e.g. hsic)")
    params = list(args.param)
    if args.samples is not None:
        params.append(f"samples={args.samples}")
    (est,) = _estimators([args.estimator], params)
    if args.control == "wrong-reference" and "reference" not in est.needs:
        raise UsageError(f"--control {args.control} needs a reference-based estimator "
                         f"(hsic, answer-gain), not {est.name}")
    if args.control == "bandwidth" and est.name != "hsic":
        raise UsageError(f"--control bandwidth is for hsic, not {est.name}")
    if args.budget_tokens is not None and est.name != "rollout":
        raise UsageError(f"--budget-tokens is for the rollout estimator, not {est.name}")
    rule = None
    if categories:
        rule = _category_rule(args, est.name)
    # Everything is checked on a read-only open first: a bad trace id or position
    # leaves the file untouched (a writing open switches it to WAL mode).
    store = Store.open(args.db, readonly=True)
    infos = ([store.trace(t) for t in args.trace] if args.trace
             else [t for t in reversed(store.list_traces(roots_only=True))
                   if t.status != "running"])
    if not infos:
        raise UsageError("no traces to annotate")
    draws: dict[int, Any] = {}
    for info in infos:  # every position spec is checked before any model is loaded
        data = trace_data(store, info.id)
        if not categories:
            resolve_positions(args.positions, est.default_positions, data.entropies)
            continue
        from forkview.analysis.categories import draw_for_trace

        draw = draw_for_trace(store, info.id, args.peaks_from,
                              per_category=args.per_category or 5,
                              seed=args.draw_seed or 0, rule=rule)
        if draw is None:
            print(f"{PROG}: trace {info.id}: no complete {args.peaks_from} run (control "
                  f"runs are not used; run 'forkview mi --estimator {args.peaks_from}' "
                  "first), skipped", file=sys.stderr)
        elif not draw.positions:
            print(f"{PROG}: trace {info.id}: no position in any category, skipped",
                  file=sys.stderr)
        else:
            draws[info.id] = draw
    from forkview.mi import MIJob, cannot_run

    jobs = []
    for info in infos:
        draw = draws.get(info.id)
        if categories and draw is None:
            continue
        job = MIJob(info.id, est, args.positions)
        if draw is not None:
            job = MIJob(info.id, est, draw.positions,
                        extra_params={"categories": draw.params()},
                        position_details={p: {"category": c}
                                          for p, c in draw.categories.items()})
        why = cannot_run(store, job, control=args.control)
        if why is not None:  # said before any model is loaded; the others go on
            print(f"{PROG}: trace {info.id}: {est.name} cannot run: {why}; skipped",
                  file=sys.stderr)
            continue
        jobs.append(job)
    if not jobs:
        store.close()
        return 1
    # Traces whose run is already complete need no model: with nothing left to compute
    # the command returns at once, without importing torch.
    if args.trace_model is None:
        from forkview.mi import already_done

        todo = [job for job in jobs if not already_done(
            store, job.trace_id, est, job.positions, control=args.control,
            extra_params=job.extra_params)]
        if len(todo) < len(jobs):
            print(f"{PROG}: {len(jobs) - len(todo)} of {len(jobs)} trace(s) already have "
                  f"a complete {est.name} run with these parameters"
                  + ("; nothing left to compute" if not todo else ""), file=sys.stderr)
        jobs = todo
    spec_of = {job.trace_id: args.trace_model or store.trace(job.trace_id).model_spec
               for job in jobs}
    store.close()
    if not jobs:
        return 0
    from forkview.mi import run_many
    from models.engine import load as load_model

    budget = None
    if args.budget_tokens is not None:
        from models.rollout import TokenBudget

        budget = TokenBudget(args.budget_tokens)
    store = Store.open(args.db)
    by_spec: dict[str, list[Any]] = {}
    for job in jobs:
        by_spec.setdefault(spec_of[job.trace_id], []).append(job)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    failed = 0
    with Progress("[progress.description]{task.description}", BarColumn(),
                  MofNCompleteColumn(), TimeRemainingColumn(), transient=False,
                  console=_stderr_console()) as bar:
        tasks: dict[int, Any] = {}

        def started(job: Any, _step: int, _steps: int) -> None:
            tasks[job.trace_id] = bar.add_task(f"trace {job.trace_id} {est.name}", total=None)

        def progressed(job: Any, done: int, total: int) -> None:
            bar.update(tasks[job.trace_id], completed=done, total=total)

        def ended(o: Any) -> None:
            if o.summary is not None:
                bar.update(tasks[o.job.trace_id], description=f"trace {o.job.trace_id} "
                           f"{est.name} run {o.summary.run_id} {o.summary.status}")
            elif o.status != "done":
                bar.console.print(f"{PROG}: {o.line}", markup=False, highlight=False,
                                  soft_wrap=True)

        for spec, group in by_spec.items():
            if budget is not None and budget.exhausted:
                break
            lm = load_model(spec, args.device, args.dtype, args.backend)
            runs = run_many(lm, store, group, control=args.control, budget=budget,
                            on_run=started, on_progress=progressed, on_outcome=ended)
            failed += runs.count("failed")
    if budget is not None and budget.exhausted:
        print(f"{PROG}: token budget reached: {budget.positions} positions done, "
              f"{budget.spent:,} of {budget.limit:,} continuation tokens spent; stopped "
              "(run the same command again to continue)", file=sys.stderr)
    return 1 if failed else 0


def _category_rule(args: argparse.Namespace, estimator: str) -> Any:
    """The peak rule of `--positions categories`, its flags checked."""
    from forkview.analysis.categories import peak_rule
    from models.estimators import REGISTRY

    if args.peaks_from not in REGISTRY:
        raise UsageError(f"--peaks-from: unknown estimator '{args.peaks_from}' "
                         f"(known: {', '.join(sorted(REGISTRY))})")
    if args.peaks_from == estimator:
        raise UsageError("--peaks-from must name another estimator than --estimator")
    rule = peak_rule(args.peak_rule or "tukey", args.peak_param)
    if rule.name == "tukey" and not rule.param >= 0:
        raise UsageError(f"--peak-param: tukey's tau must be >= 0, got {rule.param:g}")
    if rule.name == "topk" and not (rule.param >= 1 and rule.param == int(rule.param)):
        raise UsageError(f"--peak-param: topk's k must be a whole number >= 1, "
                         f"got {rule.param:g}")
    if rule.name == "topr" and not 0 < rule.param <= 1:
        raise UsageError(f"--peak-param: topr's rho must be in (0, 1], got {rule.param:g}")
    return rule


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _token_printer():
    """Stream tokens to stderr coloured by entropy, for a person watching a terminal."""
    from rich.console import Console
    from rich.text import Text

    from forkview.ui.scale import entropy_style

    console = Console(stderr=True, highlight=False)

    def show(step: Any) -> None:
        console.print(Text(step.text, style=entropy_style(step.entropy)), end="")

    return show


def cmd_export(args: argparse.Namespace) -> int:
    import contextlib
    import csv

    from store import Store
    from store.db import export_columns, iter_export_rows

    if args.format == "parquet" and not args.output:
        raise UsageError("--format parquet needs -o FILE (Parquet is not written to stdout)")
    store = Store.open(args.db, readonly=True)
    for tid in args.trace or ():
        store.trace(tid)  # every id is checked before anything is written
    columns = export_columns(store, args.trace, superseded=args.superseded)
    rows = iter_export_rows(store, args.trace, superseded=args.superseded, columns=columns)
    if args.format == "parquet":
        return _export_parquet(rows, columns, args.output)
    target = (
        open(args.output, "w", newline="", encoding="utf-8")  # noqa: SIM115 (with below)
        if args.output
        else contextlib.nullcontext(sys.stdout)
    )
    with target as out:
        if args.format == "jsonl":
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            w = csv.DictWriter(out, fieldnames=columns)
            w.writeheader()
            for row in rows:
                row["top"] = json.dumps(row["top"], ensure_ascii=False)
                w.writerow(row)
    return 0


def _export_parquet(rows: Any, columns: list[str], output: str,
                    batch_rows: int = 50_000) -> int:
    """cmd_export's Parquet: record batches of `batch_rows`, written to FILE.partial and
    renamed when complete (an interrupted export leaves no half file under FILE)."""
    import contextlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from store.db import EXPORT_COLUMNS

    kinds = {
        "text": pa.string(), "integer": pa.int64(), "real": pa.float64(),
        "boolean": pa.bool_(),
        "list": pa.list_(pa.struct([("token_id", pa.int64()), ("text", pa.string()),
                                    ("prob", pa.float64())])),
    }
    schema = pa.schema([(c, kinds[EXPORT_COLUMNS.get(c, "real")]) for c in columns])
    partial = f"{output}.partial"
    try:
        with pq.ParquetWriter(partial, schema) as w:
            batch: list[dict[str, Any]] = []
            for row in rows:
                batch.append(row)
                if len(batch) >= batch_rows:
                    w.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                    batch = []
            if batch:
                w.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
        os.replace(partial, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
    return 0


def cmd_traces(args: argparse.Namespace) -> int:
    from store import Store

    store = Store.open(args.db, readonly=True)
    infos = store.list_traces(search=args.search, model=args.model_filter, limit=args.limit,
                              roots_only=not args.branches, superseded=args.superseded)
    if args.json:
        out = [
            {
                "trace_id": t.id, "uid": t.uid, "status": t.status, "stop_reason": t.stop_reason,
                "model": t.model_name, "model_spec": t.model_spec, "prompt": t.prompt,
                "reference_answer": t.reference_answer, "answer": t.answer,
                "correct": t.correct, "n_tokens": t.n_tokens, "text": t.text,
                "started_at": t.started_at, "finished_at": t.finished_at,
                "tokens_per_second": t.tokens_per_second,
                "parent_trace_id": t.parent_trace_id, "fork_position": t.fork_position,
                "origin": t.origin, "forced_token_ids": t.forced_token_ids,
                "params": t.params.to_json(),
                **({"superseded_by": store.superseded_by(t.id)}
                   if t.status == "superseded" else {}),
            }
            for t in infos
        ]
        json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
        sys.stdout.write("\n")
        return 0
    if not infos:
        print("no traces", file=sys.stderr)
        return 0
    sw = max(8, *(len(t.status) for t in infos))  # "superseded" is 10 wide
    print(f"{'id':>5}  {'status':<{sw}}  {'tokens':>6}  {'started (UTC)':<19}  {'model':<28}  "
          "prompt")
    for t in infos:
        prompt = " ".join(t.prompt.split())
        print(f"{t.id:>5}  {t.status:<{sw}}  {t.n_tokens:>6}  "
              f"{t.started_at[:19].replace('T', ' ')}  {t.model_name[:28]:<28}  {prompt[:60]}")
    return 0


def _branch_json(store: Any, trace_id: int, lm: Any) -> dict[str, Any]:
    info = store.trace(trace_id)
    steps = store.tokens(trace_id)
    head = "".join(s.text for s in store.full_tokens(trace_id)[: info.fork_position or 0])
    return {
        "trace_id": info.id, "uid": info.uid, "model": lm.name, "model_spec": lm.spec,
        "device": lm.device, "dtype": lm.dtype, "prompt": info.prompt,
        "reference_answer": info.reference_answer, "prompt_token_ids": info.prompt_token_ids,
        "params": info.params.to_json(), "status": info.status,
        "stop_reason": info.stop_reason, "parent_trace_id": info.parent_trace_id,
        "fork_position": info.fork_position, "forced_token_ids": info.forced_token_ids,
        "origin": info.origin, "text": info.text, "full_text": head + info.text,
        "answer": info.answer, "correct": info.correct,
        "tokens": [s.to_json() for s in steps],
    }


def cmd_fork(args: argparse.Namespace) -> int:
    from forkview import forks
    from models.answers import is_cut_off
    from store import Store

    if args.keep_token and args.sample is None:
        raise UsageError("--keep-token goes with --sample")
    if args.token is not None and not args.token:
        raise UsageError("the forced text (--token) is empty")
    # Check the request on a read-only open: a bad id or position changes nothing.
    store = Store.open(args.db, readonly=True)
    source = forks.load_source(store, args.trace)
    forks.check_position(source, args.position)
    store.close()
    from models.engine import load as load_model

    quiet = args.json or not sys.stderr.isatty()
    lm = load_model(args.trace_model or source.info.model_spec, args.device, args.dtype,
                    args.backend, status=None if quiet else _status)
    store = Store.open(args.db)
    forks.check_tokenizer(store, source, lm)
    params = forks.branch_params(source, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                 temperature=args.temperature, sampling=args.sample is not None)
    if args.token is not None:
        plan = [forks.PlannedBranch(forks.encode_text(lm, args.token), params, "fork",
                                    repr(args.token))]
    elif args.top is not None:
        plan = forks.plan_alternatives(source, args.position, args.top, params)
    else:
        plan = forks.plan_samples(source, args.position, args.sample, args.keep_token, params)
    started: list[int] = []
    counts = [0] * len(plan)

    def progress(row: int, _step: Any) -> None:
        counts[row] += 1
        if not quiet and sum(counts) % 32 == 0:
            _status(f"{sum(counts)} tokens over {len(plan)} branch(es)...")

    if not quiet:
        _status(f"growing {len(plan)} branch(es) of trace {source.info.id} at position "
                f"{args.position}")
    try:
        results = forks.grow(lm, store, source, args.position, plan,
                             on_start=lambda _r, tid: started.append(tid), on_step=progress)
    except KeyboardInterrupt:
        if started:
            _status(f"interrupted: branches {', '.join(map(str, started))} kept (stopped)")
        return 130
    for b, r in zip(plan, results, strict=True):
        if args.json:
            json.dump(_branch_json(store, r.trace_id, lm), sys.stdout, ensure_ascii=False)
            sys.stdout.write("\n")
        else:
            print(r.trace_id)
            if not quiet:
                mark = {True: "correct", False: "wrong", None: "-"}[r.correct]
                if r.answer is None and is_cut_off(r.output.stop_reason):
                    mark = "cut off"
                _status(f"  branch {r.trace_id}: {b.label}, {len(r.output.steps)} tokens, "
                        f"{r.output.stop_reason}, answer {r.answer!r} ({mark})")
    return 0


def _tree_lines(node: dict[str, Any], show_rollouts: bool, prefix: str = "",
                last: bool = True, top: bool = True) -> list[str]:
    from models.answers import is_cut_off

    mark = {True: "✓", False: "✗", None: ""}[node["correct"]]
    answer = f"answer {node['answer']!r}{mark}" if node["answer"] is not None else "no answer"
    if node["answer"] is None and is_cut_off(node.get("stop_reason")):
        answer = "no answer (cut off)"  # models.answers.accept_answer: never scored
    if top:
        head = f"#{node['trace_id']} {node['origin']} {node['status']}"
    else:
        forced = node["forced_token_ids"]
        how = ("resampled" if forced == [] else f"forced {len(forced or [])} token(s)")
        head = f"@{node['fork_position']} #{node['trace_id']} {node['origin']} ({how}) " \
               f"{node['status']}"
    text = " ".join(node["text"].split())
    line = f"{head}  {node['n_tokens']} tok  {answer}  {text[:40]!r}"
    out = [line if top else prefix + ("└─ " if last else "├─ ") + line]
    child_prefix = "" if top else prefix + ("   " if last else "│  ")
    kids = node["children"]
    rollouts = [k for k in kids if k["origin"] == "rollout"]
    shown = kids if show_rollouts else [k for k in kids if k["origin"] != "rollout"]
    extra = []
    if rollouts and not show_rollouts:
        positions = sorted({k["fork_position"] for k in rollouts})
        answers: dict[Any, int] = {}
        for k in rollouts:
            answers[k["answer"]] = answers.get(k["answer"], 0) + 1
        common = ", ".join(f"{a!r}×{n}" for a, n in
                           sorted(answers.items(), key=lambda kv: -kv[1])[:4])
        extra.append(f"{len(rollouts)} rollout continuations at {len(positions)} positions "
                     f"(answers {common}; --rollouts lists them)")
    for i, k in enumerate(shown):
        is_last = i == len(shown) - 1 and not extra
        out += _tree_lines(k, show_rollouts, child_prefix, is_last, top=False)
    for line in extra:
        out.append(child_prefix + "└─ " + line)
    return out


def cmd_tree(args: argparse.Namespace) -> int:
    from forkview.forks import family_tree
    from store import Store

    store = Store.open(args.db, readonly=True)
    tree = family_tree(store, args.trace)
    if args.json:
        json.dump(tree, sys.stdout, ensure_ascii=False, indent=1)
        sys.stdout.write("\n")
        return 0
    print("\n".join(_tree_lines(tree, args.rollouts)))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from forkview import forks
    from store import Store

    store = Store.open(args.db, readonly=True)
    info = store.trace(args.trace)
    forks.check_replayable(info)
    from models.engine import load as load_model

    quiet = args.json or not sys.stderr.isatty()
    lm = load_model(args.trace_model or info.model_spec, args.device, args.dtype,
                    args.backend, status=None if quiet else _status)
    result = forks.replay(lm, store, args.trace)
    if args.json:
        out = {k: getattr(result, k) for k in (
            "trace_id", "matches", "compared", "first_mismatch", "max_logprob_diff", "note",
            "stored_ids", "replayed_ids")}
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    elif result.matches:
        print(f"trace {args.trace} replays token for token ({result.compared} tokens; max "
              f"|logprob difference| {result.max_logprob_diff:.2g} nats)"
              + (f"; {result.note}" if result.note else ""))
    else:
        pos = result.first_mismatch
        i = pos - (info.fork_position or 0)
        got = result.replayed_ids[i] if i < len(result.replayed_ids) else None
        want = result.stored_ids[i] if i < len(result.stored_ids) else None
        print(f"trace {args.trace} differs at position {pos}: stored token id {want}, "
              f"replayed {got} ({result.compared} tokens matched before)")
    return 0 if result.matches else 1


def cmd_rescore(args: argparse.Namespace) -> int:
    from forkview import rescore
    from store import Store

    if not args.model:
        raise UsageError("rescore needs --model SPEC: the second model")
    estimators = _estimators([n for n in args.mi.split(",") if n.strip()], [])
    # Checked on a read-only open: a bad id or set leaves the file untouched.
    store = Store.open(args.db, readonly=True)
    infos = rescore.select_traces(store, trace_ids=args.trace or (), set_name=args.set_name,
                                  all_traces=args.all)
    if not infos:
        raise UsageError("no traces to rescore")
    store.close()
    from models.engine import load as load_model

    quiet = args.json or not sys.stderr.isatty()
    lm = load_model(args.model, args.device, args.dtype, args.backend,
                    status=None if quiet else _status)
    store = Store.open(args.db)
    infos = [store.trace(t.id) for t in infos]
    rescore.check_tokenizers(store, infos, lm)

    def show(r: Any) -> None:
        if args.json:
            print(json.dumps(vars(r)), flush=True)
        elif not quiet or r.note:
            _status(f"trace {r.trace_id}: {r.status}"
                    + (f", {r.n_scored} tokens" if r.n_scored else "")
                    + (f" ({r.note})" if r.note else ""))

    def show_mi(tid: int, name: str, status: str) -> None:
        if not quiet:
            _status(f"trace {tid} {name}: {status}")

    results = rescore.rescore(lm, store, infos, estimators=estimators, on_trace=show,
                              on_mi=show_mi)
    counts = {k: sum(r.status == k for r in results) for k in ("scored", "skipped", "own")}
    _status(f"{lm.name}: {counts['scored']} traces scored, {counts['skipped']} already "
            f"scored, {counts['own']} made by this model")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from forkview import importer
    from forkview.text import counted
    from store import Store

    estimators = _estimators([n for n in args.mi.split(",") if n.strip()], [])
    _check_template_options(args)
    try:
        path = importer.check_source(args.file)
    except ValueError as e:
        raise UsageError(str(e)) from None
    store = Store.open(args.db)  # a bad database fails before the model loads
    from models.engine import load as load_model

    quiet = not sys.stderr.isatty()
    lm = load_model(args.model, args.device, args.dtype, args.backend,
                    status=None if quiet else _status)
    fields = importer.ImportFields(args.prompt_field, args.response_field, args.answer_field,
                                   args.id_field)

    def skipped(s: Any) -> None:
        _status(f"{s.where}: {s.reason}; skipped")

    def imported(tid: int, _item: Any) -> None:
        print(tid, flush=True)

    def mi_done(tid: int, name: str, status: str) -> None:
        if not quiet or status not in ("complete", "stopped"):
            _status(f"trace {tid} {name}: {status}")

    summary = importer.import_file(
        lm, store, path, fields=fields, set_name=args.set_name, raw=args.raw,
        system=args.system, enable_thinking=args.enable_thinking,
        batch=args.batch, alternatives=args.alternatives, estimators=estimators,
        on_skip=skipped, on_trace=imported, on_mi=mi_done)
    dup = f", {summary.duplicates} of them already imported" if summary.duplicates else ""
    mi = (f"; MI runs: {summary.mi_runs} computed"
          + (f", {summary.mi_failed} failed" if summary.mi_failed else "")
          if estimators else "")
    _status(f"{path}: {counted(len(summary.imported), 'trace')} imported "
            f"({counted(summary.tokens, 'token')}), {len(summary.skipped)} skipped{dup}{mi}"
            + ("; interrupted" if summary.interrupted else ""))
    if summary.interrupted:
        return 130
    return 0 if summary.imported else 1


def cmd_merge(args: argparse.Namespace) -> int:
    from store.merge import merge

    def show(s: Any) -> None:
        what = (f"+{s.traces_added} traces ({s.traces_present} already there), "
                f"+{s.tokens_added} tokens, +{s.mi_runs_added} MI runs "
                f"(+{s.mi_values_added} values), +{s.token_scores_added} token scores, "
                f"+{s.models_added} models, +{s.prompts_added} prompts"
                if s.added_anything else f"nothing new ({s.traces_present} traces already there)")
        print(f"{s.file}: {what}")

    merge(args.out, args.inputs, on_file=show)
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from store import Store

    db = args.db_file or args.db
    Store.open(db, readonly=True).close()
    from forkview.app import create_app

    return _run_tui(create_app(db_path=db, browse_only=True))


def cmd_explore(args: argparse.Namespace) -> int:
    from store import Store
    from store.db import default_db_path

    Store.open(args.db).close()
    from models.loading import resolve_spec

    resolve_spec(args.model)  # a path that doesn't exist fails here, before the TUI opens
    from models.engine import check_backend

    check_backend(args.backend)  # likewise the llama.cpp extra when it is missing
    names = [] if args.mi.strip() in ("", "none") else args.mi.split(",")
    mi_names = [e.name for e in _estimators(names, [])]  # unknown names fail here too
    from forkview.app import create_app

    app = create_app(
        db_path=args.db or default_db_path(), model_spec=args.model, device=args.device,
        dtype=args.dtype, backend=args.backend, params=_params(args), mi_estimators=mi_names,
    )
    return _run_tui(app)


def _run_tui(app: Any) -> int:
    """Run the explorer or the browser until it quits or its terminal goes away.

    Here SIGHUP (the window or the SSH connection closing), SIGTERM and SIGINT ask the
    app to quit as `q` does (`ForkviewApp.hang_up`: running work is saved as stopped;
    the status is 128 + the signal) and arm a watchdog that ends the process if the app
    cannot. Not KeyboardInterrupt, as in the other commands (`_raise_interrupt`): raised
    inside Textual's event loop, one of the several a hangup brings (the kernel's, the
    shell's, those `uv run` forwards) could cut Textual's cleanup short and leave its
    input thread, no daemon, spinning on the dead terminal, keeping python and the `uv`
    waiting for it alive (issue 13). A terminal that goes away without a signal is
    noticed by the app's driver (forkview.app)."""


    hang_up = getattr(app, "hang_up", None)  # a ForkviewApp; any other app runs as is

    def on_signal(signum: int, _frame: Any) -> None:
        hang_up(128 + signum)

    previous: dict[int, Any] = {}
    if hang_up is not None:
        wanted = (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
        previous = {sig: signal.signal(sig, on_signal) for sig in wanted if sig is not None}
        app.arm_watchdog()
    try:
        app.run()
    finally:
        if not getattr(app, "hung_up", False):  # after a hangup, repeats change nothing
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return int(getattr(app, "return_code", 0) or 0)


def cmd_report(args: argparse.Namespace) -> int:
    from forkview.analysis.report import ReportError
    from forkview.report_cmd import ReportUsage, run

    try:
        return run(args)
    except ReportUsage as e:
        raise UsageError(str(e)) from None
    except ReportError as e:
        if e.usage:
            raise UsageError(str(e)) from None
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


def cmd_figure(args: argparse.Namespace) -> int:
    from pathlib import Path

    from forkview.trace_figure import FigureError, render_svg
    from store import Store

    if args.output and Path(args.output).suffix.lower() not in ("", ".svg"):
        raise UsageError(f"-o {args.output}: the figure is SVG (FILE.svg); for PDF convert "
                         "it, e.g. rsvg-convert -f pdf -o FILE.pdf FILE.svg")
    store = Store.open(args.db, readonly=True)
    try:
        svg = render_svg(store, args.trace, by=args.by, estimator=args.estimator,
                         width=args.width, theme=args.theme)
    except FigureError as e:
        raise UsageError(str(e)) from None
    if args.output:
        Path(args.output).write_text(svg, encoding="utf-8")
    else:
        sys.stdout.write(svg)
    return 0


def serve_command(args: argparse.Namespace) -> list[str]:
    """The command textual-serve runs for each browser session: `forkview` (or
    `forkview browse`) with the options `serve` was given, run by this interpreter
    (`sys.executable -m forkview`, so it works under `uv run` and in any venv)."""
    cmd = [sys.executable, "-m", "forkview"]
    db = [f"--db={os.path.abspath(os.path.expanduser(args.db))}"] if args.db else []
    if args.browse:
        return [*cmd, "browse", *db]
    # --flag=value: a value starting with '-' (a stop text, an empty --mi) stays a value.
    cmd += [f"--mi={args.mi}", f"--model={args.model}", f"--device={args.device}",
            f"--dtype={args.dtype}", f"--backend={args.backend}",
            f"--max-new-tokens={args.max_new_tokens}",
            f"--temperature={args.temperature!r}", f"--top-p={args.top_p!r}",
            f"--top-k={args.top_k}", f"--alternatives={args.alternatives}"]
    if args.seed is not None:
        cmd.append(f"--seed={args.seed}")
    cmd += [f"--stop={text}" for text in args.stop]
    if args.raw:
        cmd.append("--raw")
    if args.system is not None:
        cmd.append(f"--system={args.system}")
    if args.enable_thinking is not None:
        cmd.append("--enable-thinking" if args.enable_thinking else "--no-enable-thinking")
    return cmd + db


def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress
    import shlex

    from store import Store

    # What the served command would refuse is refused here, before the server starts.
    if args.browse:
        Store.open(args.db, readonly=True).close()
    else:
        Store.open(args.db).close()
        from models.loading import resolve_spec

        resolve_spec(args.model)
        names = [] if args.mi.strip() in ("", "none") else args.mi.split(",")
        _estimators(names, [])
        _check_template_options(args)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        _status(f"warning: listening on {args.host}: there is no login, anyone who can "
                "reach this address can run the explorer and write the database")
    from textual_serve.server import Server

    server = Server(shlex.join(serve_command(args)), host=args.host, port=args.port,
                    title="forkview", public_url=args.public_url)
    server.serve()  # until SIGINT or SIGTERM
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return 0


def cmd_db_path(args: argparse.Namespace) -> int:
    from store.db import default_db_path

    print(default_db_path())
    return 0


COMMANDS = {
    None: cmd_explore,
    "browse": cmd_browse,
    "annotate": cmd_annotate,
    "export": cmd_export,
    "mi": cmd_mi,
    "traces": cmd_traces,
    "fork": cmd_fork,
    "tree": cmd_tree,
    "replay": cmd_replay,
    "rescore": cmd_rescore,
    "import": cmd_import,
    "merge": cmd_merge,
    "report": cmd_report,
    "figure": cmd_figure,
    "serve": cmd_serve,
    "completion": cmd_completion,
    "db-path": cmd_db_path,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _raise_interrupt)
    from forkview.forks import ForkError
    from models.errors import ModelError
    from store.errors import StoreError

    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        prog = f"{PROG} {args.command}" if args.command else PROG
        print(usage_line(str(e), prog), file=sys.stderr)
        return 2
    except (ModelError, StoreError, ForkError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `forkview export | head` closes the pipe early: not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # e.g. `-o` into a directory that does not exist
        where = f": {e.filename}" if e.filename else ""
        print(f"{PROG}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    finally:
        if "store" in sys.modules:
            from store import Store

            Store.close_all()


if __name__ == "__main__":
    sys.exit(main())

