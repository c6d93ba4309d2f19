"""Rebuild sample_db/arith.db: the bundled arithmetic set run through the default model.

    uv run python sample_db/build.py [--out sample_db/arith.db] [--max-new-tokens 160]
    uv run python sample_db/build.py --update   # keep the traces, redo what derives from them
    uv run python sample_db/build.py --mi       # keep the traces, (re)compute the MI stage

MI stage: `hsic` and `answer-gain` (default parameters) on every trace, and a
stratified `rollout` pass on the ROLLOUT_TRACES shortest greedy traces with smaller
settings than the estimator's defaults (ROLLOUT_PARAMS: S = 4 continuations of at most
32 tokens, continuation tokens not stored) so the file stays a few MB and the build a
few minutes on a CPU; the parameters are stored with every value.

For each problem: one greedy trace and one sampled trace (T = 1.0, seed 1000 + index),
through `forkview.pipeline.annotate_prompt`, the path every front end uses. The file
is deleted first, so a rebuild on the same machine and library versions gives the
same tokens (ids, uids and timestamps differ). Takes several minutes on a CPU.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from anywhere in the checkout

from forkview.pipeline import annotate_prompt, record_answer  # noqa: E402
from forkview.prompt_sets import arith_problems  # noqa: E402
from models.types import GenerationParams  # noqa: E402
from store import Store  # noqa: E402

SAMPLE_SEED_BASE = 1000
SAMPLE_TEMPERATURE = 1.0  # Wang et al. and MI-Peaks analyse T = 1 samples


def remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def finalize(path: Path) -> None:
    """Make the file self-contained and small: no -wal/-shm companions (the store
    opens in WAL mode), no build host or pid (they only serve crash recovery of
    `running` traces, and every trace here is finished), free pages dropped."""
    con = sqlite3.connect(path)
    try:
        con.execute("UPDATE traces SET host = NULL, pid = NULL")
        con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        mode = con.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
        if mode != "delete":
            raise SystemExit(f"could not switch {path} to journal_mode=DELETE (got {mode})")
        con.execute("VACUUM")
    finally:
        con.close()
    left = [p for p in (Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
    if left:
        raise SystemExit(f"WAL files left behind: {', '.join(map(str, left))}")


ROLLOUT_TRACES = 5
# 96 new tokens: enough for most continuations to reach the answer the traces (<= 160
# tokens) write; 32, the first build's figure, cut off 1,666 of 2,020 continuations
# before any answer, so "the answer" was mostly the last number written.
ROLLOUT_PARAMS = {"samples": 4, "max_new_tokens": 96, "keep_tokens": False}


def mi_stage(path: Path, lm) -> None:
    from forkview.mi import run_estimator
    from forkview.pipeline import model_row_id
    from models.estimators import get_estimator

    store = Store.open(path)
    try:
        model_id = model_row_id(store, lm)
        roots = list(reversed(store.list_traces(roots_only=True)))
        for info in roots:
            for name in ("hsic", "answer-gain"):
                t = time.perf_counter()
                s = run_estimator(lm, store, info.id, get_estimator(name), model_id=model_id)
                print(f"trace {info.id:3} {name:11} {len(s.positions):4} positions "
                      f"{time.perf_counter() - t:5.1f} s", flush=True)
        greedy = sorted((t for t in roots if t.params.temperature == 0),
                        key=lambda t: (t.n_tokens, t.id))[:ROLLOUT_TRACES]
        for info in greedy:
            t = time.perf_counter()
            s = run_estimator(lm, store, info.id, get_estimator("rollout", ROLLOUT_PARAMS),
                              "stratified", model_id=model_id)
            print(f"trace {info.id:3} rollout     {len(s.positions):4} positions "
                  f"{time.perf_counter() - t:5.1f} s", flush=True)
    finally:
        store.close()


CONTROL_TRACES = 40  # the first stage's traces


def control_stage(path: Path, lm) -> None:
    """The validity controls on the first stage's traces: hsic and answer-gain against
    another prompt's reference, hsic with the other bandwidth rule (`forkview mi
    --control wrong-reference | bandwidth`): the report's validity table."""
    from forkview.mi import run_estimator
    from forkview.pipeline import model_row_id
    from models.estimators import get_estimator

    store = Store.open(path)
    try:
        model_id = model_row_id(store, lm)
        roots = sorted(store.list_traces(roots_only=True), key=lambda t: t.id)
        for info in roots[:CONTROL_TRACES]:
            for name, control in (("hsic", "wrong-reference"), ("answer-gain", "wrong-reference"),
                                  ("hsic", "bandwidth")):
                t = time.perf_counter()
                run_estimator(lm, store, info.id, get_estimator(name), model_id=model_id,
                              control=control)
                print(f"trace {info.id:3} {name:11} {control:15} "
                      f"{time.perf_counter() - t:5.1f} s", flush=True)
    finally:
        store.close()


# The report's inputs, exactly the command of issue 5's "done when" (160 new tokens, as
# the traces above, to keep the file small; the other settings are the defaults:
# T = 1 for several samples, seeds derived from --seed 0).
BATCH_ARGS = ["annotate", "--prompts", "builtin:arith", "--samples", "4",
              "--mi", "hsic,answer-gain", "--max-new-tokens", "160", "--seed", "0"]
FORK_MAX_NEW_TOKENS = 48


def batch_stage(path: Path) -> None:
    """`forkview annotate --prompts builtin:arith --samples 4 --mi hsic,answer-gain`."""
    from forkview.cli import main as forkview_main

    code = forkview_main([*BATCH_ARGS, "--db", str(path)])
    if code != 0:
        raise SystemExit(f"batch annotation failed (exit {code})")


# The counterfactual test (issue 10), kept small for two cores: the T = 1 traces of
# the first stage's last COUNTERFACTUAL_TRACES problems, K = 2 positions per category
# (E only, P only, E∩P, matched controls; peaks from hsic), S = 3 continuations of up
# to 64 tokens per alternative, exactly this command:
COUNTERFACTUAL_TRACES = 5
COUNTERFACTUAL_ARGS = ["mi", "--estimator", "rollout", "--positions", "categories",
                       "--per-category", "2", "--peaks-from", "hsic", "--samples", "3",
                       "--param", "max_new_tokens=64", "--param", "keep_tokens=false",
                       "--seed", "0"]


def counterfactual_stage(path: Path) -> None:
    from forkview.cli import main as forkview_main

    store = Store.open(path)
    try:
        # the first stage's sampled traces: seeds SAMPLE_SEED_BASE + problem index
        first = range(SAMPLE_SEED_BASE, SAMPLE_SEED_BASE + 1000)
        sampled = sorted(t.id for t in store.list_traces(roots_only=True)
                         if t.params.seed is not None and t.params.seed in first)
        ids = sampled[-COUNTERFACTUAL_TRACES:]
    finally:
        store.close()
    argv = [*COUNTERFACTUAL_ARGS, "--db", str(path)]
    for tid in ids:
        argv += ["--trace", str(tid)]
    t0 = time.perf_counter()
    code = forkview_main(argv)
    print(f"counterfactual stage on traces {ids}: exit {code}, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if code != 0:
        raise SystemExit(f"counterfactual stage failed (exit {code})")


def forks_stage(path: Path, lm) -> None:
    """A small family to look at with `t` in the browser: on the first greedy trace, at
    its highest-entropy position after the first few tokens, the two most likely other
    tokens, a typed text, and 4 sampled continuations keeping the token (seeds 0..3)."""
    from forkview import forks

    store = Store.open(path)
    try:
        root = next(t for t in reversed(store.list_traces(roots_only=True))
                    if t.params.temperature == 0 and t.source_id == "arith-000")
        source = forks.load_source(store, root.id)
        pos = max(range(4, len(source.steps)), key=lambda i: source.steps[i].entropy)
        params = forks.branch_params(source, max_new_tokens=FORK_MAX_NEW_TOKENS)
        plan = forks.plan_alternatives(source, pos, 2, params)
        plan.append(forks.PlannedBranch(forks.encode_text(lm, " Let's count step by step."),
                                        params, "fork", "typed"))
        made = forks.grow(lm, store, source, pos, plan)
        made += forks.grow(lm, store, source, pos, forks.plan_samples(
            source, pos, 4, True, forks.branch_params(
                source, max_new_tokens=FORK_MAX_NEW_TOKENS, seed=0, sampling=True)))
        for r in made:
            print(f"branch {r.trace_id} of trace {root.id} at {pos}: "
                  f"{len(r.output.steps)} tokens, answer {r.answer!r}", flush=True)
    finally:
        store.close()


def update(path: Path, items: list) -> None:
    """Bring an existing file up to date without regenerating its traces: upgrade the
    schema, attach the worked solutions to the prompts and re-extract the answers."""
    by_id = {item.id: item for item in items}
    store = Store.open(path)
    try:
        for info in store.list_traces():
            item = by_id.get(info.source_id or "")
            if item is not None:
                store.add_prompt(info.prompt, reference_answer=info.reference_answer,
                                 reference_solution=item.solution,
                                 source_set=info.source_set, source_id=info.source_id)
            record_answer(store, info.id, info.text, info.reference_answer,
                          stop_reason=info.stop_reason)
    finally:
        store.close()
    finalize(path)
    print(f"updated {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "arith.db")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--problems", type=int, default=20,
                    help="how many problems of builtin:arith (default 20, from arith-000)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the same on every machine, so "
                         "float reductions, and hence tokens, don't depend on core count)")
    ap.add_argument("--update", action="store_true",
                    help="keep the traces; upgrade the schema and redo answers and solutions")
    ap.add_argument("--mi", action="store_true",
                    help="keep the traces; (re)compute the MI stage only (with the "
                         "wrong-reference controls)")
    ap.add_argument("--controls", action="store_true",
                    help="keep the traces; compute the validity controls only")
    ap.add_argument("--counterfactual", action="store_true",
                    help="keep the traces; run the counterfactual categories stage only")
    ap.add_argument("--batch", action="store_true",
                    help="keep the traces; add (or finish) the batch stage and the forks")
    args = ap.parse_args(argv)
    if args.update:
        update(args.out, arith_problems())
        return 0

    import torch

    from models.loading import load_model

    torch.set_num_threads(args.threads)

    items = arith_problems()[: args.problems]
    t0 = time.perf_counter()
    lm = load_model("default", device="cpu", status=lambda m: print(m, flush=True))
    print(f"loaded {lm.name} in {lm.load_seconds:.1f} s", flush=True)

    out: Path = args.out
    if args.batch:
        batch_stage(out)
        forks_stage(out, lm)
        finalize(out)
        print(f"batch stage done on {out} in {time.perf_counter() - t0:.0f} s")
        return 0
    if args.counterfactual:
        counterfactual_stage(out)
        finalize(out)
        print(f"counterfactual stage done on {out} in {time.perf_counter() - t0:.0f} s")
        return 0
    if args.controls:
        control_stage(out, lm)
        finalize(out)
        print(f"control stage done on {out} in {time.perf_counter() - t0:.0f} s")
        return 0
    if args.mi:
        mi_stage(out, lm)
        control_stage(out, lm)
        finalize(out)
        print(f"MI stage done on {out} in {time.perf_counter() - t0:.0f} s")
        return 0
    remove_db(out)
    store = Store.open(out)
    n_tokens = 0
    try:
        for index, item in enumerate(items):
            runs = [
                ("greedy", GenerationParams(max_new_tokens=args.max_new_tokens,
                                            temperature=0.0)),
                ("sampled", GenerationParams(max_new_tokens=args.max_new_tokens,
                                             temperature=SAMPLE_TEMPERATURE,
                                             seed=SAMPLE_SEED_BASE + index)),
            ]
            for label, params in runs:
                result = annotate_prompt(lm, store, item.prompt, params, answer=item.answer,
                                         solution=item.solution, source_set=item.set,
                                         source_id=item.id)
                n_tokens += len(result.steps)
                print(f"{item.id} {label:7} {len(result.steps):4} tokens "
                      f"{len(result.steps) / max(result.seconds, 1e-9):5.1f} tok/s "
                      f"stop={result.stop_reason}", flush=True)
        count = store.count_traces()
    finally:
        store.close()
    mi_stage(out, lm)
    control_stage(out, lm)
    batch_stage(out)
    counterfactual_stage(out)
    forks_stage(out, lm)
    finalize(out)
    size = out.stat().st_size
    print(f"wrote {out}: {count} traces, {n_tokens} tokens, {size / 1e6:.2f} MB, "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
