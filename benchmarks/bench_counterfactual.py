"""A counterfactual category run against plain batched `generate` at the same batch size.

    uv run python benchmarks/bench_counterfactual.py [--per-category 2] [--samples 4]
        [--tokens 32] [--trace 64] [--reps 2] [--threads N]

A greedy trace of the default model; positions drawn as `forkview mi --positions
categories` draws them (forkview.analysis.categories.draw_categories; P from a stand-in
MI series, the trace's entropy plus noise, which only decides where the positions fall).
Variants, interleaved after a warm-up of each, medians of sampled tokens/s:
- category run: `models.rollout.rollout_positions` over those positions, end to end
  (one prefix cache cropped per position, every alternative x S rows in one batch,
  answers, the counterfactual per position; continuations not annotated, as with
  keep_tokens=false, sample_db's setting), EOS off;
- generate batched: at each of the same positions, `model.generate(do_sample=True)` on
  the same rows (prefix + alternative, same batch size), the same sampled tokens.
Goal (issue 10): category run / generate batched >= 0.8. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL = 0.8
PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
          "clips in May. How many clips did Natalia sell altogether in April and May?")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--trace", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from forkview.analysis.categories import draw_categories
    from models.generate import encode_prompt, stream_annotated
    from models.loading import load_model
    from models.rollout import rollout_positions
    from models.types import GenerationParams

    lm = load_model("default", device="cpu")
    prompt = encode_prompt(lm, PROMPT)
    steps = list(stream_annotated(lm, prompt, GenerationParams(max_new_tokens=args.trace)))
    trace = [s.token_id for s in steps]
    rng = np.random.default_rng(0)
    mi = {i: float(s.entropy + rng.normal(0, 0.5)) for i, s in enumerate(steps)}
    draw = draw_categories([s.entropy for s in steps], mi, [s.text for s in steps],
                           per_category=args.per_category, seed=0)
    positions = draw.positions
    n = args.tokens
    results = list(rollout_positions(lm, prompt, trace, positions, samples=args.samples,
                                     max_new_tokens=1, eos_token_ids=()))
    rows_at = {r.position: [a.token_id for a in r.alternatives for _ in range(args.samples)]
               for r in results}
    pad = lm.tokenizer.pad_token_id
    pad = pad if pad is not None else next(iter(lm.eos_token_ids))

    def category_run() -> int:
        return sum(r.generated_tokens for r in rollout_positions(
            lm, prompt, trace, positions, samples=args.samples, max_new_tokens=n,
            eos_token_ids=(), annotate=False))

    @torch.inference_mode()
    def generate_batched() -> int:
        made = 0
        for t, rows in rows_at.items():
            prefix = prompt + trace[:t]
            ids = torch.tensor([[*prefix, w] for w in rows])
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=n - 1, min_new_tokens=n - 1,
                                    pad_token_id=pad)
            # the forced token counts as the first of n, as in the category run
            made += out.shape[0] * (out.shape[1] - ids.shape[1] + 1)
        return made

    variants = {"category run": category_run, "generate batched": generate_batched}
    for fn in variants.values():
        fn()
    speeds: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(max(1, args.reps)):
        for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
            t0 = time.perf_counter()
            made = variants[name]()
            speeds[name].append(made / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    batch = statistics.mean(len(r) for r in rows_at.values())
    per = ", ".join(f"{c} {len(draw.of(c))}" for c in ("e_only", "p_only", "both", "control"))
    print(f"model {lm.name}, torch threads {torch.get_num_threads()}; {len(positions)} "
          f"positions ({per}), mean batch {batch:.1f} rows, {n} tokens a row; "
          f"{args.reps} reps")
    for k, v in med.items():
        print(f"  {k:17} {v:7.1f} tok/s (median)")
    ratio = med["category run"] / med["generate batched"]
    print(f"category run / generate batched = {ratio:.2f}; goal >= {GOAL}: "
          f"{'meets' if ratio >= GOAL else 'misses'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
