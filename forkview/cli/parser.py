"""The command line's grammar: the parser class (one-line usage errors, exit status 2),
the value types and the option groups several commands share.

Cheap to import (argparse; models.engine and models.types, which import no torch):
`forkview --help` builds every parser.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from forkview.errors import UsageError

if TYPE_CHECKING:
    from models.types import GenerationParams


PROG = "forkview"


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


def int_at_least(lo: int):
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

positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_range(lo: float, hi: float, lo_open: bool = False):
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


def port_number(text: str) -> int:
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {port}")
    return port


def model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=os.environ.get("FORKVIEW_MODEL", "default"), metavar="SPEC",
        help="'default' (embedded SmolLM2-135M-Instruct), a Hugging Face directory, a hub id, "
        "or a .gguf file (env FORKVIEW_MODEL)",
    )
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    backend_option(g)


def backend_option(p: Any) -> None:
    from models.engine import BACKENDS

    p.add_argument("--backend", default=os.environ.get("FORKVIEW_BACKEND", "hf"),
                   choices=BACKENDS,
                   help="engine: hf (transformers, every estimator) or llama.cpp (GGUF files "
                   "on the CPU, the `llama` extra; estimators needing hidden states load "
                   "the same file on transformers) (env FORKVIEW_BACKEND)")


def explorer_options(p: argparse.ArgumentParser) -> None:
    """What the explorer takes (the bare `forkview` and `forkview serve`): its MI
    estimators, the model and the database."""
    p.add_argument("--mi", default="hsic,answer-gain", metavar="NAMES",
                   help="MI estimators the explorer computes after each generation "
                   "(default hsic,answer-gain; 'none' for none)")
    model_options(p)
    db_option(p)


def trace_model_options(p: argparse.ArgumentParser, help_: str) -> None:
    """--model / --device / --dtype for commands that work on saved traces: the model
    defaults to the one that made each trace (args.trace_model is None then)."""
    p.add_argument("--model", dest="trace_model", default=None, metavar="SPEC", help=help_)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    backend_option(p)


def db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="PATH", default=None,
                   help="SQLite database (default: env FORKVIEW_DB or the user data directory)")


def generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=positive_int, default=512, metavar="N")
    g.add_argument("--temperature", type=float_range(0.0, 100.0), default=0.0, metavar="T",
                   help="0 = greedy (default); T > 0 samples")
    g.add_argument("--top-p", type=float_range(0.0, 1.0, lo_open=True), default=1.0,
                   metavar="P")
    g.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                   help="0 = off")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="sampling seed (a random one is chosen and stored if omitted)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable)")
    g.add_argument("--alternatives", type=non_negative_int, default=10, metavar="K",
                   help="top-k alternatives recorded per token (default 10)")
    g.add_argument("--raw", action="store_true",
                   help="send the prompt as plain text, without the chat template")
    template_options(g)


def template_options(g: Any) -> None:
    """--system / --enable-thinking: what the chat template is given besides the prompt
    (models.prompting.chat_messages, template_kwargs); stored with each trace."""
    g.add_argument("--system", default=None, metavar="TEXT",
                   help="a system message before the prompt (chat template)")
    g.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="pass enable_thinking=true (or false) to the chat template, for "
                   "templates that take it (Qwen3-style); default: not passed")


def check_template_options(args: argparse.Namespace) -> None:
    if args.raw and args.system is not None:
        raise UsageError("--system needs the chat template (leave out --raw)")


def generation_params(args: argparse.Namespace) -> GenerationParams:
    from models.types import GenerationParams

    check_template_options(args)
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
