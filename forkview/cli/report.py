"""`forkview report`: its options and its body.

Importing this module is cheap (argparse only): `forkview --help` builds the parser
with `add_report`, and numpy, the store and the statistics load only when a report
is made. Never torch: a report needs no model.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from forkview.cli.parser import db_option
from forkview.errors import ForkviewError, UsageError

FORMATS = ("md", "html", "json", "csv", "latex")
PEAK_RULES = ("tukey", "topk", "topr")
DEFAULT_PEAK_PARAM = {"tukey": 1.5, "topk": 20, "topr": 0.2}
SPANS = ("all", "think", "answer")  # forkview.analysis.report.SPANS (not imported: cheap)


def add_report(sub: Any) -> None:
    rep = sub.add_parser("report", help="overlap report: high-entropy tokens against MI "
                         "peaks per model x estimator (md, html, json, csv)")
    db_option(rep)
    add_arguments(rep)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The report's options besides --db."""
    p.add_argument("--model", dest="report_models", action="append", default=[],
                   metavar="SPEC", help="only this model: its row id, or a name or spec substring "
                   "(repeatable; default: every model with tokens in the selection)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME",
                   help="only prompts of this set (prompts.source_set; repeatable)")
    p.add_argument("--estimator", dest="estimators", action="append", default=[],
                   metavar="NAME", help="only this MI estimator (repeatable; default: all "
                   "with complete runs)")
    p.add_argument("--entropy-scope", choices=["corpus", "trace"], default="corpus",
                   help="top rho by entropy over all tokens of the selection (corpus, as "
                   "Wang et al.) or within each trace")
    p.add_argument("--rho", type=float, default=0.2, metavar="R",
                   help="share of tokens in the high-entropy set E, in (0, 1) (default 0.2)")
    p.add_argument("--entropy-threshold", type=float, default=None, metavar="X",
                   help="E = tokens with entropy >= X nats instead (e.g. 0.672)")
    p.add_argument("--peaks", choices=PEAK_RULES, default="tukey",
                   help="peak rule per trace: tukey (Q3 + tau*IQR), topk, topr "
                   "(default tukey)")
    p.add_argument("--peak-param", type=float, default=None, metavar="X",
                   help="tau (tukey, default 1.5), k (topk, default 20) or rho (topr, "
                   "default 0.2)")
    p.add_argument("--by", choices=["correct"], default=None,
                   help="also split by answer correctness")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples of prompts for 95%% intervals (default 1000)")
    p.add_argument("--null", type=int, default=1000, metavar="N",
                   help="circular shifts for the null p-values (default 1000)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the bootstrap and the null (default 0)")
    p.add_argument("--branches", action="store_true",
                   help="also forks, samples and rollout continuations (default: roots only)")
    p.add_argument("--span", choices=SPANS, default="all",
                   help="which part of each response: all (default), think (the thinking "
                   "part, <think>...</think>; traces without one are left out) or answer "
                   "(after it; the whole response without one)")
    p.add_argument("--top-tokens", type=int, default=15, metavar="N",
                   help="rows in the token tables (default 15)")
    p.add_argument("--format", dest="report_format", choices=FORMATS, default="md",
                   help="md (default), html, json, csv or latex (booktabs tables)")
    p.add_argument("--figures", metavar="DIR", default=None,
                   help="also write every figure as DIR/NAME.pdf and .svg (matplotlib, "
                   "one column wide, fonts embedded)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")


def settings_from_args(args: argparse.Namespace) -> Any:
    """ReportSettings from the options, every value checked (UsageError when bad)."""
    from forkview.analysis.overlap import EntropyRule
    from forkview.analysis.peaks import PeakRule
    from forkview.analysis.report import ReportSettings

    if not (0 < args.rho < 1):
        raise UsageError(f"--rho must be in (0, 1), got {args.rho:g}")
    if args.entropy_threshold is not None and not math.isfinite(args.entropy_threshold):
        raise UsageError("--entropy-threshold must be a number")
    param = DEFAULT_PEAK_PARAM[args.peaks] if args.peak_param is None else args.peak_param
    if not math.isfinite(param) or param < 0:
        raise UsageError(f"--peak-param must be a non-negative number, got {param:g}")
    if args.peaks == "topk" and (param < 1 or param != int(param)):
        raise UsageError(f"--peak-param for topk is a whole number k >= 1, got {param:g}")
    if args.peaks == "topr" and not (0 < param < 1):
        raise UsageError(f"--peak-param for topr is a share in (0, 1), got {param:g}")
    for name in ("bootstrap", "null", "top_tokens"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 0")
    entropy = (EntropyRule("threshold", args.rho, args.entropy_threshold)
               if args.entropy_threshold is not None
               else EntropyRule(args.entropy_scope, args.rho))
    return ReportSettings(
        entropy=entropy, peaks=PeakRule(args.peaks, param), bootstrap=args.bootstrap,
        null=args.null, seed=args.seed, models=tuple(args.report_models),
        sets=tuple(args.sets), estimators=tuple(args.estimators), branches=args.branches,
        by=args.by, top_tokens=args.top_tokens, span=getattr(args, "span", "all"))


def check_output(path: str) -> None:
    """Refuse an output file that can't be written before any work is done (OSError,
    one line: exit 1)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise OSError(f"{target} is a directory")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OSError(f"directory {parent} does not exist")
    if target.exists():
        if not os.access(target, os.W_OK):
            raise OSError(f"{target} is not writable")
    elif not os.access(parent, os.W_OK):
        raise OSError(f"directory {parent} is not writable")


def run(args: argparse.Namespace) -> int:
    """The report itself, once the options are checked; StoreError and OSError go to
    `main` (exit 1)."""
    settings = settings_from_args(args)
    if args.output:
        check_output(args.output)
    if args.figures:
        fig_dir = Path(args.figures).expanduser()
        if fig_dir.exists() and not fig_dir.is_dir():
            raise OSError(f"--figures {fig_dir} is a file, not a directory")
    from forkview.analysis.report import RENDERERS, build_report
    from store import Store

    store = Store.open(args.db, readonly=True)
    try:
        report = build_report(store, settings)
    finally:
        store.close()
    text = RENDERERS[args.report_format](report)
    if args.figures:
        from forkview.analysis.figures import write_figures

        written = write_figures(report, Path(args.figures).expanduser())
        print(f"{len(written)} figure files in {args.figures}", file=sys.stderr)
    if args.output:
        with open(Path(args.output).expanduser(), "w", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from forkview.analysis.report import ReportError

    try:
        return run(args)
    except ReportError as e:  # a bad request (exit 2) or nothing to report on (exit 1)
        raise (UsageError if e.usage else ForkviewError)(str(e)) from None
