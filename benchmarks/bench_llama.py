"""The llama.cpp engine: annotated decoding vs llama-cpp-python's own decoding, the
explorer's warm start, and `forkview mi` with nothing left to compute.

    uv run --extra llama python benchmarks/bench_llama.py [--tokens 128] [--reps 5]

1. Decode: the same GGUF (the embedded default), the same prompt ids, greedy, the same
   number of tokens. "annotated" is forkview's llama.cpp engine
   (models.llama_backend.stream_annotated: full-vocabulary entropy, log-prob, rank and
   top-10 per token); "plain" is llama-cpp-python's own `create_completion` on the same
   Llama object (temperature 0, its sampler, no statistics). After one warm-up each,
   they run interleaved with the order rotating every repetition; medians are printed.
   Goal: annotated / plain >= 0.9.
2. Explorer warm start on the llama.cpp engine: a fresh process starts the model's load
   as the CLI does (forkview.preload, before the explorer's modules are imported), runs
   the explorer headless (Textual's run_test) and reports, from interpreter start, when forkview's
   modules are imported, when the app is mounted and when the model is ready (the
   status line shows it). Goal: ready <= 2 s. Run twice; the second run is "warm".
3. `forkview mi` on a trace whose run is complete: a fresh process, end to end.
   Goal: <= 1 s.
4. Branches (information): N seeded samples from one position as one multi-sequence
   batch against one branch per call.
Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DECODE_GOAL = 0.9
READY_GOAL = 2.0
MI_GOAL = 1.0
PROMPT = ("Write a detailed story about a lighthouse keeper who finds a message in a "
          "bottle. Describe the weather, the sea and what the keeper decides to do.")

STARTUP = r"""
import time, sys, json, os
t0 = time.perf_counter()
import asyncio
from forkview import preload  # what `forkview --backend llama.cpp` does first
pre = preload.start("default", "auto", "auto", "llama.cpp")
from forkview.app import create_app
t_import = time.perf_counter()
marks = {}
async def main():
    app = create_app(db_path=os.environ["BENCH_DB"], backend="llama.cpp", mi_estimators=[],
                     preload=pre)
    async with app.run_test(size=(100, 30)) as pilot:
        marks["mounted"] = time.perf_counter()
        while app.lm is None:
            await pilot.pause(0.01)
        marks["ready"] = time.perf_counter()
        marks["load_seconds"] = app.lm.load_seconds
        marks["torch"] = "torch" in sys.modules
asyncio.run(main())
print(json.dumps({"import": t_import - t0, "mounted": marks["mounted"] - t0,
                  "ready": marks["ready"] - t0, "load": marks["load_seconds"],
                  "torch_imported": marks["torch"]}))
"""


def bench_decode(tokens: int, reps: int) -> float:
    from models.llama_backend import load_llama, stream_annotated
    from models.prompting import encode_prompt
    from models.types import GenerationParams

    lm = load_llama("default")
    llm = lm.model
    ids = encode_prompt(lm, PROMPT)
    params = GenerationParams(max_new_tokens=tokens)

    def annotated() -> list[int]:
        return [s.token_id for s in stream_annotated(lm, ids, params)]

    reference = annotated()
    n = len(reference)

    def plain() -> list[int]:
        llm.reset()  # forget what the engine left in the cache: decode the prompt anew
        out = llm.create_completion(ids, max_tokens=n, temperature=0.0, top_k=1,
                                    logprobs=None)
        return [0] * out["usage"]["completion_tokens"]

    variants = {"annotated": annotated, "plain": plain}
    for fn in variants.values():
        fn()
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(max(3, reps)):
        order = names[rep % 2:] + names[:rep % 2]
        for name in order:
            t0 = time.perf_counter()
            got = variants[name]()
            speeds[name].append(len(got) / (time.perf_counter() - t0))
        print(f"rep {rep + 1}: " + "  ".join(f"{k} {speeds[k][-1]:.1f}" for k in names),
              flush=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    ratio = med["annotated"] / med["plain"]
    print(f"\n1. decode: {lm.name} ({lm.dtype}) on llama.cpp, prompt {len(ids)} tokens, "
          f"{n} new tokens, {len(speeds['plain'])} reps")
    for k in names:
        print(f"   {k:9} {med[k]:6.1f} tok/s (median; min {min(speeds[k]):.1f}, "
              f"max {max(speeds[k]):.1f})")
    print(f"   annotated / plain = {ratio:.3f}; goal >= {DECODE_GOAL}: "
          f"{'meets' if ratio >= DECODE_GOAL else 'misses'}")
    return ratio


def bench_branches(n: int = 8, tokens: int = 32, reps: int = 3) -> float:
    """N seeded samples from one position: one multi-sequence batch against N calls of
    one branch each (the prefix decoded once per call in both)."""
    from models.branch_types import BranchRequest
    from models.llama_backend import grow_branches, load_llama, stream_annotated
    from models.prompting import encode_prompt
    from models.types import GenerationParams

    lm = load_llama("default")
    ids = encode_prompt(lm, PROMPT)
    trace = [s.token_id for s in stream_annotated(lm, ids, GenerationParams(max_new_tokens=32))]
    reqs = [BranchRequest((), GenerationParams(max_new_tokens=tokens, temperature=1.0,
                                               seed=i)) for i in range(n)]

    def batched() -> int:
        return sum(len(o.steps) for o in grow_branches(lm, ids, trace, 16, reqs))

    def one_at_a_time() -> int:
        return sum(len(grow_branches(lm, ids, trace, 16, [r])[0].steps) for r in reqs)

    speeds: dict[str, list[float]] = {"batched": [], "one at a time": []}
    fns = {"batched": batched, "one at a time": one_at_a_time}
    for fn in fns.values():
        fn()
    for rep in range(reps):
        for name in (list(fns) if rep % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            made = fns[name]()
            speeds[name].append(made / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    ratio = med["batched"] / med["one at a time"]
    print(f"4. branches: {n} samples of up to {tokens} tokens at position 16: batched "
          f"{med['batched']:.1f} tok/s, one at a time {med['one at a time']:.1f} tok/s, "
          f"ratio {ratio:.2f} (information)")
    return ratio


def bench_startup(tmp: Path) -> float:
    env = {"BENCH_DB": str(tmp / "start.db"), "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    results = []
    for i in range(2):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", STARTUP], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"   start {i + 1} ({'cold' if i == 0 else 'warm'}): forkview imported "
              f"{r['import']:.2f} s, app mounted {r['mounted']:.2f} s, model ready "
              f"{r['ready']:.2f} s (llama.cpp load {r['load']:.2f} s), process "
              f"{wall:.2f} s; torch imported: {r['torch_imported']}")
    ready = results[-1]["ready"]
    print(f"2. explorer warm start to ready on llama.cpp: {ready:.2f} s "
          f"(from interpreter start); goal <= {READY_GOAL} s: "
          f"{'meets' if ready <= READY_GOAL else 'misses'}")
    return ready


def bench_mi_nothing_left(tmp: Path) -> float:
    """A copy of the sample database has complete hsic runs: `forkview mi` on one of
    them has nothing left to compute."""
    import sqlite3

    db = tmp / "mi.db"
    shutil.copy(ROOT / "sample_db" / "arith.db", db)
    con = sqlite3.connect(db)
    tid = con.execute("SELECT trace_id FROM mi_runs WHERE estimator = 'hsic' AND "
                      "status = 'complete' AND json_extract(params, '$.control') IS NULL "
                      "ORDER BY trace_id LIMIT 1").fetchone()[0]
    con.close()
    cmd = [sys.executable, "-m", "forkview", "mi", "--db", str(db), "--trace", str(tid),
           "--estimator", "hsic"]
    subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"3. forkview mi with nothing left (trace {tid}, hsic): {med:.2f} s end to end "
          f"(median of 3); goal <= {MI_GOAL} s: {'meets' if med <= MI_GOAL else 'misses'}")
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    from models.llama_backend import INSTALL_HINT, available

    if not available():
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    ratio = bench_decode(args.tokens, args.reps)
    with tempfile.TemporaryDirectory() as d:
        ready = bench_startup(Path(d))
        mi = bench_mi_nothing_left(Path(d))
    bench_branches()
    print(f"\nsummary: decode ratio {ratio:.3f} (>= {DECODE_GOAL}), explorer ready "
          f"{ready:.2f} s (<= {READY_GOAL}), mi nothing left {mi:.2f} s (<= {MI_GOAL})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
