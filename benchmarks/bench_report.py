"""How long `forkview report` takes over half a million stored tokens, against the floor:
reading the same columns with raw sqlite3 + numpy.

    uv run python benchmarks/bench_report.py [--traces 1000] [--tokens 500] [--reps 3]
        [--bootstrap 1000] [--null 1000] [--db PATH] [--keep]

Builds (once; reused with --db PATH --keep) a synthetic database through the Store for
the model, prompts and traces and direct SQL for the bulk rows: `--traces` root traces
of `--tokens` tokens each with realistic rows (text, entropy, a top-10 JSON array) and
one complete `hsic`-named MI run per trace whose values follow the entropy loosely.

Then, interleaved `--reps` times, medians printed:
- raw: sqlite3 (mode=ro) reads tokens.trace_id/position/entropy/text and
  mi_values.run_id/position/value (plus the latest complete run ids) into numpy arrays:
  the columns the report reads, nothing computed;
- report: `forkview.analysis.report.build_report` (read-only Store open, the same reads,
  E, P, every statistic with a `--bootstrap` x trace bootstrap and `--null` shifts,
  token tables, plots' data) and rendering it as Markdown.

Goal: report / raw <= 5 with every control on (chance levels, four MH stratifications,
the primary endpoint with E refitted in each of the prompt-clustered resamples, partial
Spearman, within-trace AUROC; issue 9); it was <= 3 before the controls.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ["the", " So", " Let", " we", " need", " to", " find", " 3", " +", " 5", " =",
         " 8", ".", "\n\n", " Wait", " but", " First", " the", " answer", " is", " total"]


def build(path: Path, n_traces: int, n_tokens: int, seed: int = 0) -> None:
    from models.types import GenerationParams
    from store import Store

    rng = np.random.default_rng(seed)
    store = Store.open(path)
    model = store.upsert_model(name="bench", spec="bench", kind="dir", dtype="float32",
                               device="cpu")
    params = GenerationParams(max_new_tokens=n_tokens)
    trace_ids = []
    for i in range(n_traces):
        prompt = store.add_prompt(f"problem {i}", reference_answer=str(i),
                                  source_set="bench", source_id=str(i))
        trace_ids.append(store.start_trace(model_id=model, prompt_id=prompt,
                                           prompt_token_ids=[1, 2, 3], params=params))
    store.close()
    con = sqlite3.connect(path)
    con.execute("PRAGMA synchronous = OFF")
    for t, tid in enumerate(trace_ids):
        ent = rng.exponential(0.35, n_tokens) * (rng.random(n_tokens) < 0.45)
        mi = 0.4 * ent + rng.normal(0, 0.2, n_tokens)
        ids = rng.integers(0, len(WORDS), n_tokens)
        rows = []
        for p in range(n_tokens):
            top = json.dumps([{"token_id": int((ids[p] + k) % len(WORDS)),
                               "text": WORDS[(ids[p] + k) % len(WORDS)],
                               "prob": round(math.exp(-k - ent[p]), 6)} for k in range(10)])
            rows.append((tid, p, int(ids[p]), WORDS[ids[p]], -float(ent[p]), 1,
                         float(ent[p]), float(ent[p]), top))
        con.executemany("INSERT INTO tokens (trace_id, position, token_id, text, logprob, "
                        "rank, entropy, sampling_entropy, top) VALUES (?,?,?,?,?,?,?,?,?)",
                        rows)
        run = con.execute(
            "INSERT INTO mi_runs (trace_id, estimator, params, info, model_id, status, "
            "created_at, finished_at) VALUES (?, 'hsic', '{}', '{}', ?, 'complete', "
            "'2026-01-01', '2026-01-01') RETURNING id", (tid, model)).fetchone()[0]
        con.executemany("INSERT INTO mi_values (run_id, position, value) VALUES (?, ?, ?)",
                        [(run, p, float(mi[p])) for p in range(n_tokens)])
        con.execute("UPDATE traces SET status = 'complete', n_tokens = ?, host = NULL, "
                    "pid = NULL WHERE id = ?", (n_tokens, tid))
        if t % 100 == 99:
            con.commit()
    con.commit()
    con.execute("PRAGMA journal_mode = DELETE")
    con.close()


def raw_read(path: Path) -> int:
    """The floor: the columns the report reads, straight into numpy, nothing computed."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = con.execute("SELECT trace_id, position, entropy, text FROM tokens").fetchall()
    tr, pos, ent, text = zip(*rows, strict=True)
    arrays = [np.array(tr, dtype=np.int64), np.array(pos, dtype=np.int64),
              np.array(ent, dtype=np.float64)]
    runs = con.execute("SELECT MAX(id) FROM mi_runs WHERE status = 'complete' "
                       "GROUP BY trace_id, estimator").fetchall()
    mi = con.execute("SELECT run_id, position, value FROM mi_values").fetchall()
    run, mpos, mval = zip(*mi, strict=True)
    arrays += [np.array(run, dtype=np.int64), np.array(mpos, dtype=np.int64),
               np.array(mval, dtype=np.float64)]
    con.close()
    return sum(len(a) for a in arrays) + len(text) + len(runs)


def run_report(path: Path, bootstrap: int, null: int) -> int:
    from forkview.analysis.report import ReportSettings, build_report, render_markdown
    from store import Store

    store = Store.open(path, readonly=True)
    try:
        report = build_report(store, ReportSettings(bootstrap=bootstrap, null=null))
    finally:
        store.close()
    return len(render_markdown(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--null", type=int, default=1000)
    ap.add_argument("--db", type=Path, default=None, help="build here (or reuse with --keep)")
    ap.add_argument("--keep", action="store_true", help="reuse --db if it exists")
    args = ap.parse_args()

    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "bench.db"
    else:
        path = args.db
    if not (args.keep and path.exists()):
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        build(path, args.traces, args.tokens)
        print(f"built {path} ({path.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.1f} s")
    n = sqlite3.connect(f"file:{path}?mode=ro", uri=True).execute(
        "SELECT COUNT(*) FROM tokens").fetchone()[0]
    print(f"{n:,} tokens; bootstrap {args.bootstrap}, null {args.null}")

    raw_read(path)  # warm the page cache for both
    run_report(path, args.bootstrap, args.null)
    times: dict[str, list[float]] = {"raw": [], "report": []}
    for rep in range(args.reps):
        order = ["raw", "report"] if rep % 2 == 0 else ["report", "raw"]
        for name in order:
            t0 = time.perf_counter()
            if name == "raw":
                raw_read(path)
            else:
                run_report(path, args.bootstrap, args.null)
            times[name].append(time.perf_counter() - t0)
    raw = statistics.median(times["raw"])
    rep_t = statistics.median(times["report"])
    for name in ("raw", "report"):
        ts = times[name]
        print(f"{name:7s} median {statistics.median(ts):.3f} s  "
              f"(min {min(ts):.3f}, max {max(ts):.3f})")
    print(f"report / raw = {rep_t / raw:.2f}  (goal <= 5 with every control on: issue 9)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
