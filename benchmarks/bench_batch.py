"""Batch annotation: N samples of a prompt as one batch vs one at a time.

    uv run python benchmarks/bench_batch.py [--prompts 3] [--samples 8] [--tokens 32]
                                            [--threads 1] [--model default]

What `forkview annotate --prompts ... --samples N` does per prompt (one
`models.branch.grow_branches` call from position 0 with N seeded rows, every token
annotated) against what one `annotate` per sample does (`models.generate.
stream_annotated`, N times), on the first prompts of builtin:arith, same seeds (as the
batch derives them), same max_new_tokens, sampling at T = 1. The two run side by side
per prompt, alternating which goes first, after one warm-up of each. Printed: wall time,
tokens and tokens/s of each, the speed-up (goal >= 3x), and whether every batched row
produced the same token ids as its one-at-a-time twin. Database writes are left out of
both (they are the same per token). Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL = 3.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=3, help="prompts of builtin:arith")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt")
    ap.add_argument("--tokens", type=int, default=32, help="max_new_tokens")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: steadier on a shared machine; "
                    "0 = torch's choice)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from dataclasses import replace

    from forkview.batch import plan_jobs
    from forkview.prompt_sets import arith_problems
    from models.branch import BranchRequest, grow_branches
    from models.generate import encode_prompt, stream_annotated
    from models.loading import load_model
    from models.types import GenerationParams

    lm = load_model(args.model, device=args.device)
    items = arith_problems(args.prompts)
    params = GenerationParams(max_new_tokens=args.tokens, temperature=1.0, seed=0)
    groups = plan_jobs(items, args.samples, params)
    encoded = [encode_prompt(lm, it.prompt) for it in items]

    def batched(ids: list[int], jobs) -> list[list[int]]:
        outs = grow_branches(lm, ids, [], 0, [BranchRequest((), j.params) for j in jobs])
        return [o.token_ids for o in outs]

    def one_at_a_time(ids: list[int], jobs) -> list[list[int]]:
        return [[s.token_id for s in stream_annotated(lm, ids, j.params)] for j in jobs]

    # Warm-up (first calls allocate and pick kernels): 4 tokens each.
    warm = [replace(j, params=replace(j.params, max_new_tokens=4)) for j in groups[0][:2]]
    batched(encoded[0], warm)
    one_at_a_time(encoded[0], warm)

    t_batch = t_single = 0.0
    n_batch = n_single = 0
    same = total = 0
    for i, (ids, jobs) in enumerate(zip(encoded, groups, strict=True)):
        order = ("batch", "single") if i % 2 == 0 else ("single", "batch")
        got = {}
        for which in order:
            t0 = time.perf_counter()
            got[which] = (batched if which == "batch" else one_at_a_time)(ids, jobs)
            dt = time.perf_counter() - t0
            n = sum(len(x) for x in got[which])
            if which == "batch":
                t_batch, n_batch = t_batch + dt, n_batch + n
            else:
                t_single, n_single = t_single + dt, n_single + n
        for a, b in zip(got["batch"], got["single"], strict=True):
            total += 1
            same += a == b
        print(f"prompt {items[i].id} ({len(ids)} prompt tokens): done", flush=True)

    threads = torch.get_num_threads()
    print()
    print(f"model {lm.name}, device {lm.device}, {threads} torch thread(s); "
          f"{len(items)} prompts x {args.samples} samples, max_new_tokens {args.tokens}, T = 1")
    print(f"{'variant':<24} {'seconds':>8} {'tokens':>7} {'tok/s':>7}")
    print(f"{'one at a time':<24} {t_single:8.2f} {n_single:7d} {n_single / t_single:7.1f}")
    print(f"{'batched (one per prompt)':<24} {t_batch:8.2f} {n_batch:7d} "
          f"{n_batch / t_batch:7.1f}")
    speedup = (n_batch / t_batch) / (n_single / t_single)
    verdict = "meets" if speedup >= GOAL else "misses"
    print(f"speed-up (tokens/s batched / one at a time): {speedup:.2f}x "
          f"(wall time ratio {t_single / t_batch:.2f}x); goal >= {GOAL:g}x: {verdict}")
    print(f"same token ids as one at a time: {same}/{total} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
