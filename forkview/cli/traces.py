"""Commands on saved traces that never load a model: `traces`, `export`, `figure`,
`merge`, `db-path`. None imports torch or Textual."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from forkview.cli.parser import db_option, int_at_least, positive_int
from forkview.errors import UsageError
from forkview.trace_json import LISTED, trace_to_json


def add_export(sub: Any) -> None:
    e = sub.add_parser("export", help="export per-token rows (with their trace's model, "
                       "prompt, sampling, MI and answer) as JSONL, CSV or Parquet")
    db_option(e)
    e.add_argument("--trace", type=int, action="append", metavar="ID",
                   help="trace id (repeatable; default: all traces)")
    e.add_argument("--format", choices=["jsonl", "csv", "parquet"], default="jsonl",
                   help="columns as in docs/schema.md, 'Export columns' (default jsonl)")
    e.add_argument("-o", "--output", metavar="FILE",
                   help="write here instead of stdout (required for parquet)")
    e.add_argument("--superseded", action="store_true",
                   help="without --trace: also export superseded traces (stopped copies a "
                   "resumed batch made again)")


def add_traces(sub: Any) -> None:
    t = sub.add_parser("traces", help="list saved traces, newest first")
    db_option(t)
    t.add_argument("--json", action="store_true", help="print a JSON list")
    t.add_argument("--search", default=None, help="only traces whose prompt or text contains this")
    t.add_argument("--model", dest="model_filter", default=None,
                   help="only traces whose model name or spec contains this")
    t.add_argument("--limit", type=positive_int, default=None)
    t.add_argument("--branches", action="store_true",
                   help="also list branches and rollout continuations (traces with a parent)")
    t.add_argument("--superseded", action="store_true",
                   help="also list superseded traces (stopped copies a resumed batch made "
                   "again; not counted by reports)")


def add_merge(sub: Any) -> None:
    mg = sub.add_parser("merge", help="merge databases (from several machines) into one, "
                        "without duplicating a trace")
    mg.add_argument("out", metavar="OUT.db", help="database to merge into (created if missing)")
    mg.add_argument("inputs", nargs="+", metavar="IN.db", help="databases to read (never changed)")


def add_figure(sub: Any) -> None:
    fg = sub.add_parser("figure", help="one trace as an SVG figure, its tokens coloured as "
                        "in the explorer (by entropy, or by an MI estimator)")
    db_option(fg)
    fg.add_argument("--trace", type=int, required=True, metavar="ID")
    fg.add_argument("--by", choices=["entropy", "mi"], default="entropy",
                    help="colour by entropy (absolute scale, nats; default) or by the "
                    "latest complete MI run of --estimator (per-trace scale, peaks marked)")
    fg.add_argument("--estimator", default=None, metavar="NAME",
                    help="with --by mi: the estimator (default: the trace's only one)")
    fg.add_argument("--width", type=int_at_least(40), default=100, metavar="COLS",
                    help="text width in columns (default 100)")
    fg.add_argument("--theme", choices=["light", "dark"], default="light",
                    help="background (default light)")
    fg.add_argument("-o", "--output", metavar="FILE.svg",
                    help="write here instead of stdout")


def add_db_path(sub: Any) -> None:
    sub.add_parser("db-path", help="print the default database path (env FORKVIEW_DB, else "
                   "forkview.db in the user data directory)")


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
        out = []
        for t in infos:
            extra = ({"superseded_by": store.superseded_by(t.id)}
                     if t.status == "superseded" else {})
            out.append(trace_to_json(t, (*LISTED, *extra), **extra))
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


def cmd_db_path(args: argparse.Namespace) -> int:
    from store.db import default_db_path

    print(default_db_path())
    return 0
