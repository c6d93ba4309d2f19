"""Scoring traces with a model: `mi` (MI estimators on saved traces), `rescore` (a
second model's entropies of the same tokens), `import` (traces generated elsewhere,
scored teacher-forced)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from forkview.cli.common import estimators_named, status_line, stderr_console
from forkview.cli.parser import (
    PROG,
    check_template_options,
    db_option,
    model_options,
    non_negative_int,
    positive_int,
    template_options,
    trace_model_options,
)
from forkview.errors import EXIT_INTERRUPTED, UsageError


def add_mi(sub: Any) -> None:
    m = sub.add_parser("mi", help="compute an MI estimator on saved traces (resumable)")
    db_option(m)
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
    m.add_argument("--samples", type=positive_int, default=None, metavar="S",
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
    cat.add_argument("--per-category", type=positive_int, default=None, metavar="K",
                     help="positions per category and trace (default 5)")
    cat.add_argument("--peaks-from", default=None, metavar="NAME",
                     help="estimator whose stored run gives the MI peaks P, e.g. hsic")
    cat.add_argument("--peak-rule", choices=["tukey", "topk", "topr"], default=None,
                     help="peak rule (default tukey)")
    cat.add_argument("--peak-param", type=float, default=None, metavar="X",
                     help="the rule's parameter (tukey tau 1.5, topk k 20, topr rho 0.2)")
    cat.add_argument("--seed", dest="draw_seed", type=int, default=None, metavar="S",
                     help="seed of the draw (default 0)")
    m.add_argument("--budget-tokens", type=positive_int, default=None, metavar="N",
                   help="rollout: cap on the continuation tokens of the whole command; it "
                   "stops cleanly before a position whose worst case would pass N (re-run "
                   "to continue)")
    trace_model_options(m, "model to use (default: the model that made each trace)")


def add_rescore(sub: Any) -> None:
    rs = sub.add_parser("rescore", help="score saved traces' tokens with a second model "
                        "(same tokenizer) and keep its entropy beside the original")
    db_option(rs)
    which = rs.add_mutually_exclusive_group(required=True)
    which.add_argument("--trace", type=int, action="append", metavar="ID", help="repeatable")
    which.add_argument("--set", dest="set_name", metavar="NAME",
                       help="the root traces of this prompt set")
    which.add_argument("--all", action="store_true", help="every root trace")
    rs.add_argument("--mi", default="", metavar="NAMES",
                    help="also run these MI estimators with the second model (roots only)")
    rs.add_argument("--json", action="store_true", help="one JSON object per trace and line")
    model_options(rs)
    rs.set_defaults(model=None)  # the second model is always named


def add_import(sub: Any) -> None:
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
    template_options(im)
    im.add_argument("--batch", type=positive_int, default=8, metavar="N",
                    help="traces per forward pass (default 8)")
    im.add_argument("--alternatives", type=non_negative_int, default=10, metavar="K",
                    help="top-k alternatives recorded per token (default 10)")
    im.add_argument("--mi", default="", metavar="NAMES",
                    help="MI estimators to run on the imported traces, e.g. hsic,answer-gain")
    model_options(im)
    db_option(im)


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
    (est,) = estimators_named([args.estimator], params)
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
                  console=stderr_console()) as bar:
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


def cmd_rescore(args: argparse.Namespace) -> int:
    from forkview import rescore
    from store import Store

    if not args.model:
        raise UsageError("rescore needs --model SPEC: the second model")
    estimators = estimators_named([n for n in args.mi.split(",") if n.strip()], [])
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
                    status=None if quiet else status_line)
    store = Store.open(args.db)
    infos = [store.trace(t.id) for t in infos]
    rescore.check_tokenizers(store, infos, lm)

    def show(r: Any) -> None:
        if args.json:
            print(json.dumps(vars(r)), flush=True)
        elif not quiet or r.note:
            status_line(f"trace {r.trace_id}: {r.status}"
                        + (f", {r.n_scored} tokens" if r.n_scored else "")
                        + (f" ({r.note})" if r.note else ""))

    def show_mi(tid: int, name: str, status: str) -> None:
        if not quiet:
            status_line(f"trace {tid} {name}: {status}")

    results = rescore.rescore(lm, store, infos, estimators=estimators, on_trace=show,
                              on_mi=show_mi)
    counts = {k: sum(r.status == k for r in results) for k in ("scored", "skipped", "own")}
    status_line(f"{lm.name}: {counts['scored']} traces scored, {counts['skipped']} already "
                f"scored, {counts['own']} made by this model")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from forkview import importer
    from forkview.text import counted
    from store import Store

    estimators = estimators_named([n for n in args.mi.split(",") if n.strip()], [])
    check_template_options(args)
    try:
        path = importer.check_source(args.file)
    except ValueError as e:
        raise UsageError(str(e)) from None
    store = Store.open(args.db)  # a bad database fails before the model loads
    from models.engine import load as load_model

    quiet = not sys.stderr.isatty()
    lm = load_model(args.model, args.device, args.dtype, args.backend,
                    status=None if quiet else status_line)
    fields = importer.ImportFields(args.prompt_field, args.response_field, args.answer_field,
                                   args.id_field)

    def skipped(s: Any) -> None:
        status_line(f"{s.where}: {s.reason}; skipped")

    def imported(tid: int, _item: Any) -> None:
        print(tid, flush=True)

    def mi_done(tid: int, name: str, status: str) -> None:
        if not quiet or status not in ("complete", "stopped"):
            status_line(f"trace {tid} {name}: {status}")

    summary = importer.import_file(
        lm, store, path, fields=fields, set_name=args.set_name, raw=args.raw,
        system=args.system, enable_thinking=args.enable_thinking,
        batch=args.batch, alternatives=args.alternatives, estimators=estimators,
        on_skip=skipped, on_trace=imported, on_mi=mi_done)
    dup = f", {summary.duplicates} of them already imported" if summary.duplicates else ""
    mi = (f"; MI runs: {summary.mi_runs} computed"
          + (f", {summary.mi_failed} failed" if summary.mi_failed else "")
          if estimators else "")
    status_line(f"{path}: {counted(len(summary.imported), 'trace')} imported "
                f"({counted(summary.tokens, 'token')}), {len(summary.skipped)} skipped{dup}{mi}"
                + ("; interrupted" if summary.interrupted else ""))
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return 0 if summary.imported else 1
