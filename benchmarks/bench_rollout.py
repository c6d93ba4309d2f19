"""Rollout continuations: one batch on the prefix's KV cache vs plain `generate`.

    uv run python benchmarks/bench_rollout.py [--samples 8] [--tokens 48] [--reps 3]
        [--serial-rows 6] [--threads N] [--device cpu]

A greedy trace of the default model is generated; at its highest-entropy position t
(t >= 4) the top 3 tokens are the alternatives, each continued --samples times (batch
3 x S = 24 by default) for exactly --tokens sampled tokens at T = 1 (EOS disabled on
every side, so all variants produce the same number of tokens). Variants:

- rollout: `models.rollout.rollout_position`, end to end (prefix encoded once, cache
  repeated over the batch, lock-step sampling, per-token annotation, answer
  extraction and the estimate);
- rollout, no annotation: the same with annotate=False (information);
- generate batched: `model.generate(do_sample=True)` on the 24 rows prefix + w (it
  encodes the prefix for every row);
- one at a time: `model.generate` on one row at a time; --serial-rows rows are timed
  (a rate: each row costs the same, so fewer rows give the same tokens/s).

After a warm-up of each, the variants run interleaved (rotating order); medians of
tokens/s are printed. Goals: rollout / generate batched >= 0.8; rollout / one at a
time >= 4. Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL_BATCHED = 0.8
GOAL_SERIAL = 4.0
PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
          "clips in May. How many clips did Natalia sell altogether in April and May?")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8, help="continuations per alternative")
    ap.add_argument("--alternatives", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48, help="sampled tokens per continuation")
    ap.add_argument("--trace", type=int, default=48, help="greedy trace length")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--serial-rows", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args(argv)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from models.generate import encode_prompt, stream_annotated
    from models.loading import load_model
    from models.rollout import rollout_position
    from models.types import GenerationParams

    lm = load_model(args.model, device=args.device)
    device = next(lm.model.parameters()).device
    prompt = encode_prompt(lm, PROMPT)
    steps = list(stream_annotated(lm, prompt, GenerationParams(max_new_tokens=args.trace)))
    trace = [s.token_id for s in steps]
    t = max(range(min(4, len(steps) - 1), len(steps)), key=lambda i: steps[i].entropy)
    alts = [a.token_id for a in steps[t].top[: args.alternatives]]
    if trace[t] not in alts:
        alts[-1] = trace[t]  # the emitted token is always among the alternatives
    rows = len(alts) * args.samples
    n = args.tokens
    prefix = prompt + trace[:t]
    pad = lm.tokenizer.pad_token_id
    pad = pad if pad is not None else next(iter(lm.eos_token_ids))

    def ours(annotate: bool = True) -> int:
        res = rollout_position(lm, prompt, trace, t, samples=args.samples, alternatives=alts,
                               max_new_tokens=n, eos_token_ids=(), annotate=annotate)
        return res.generated_tokens

    @torch.inference_mode()
    def generate(batch: list[int]) -> int:
        ids = torch.tensor([[*prefix, w] for w in batch], device=device)
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    row_tokens = [w for w in alts for _ in range(args.samples)]
    variants = {
        "rollout": ours,
        "rollout, no annotation": lambda: ours(annotate=False),
        "generate batched": lambda: generate(row_tokens),
        "one at a time": lambda: sum(generate([w]) for w in row_tokens[: args.serial_rows]),
    }
    for fn in variants.values():
        fn()
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(max(1, args.reps)):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            t0 = time.perf_counter()
            produced = variants[name]()
            speeds[name].append(produced / (time.perf_counter() - t0))
        print(f"rep {rep + 1}: " + "  ".join(f"{k} {speeds[k][-1]:.1f}" for k in names),
              flush=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    print()
    print(f"model {lm.name} on {lm.device} ({lm.dtype}), torch threads "
          f"{torch.get_num_threads()}; prompt {len(prompt)} tokens, fork at t = {t} "
          f"(entropy {steps[t].entropy:.2f} nats, prefix {len(prefix)} tokens); "
          f"{len(alts)} alternatives x {args.samples} samples = batch {rows}, {n} sampled "
          f"tokens each; {len(speeds['rollout'])} reps")
    for k in names:
        print(f"  {k:23} {med[k]:7.1f} tok/s (median; min {min(speeds[k]):.1f}, "
              f"max {max(speeds[k]):.1f})")
    r_batched = med["rollout"] / med["generate batched"]
    r_serial = med["rollout"] / med["one at a time"]
    print(f"rollout / generate batched = {r_batched:.2f}; goal >= {GOAL_BATCHED}: "
          f"{'meets' if r_batched >= GOAL_BATCHED else 'misses'}")
    print(f"rollout / one at a time    = {r_serial:.2f}; goal >= {GOAL_SERIAL}: "
          f"{'meets' if r_serial >= GOAL_SERIAL else 'misses'}")
    print(f"rollout without annotation / generate batched = "
          f"{med['rollout, no annotation'] / med['generate batched']:.2f} (information)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
