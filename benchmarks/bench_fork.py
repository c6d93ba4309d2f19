"""Branches: prefix reuse vs re-encoding, and N continuations batched vs one at a time.

    uv run python benchmarks/bench_fork.py [--prefix 1000] [--n 16] [--tokens 32]
        [--reps 5] [--threads N] [--model default] [--device cpu]

1. Time to first token of a branch at the end of a --prefix-token trace (prompt + the
   trace's tokens; the content does not matter for timing, so the trace is a long
   text's tokens): `grow_branches` with the trace's `PrefixCache` (built once per
   trace, as the explorer and `forkview fork` do; its cost is printed too) against the
   same call without it (the prompt + prefix is encoded for the branch). The branch
   is one forced token and nothing else (max_new_tokens = 0). Goal: reuse >= 5x faster.
2. N continuations sampled from one position for exactly --tokens tokens each (EOS
   disabled by forcing every row to run the full length: the tiny cost of a longer
   row is the same on both sides): one lock-step batch of N rows against N
   single-row calls, both on the same PrefixCache. Goal: batched >= 4x faster.

Variants run interleaved after a warm-up; medians are printed. Not a test: timings
depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL_REUSE = 5.0
GOAL_BATCH = 4.0
TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. So in May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = "
        "72 clips in April and May. ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", type=int, default=1000, help="trace tokens before the fork")
    ap.add_argument("--n", type=int, default=16, help="continuations")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per continuation")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args(argv)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from models.branch import BranchRequest, PrefixCache, grow_branches
    from models.generate import encode_prompt
    from models.loading import load_model
    from models.types import GenerationParams

    lm = load_model(args.model, args.device)
    prompt = encode_prompt(lm, "Tell the story of Natalia's clips, at length.")
    ids: list[int] = []
    while len(ids) < args.prefix + 1:
        ids += lm.tokenizer.encode(TEXT, add_special_tokens=False)
    ids = ids[: args.prefix + 1]
    pos = args.prefix  # the branch replaces token `prefix`: prompt + prefix tokens before it
    print(f"model {lm.name} on {lm.device}, {torch.get_num_threads()} threads; prompt "
          f"{len(prompt)} + prefix {pos} tokens")

    t0 = time.perf_counter()
    cache = PrefixCache(lm, prompt, ids)
    build = time.perf_counter() - t0
    one = [BranchRequest((ids[pos],), GenerationParams(max_new_tokens=0))]

    def ttft(use_cache: bool) -> float:
        t = time.perf_counter()
        grow_branches(lm, prompt, ids, pos, one, prefix_cache=cache if use_cache else None)
        return time.perf_counter() - t

    ttft(True), ttft(False)  # warm-up
    reuse, fresh = [], []
    for _ in range(args.reps):
        reuse.append(ttft(True))
        fresh.append(ttft(False))
    r, f = statistics.median(reuse), statistics.median(fresh)
    print("\n1. time to first token of a branch")
    print(f"  PrefixCache built once per trace     {build * 1000:8.1f} ms")
    print(f"  with the trace's prefix cache        {r * 1000:8.1f} ms (median of {args.reps})")
    print(f"  re-encoding prompt + prefix          {f * 1000:8.1f} ms")
    print(f"  re-encoding / reuse = {f / r:.1f}x  (goal >= {GOAL_REUSE:g}x)  "
          f"{'met' if f / r >= GOAL_REUSE else 'MISSED'}")

    # 2. N continuations from a shorter prefix (a typical fork in a reasoning trace).
    short = min(pos, 200)
    cache2 = PrefixCache(lm, prompt, ids[:short + 1])
    eos = sorted(lm.eos_token_ids)
    params = [GenerationParams(max_new_tokens=args.tokens, temperature=1.0, seed=s,
                               top_k=0) for s in range(args.n)]

    def run(batched: bool) -> tuple[float, int]:
        t = time.perf_counter()
        if batched:
            outs = grow_branches(lm, prompt, ids, short,
                                 [BranchRequest((), p) for p in params], prefix_cache=cache2)
        else:
            outs = [grow_branches(lm, prompt, ids, short, [BranchRequest((), p)],
                                  prefix_cache=cache2)[0] for p in params]
        return time.perf_counter() - t, sum(len(o.steps) for o in outs)

    # EOS would end rows at different times on the two sides only through float noise;
    # hide it so both make exactly n x tokens tokens.
    saved = lm.model.generation_config.eos_token_id, lm.tokenizer.eos_token_id
    lm.model.generation_config.eos_token_id = None
    tok_eos = lm.tokenizer.eos_token
    lm.tokenizer.eos_token = None
    try:
        run(True), run(False)
        tb, ts = [], []
        for _ in range(max(1, args.reps // 2)):
            sec, n = run(True)
            tb.append(n / sec)
            sec, n = run(False)
            ts.append(n / sec)
    finally:
        lm.model.generation_config.eos_token_id = saved[0]
        lm.tokenizer.eos_token = tok_eos
    b, s = statistics.median(tb), statistics.median(ts)
    print(f"\n2. {args.n} continuations x {args.tokens} tokens from a {short}-token prefix "
          f"(EOS ids {eos} disabled)")
    print(f"  one batch of {args.n}                   {b:8.1f} tok/s")
    print(f"  one at a time                      {s:8.1f} tok/s")
    print(f"  batched / one at a time = {b / s:.1f}x  (goal >= {GOAL_BATCH:g}x)  "
          f"{'met' if b / s >= GOAL_BATCH else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
