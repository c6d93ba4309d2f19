"""`forkview annotate`: generate traces (one prompt, or a prompt set in batches) and
save them."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from forkview.cli.common import estimators_named, status_line, token_printer
from forkview.cli.parser import (
    db_option,
    generation_options,
    generation_params,
    model_options,
    positive_int,
)
from forkview.errors import EXIT_INTERRUPTED, UsageError
from forkview.trace_json import GENERATED, trace_to_json


def add_annotate(sub: Any) -> None:
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
    a.add_argument("--samples", type=positive_int, default=1, metavar="N",
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
    model_options(a)
    db_option(a)
    generation_options(a)
    # None = not given: greedy for one trace, T = 1 for several samples of a prompt.
    a.set_defaults(temperature=None)


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
    params = generation_params(args)
    estimators = estimators_named([n for n in args.mi.split(",") if n.strip()], [])
    store = Store.open(args.db)  # fail on a bad database before spending time on the model
    from forkview.pipeline import annotate_prompt
    from models.engine import load as load_model

    quiet = args.json or not sys.stderr.isatty()
    lm = load_model(args.model, args.device, args.dtype, args.backend,
                    status=None if quiet else status_line)
    started: list[int] = []
    show = token_printer() if not quiet else None
    try:
        result = annotate_prompt(
            lm, store, args.prompt, params, answer=args.answer,
            on_start=lambda r: started.append(r.trace_id),
            on_step=show,
        )
    except KeyboardInterrupt:
        if started:
            info = store.trace(started[0])
            status_line(f"interrupted: trace {info.id} kept with {info.n_tokens} tokens "
                        "(stopped)")
            if not args.json:
                print(info.id)
        return EXIT_INTERRUPTED
    if show is not None:
        print(file=sys.stderr)
    mi: dict[str, dict[int, float | None]] = {}
    failed = False
    if estimators:
        from forkview.mi import jobs_for, run_many

        def outcome(o: Any) -> None:
            if o.status in ("skipped", "failed"):
                status_line(o.line)

        def running(job: Any, _step: int, _steps: int) -> None:
            status_line(f"computing {job.estimator.name}...")

        runs = run_many(lm, store, jobs_for([result.trace_id], estimators), own_model=True,
                        on_run=None if quiet else running, on_outcome=outcome)
        failed = bool(runs.count("failed"))
        mi = store.latest_mi(result.trace_id)
    if args.json:
        info = store.trace(result.trace_id)
        # The record holds the prompt, its ids, the parameters (the seed drawn) and the
        # text as generated; the loaded model and the tokens (with MI) come from here.
        out = trace_to_json(info, GENERATED, model=lm.name, model_spec=lm.spec,
                            device=lm.device, dtype=lm.dtype,
                            tokens=[_with_mi(s.to_json(), mi) for s in result.steps])
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
    params = generation_params(args)
    batch.plan_jobs(items[:1], args.samples, params)  # UsageError for greedy copies
    estimators = estimators_named([n for n in args.mi.split(",") if n.strip()], [])
    store = Store.open(args.db)
    from models.engine import load as load_model

    quiet = args.json or not sys.stderr.isatty()
    lm = load_model(args.model, args.device, args.dtype, args.backend,
                    status=None if quiet else status_line)
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
        status_line(line)
    stopped = f", {summary.stopped} of them stopped" if summary.stopped else ""
    replaced = (f"; {summary.superseded} stopped cop{'ies' if summary.superseded != 1 else 'y'}"
                " marked superseded" if summary.superseded else "")
    status_line(f"{len(items)} prompts x {args.samples}: {summary.generated} traces "
                f"generated ({summary.tokens} tokens in {summary.seconds:.1f} s{stopped}), "
                f"{summary.skipped} already complete{replaced}; "
                f"MI runs: {summary.mi_runs} computed, "
                f"{summary.mi_skipped} already complete"
                + (f", {len(summary.mi_not_run)} not run" if summary.mi_not_run else "")
                + ("; interrupted: re-run the same command to finish"
                   if summary.interrupted else ""))
    return EXIT_INTERRUPTED if summary.interrupted else 0


def _with_mi(token: dict[str, Any], mi: dict[str, dict[int, float | None]]) -> dict[str, Any]:
    if mi:
        token["mi"] = {name: values.get(token["position"]) for name, values in mi.items()}
    return token
