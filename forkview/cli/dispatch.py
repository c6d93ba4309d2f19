"""The command table and `main`, the one place where what a command raises becomes a
line on stderr and an exit status (`exit_status`).

`build_parser` adds the commands in the order `--help` lists them; `COMMANDS` maps each
to its function in forkview/cli/: generate.py (annotate), tui.py (the explorer,
browse, serve), traces.py (traces, export, figure, merge, db-path), forks.py (fork,
tree, replay), mi.py (mi, rescore, import), report.py (report).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from forkview.cli import forks, generate, mi, report, traces, tui
from forkview.cli.parser import PROG, Parser, explorer_options, generation_options, usage_line
from forkview.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ForkviewError, UsageError


def add_completion(sub: Any) -> None:
    co = sub.add_parser("completion", help="print a shell completion script, e.g. "
                        "eval \"$(forkview completion bash)\"")
    co.add_argument("shell", choices=["bash", "zsh", "tcsh"])


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return 0


# Each command's parser, in the order `forkview --help` lists them.
_SUBPARSERS: tuple[Callable[[Any], None], ...] = (
    tui.add_browse, generate.add_annotate, traces.add_export, mi.add_mi, forks.add_fork,
    forks.add_tree, forks.add_replay, traces.add_traces, mi.add_rescore, mi.add_import,
    traces.add_merge, report.add_report, traces.add_figure, tui.add_serve, add_completion,
    traces.add_db_path,
)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        # Subcommand options like `fork --top` must not be read as abbreviations of the
        # explorer's --top-p / --top-k.
        allow_abbrev=False,
        description="Watch a language model reason token by token: entropy per token, "
        "kept in SQLite. Without a command, opens the explorer.",
    )
    from models.types import forkview_version

    p.add_argument("--version", action="version", version=f"%(prog)s {forkview_version()}")
    explorer_options(p)
    generation_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in _SUBPARSERS:
        add(sub)
    return p


COMMANDS: dict[str | None, Callable[[argparse.Namespace], int]] = {
    None: tui.cmd_explore,
    "browse": tui.cmd_browse,
    "annotate": generate.cmd_annotate,
    "export": traces.cmd_export,
    "mi": mi.cmd_mi,
    "traces": traces.cmd_traces,
    "fork": forks.cmd_fork,
    "tree": forks.cmd_tree,
    "replay": forks.cmd_replay,
    "rescore": mi.cmd_rescore,
    "import": mi.cmd_import,
    "merge": traces.cmd_merge,
    "report": report.cmd_report,
    "figure": traces.cmd_figure,
    "serve": tui.cmd_serve,
    "completion": cmd_completion,
    "db-path": traces.cmd_db_path,
}


def _raise_interrupt(signum: int, _frame: Any) -> None:
    # SIGTERM / SIGHUP (the SSH session or window closing) take the same path as
    # Ctrl-C, so the trace is closed as `stopped` with every token so far. During a
    # database write the interrupt waits for the write to end (store.db.write_section).
    from store.db import interrupt_or_defer

    interrupt_or_defer()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _raise_interrupt)
    try:
        return COMMANDS[args.command](args)
    except BaseException as e:
        code = exit_status(e, args.command)
        if code is None:
            raise
        return code
    finally:
        if "store" in sys.modules:
            from store import Store

            Store.close_all()


def exit_status(e: BaseException, command: str | None = None) -> int | None:
    """Report what a command raised on one line of stderr and give its exit status;
    None for what is not ours to report (it propagates: a traceback).

      UsageError                    2    forkview: error: ... (see forkview CMD --help)
      ForkviewError (ForkError...)  its exit_code (1)    forkview: error: ...
      ModelError, StoreError        1    forkview: error: ...
      OSError (-o into a missing directory...)    1    forkview: error: REASON: FILE
      BrokenPipeError (`forkview export | head`)  0    nothing
      KeyboardInterrupt (Ctrl-C, SIGTERM, SIGHUP) 130  forkview: interrupted

    The parser's own usage errors exit 2 before a command runs (parser.Parser); a
    command returns 1 itself when part of its work failed, 130 when it was
    interrupted with its work saved."""
    from models.errors import ModelError
    from store.errors import StoreError

    if isinstance(e, UsageError):
        prog = f"{PROG} {command}" if command else PROG
        print(usage_line(str(e), prog), file=sys.stderr)
        return e.exit_code
    if isinstance(e, (ForkviewError, ModelError, StoreError)):
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, ForkviewError) else EXIT_FAILED
    if isinstance(e, BrokenPipeError):
        # `forkview export | head` closes the pipe early: not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    if isinstance(e, KeyboardInterrupt):
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(e, OSError):
        # e.g. `-o` into a directory that does not exist
        where = f": {e.filename}" if e.filename else ""
        print(f"{PROG}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_FAILED
    return None
