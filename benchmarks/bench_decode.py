"""Annotated decoding vs plain `model.generate`: what does annotating every token cost?

    uv run python benchmarks/bench_decode.py [--tokens 128] [--reps 5] [--device cpu]

Same model, same prompt, same greedy tokens, same length. After one warm-up of each,
the variants run interleaved (rotating order each repetition) so background load
and thermal drift hit them alike; medians are printed. Goal: annotated / plain
>= 0.95. Capturing the last layer's hidden state (what MI needs) is shown for
information. Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL = 0.95
PROMPT = ("Write a detailed story about a lighthouse keeper who finds a message in a "
          "bottle. Describe the weather, the sea and what the keeper decides to do.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (>= 3)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's choice, one per core)")
    args = ap.parse_args(argv)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from models.generate import encode_prompt, stream_annotated
    from models.loading import load_model
    from models.types import GenerationParams

    lm = load_model(args.model, device=args.device)
    prompt_ids = encode_prompt(lm, PROMPT)
    device = next(lm.model.parameters()).device
    params = GenerationParams(max_new_tokens=args.tokens, temperature=0.0)

    def annotated(hidden_layer: int | None = None) -> list[int]:
        return [s.token_id for s in stream_annotated(lm, prompt_ids, params,
                                                      hidden_layer=hidden_layer)]

    # The greedy run may end at EOS before --tokens; plain generate is then held to
    # exactly that length (min = max) so both decode the same number of tokens.
    reference = annotated()
    n = len(reference)
    input_ids = torch.tensor([prompt_ids], device=device)
    mask = torch.ones_like(input_ids)
    pad = lm.tokenizer.pad_token_id
    pad = pad if pad is not None else next(iter(lm.eos_token_ids))

    @torch.inference_mode()
    def plain() -> list[int]:
        out = lm.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                max_new_tokens=n, min_new_tokens=n, pad_token_id=pad,
                                temperature=None, top_p=None, top_k=None)
        return out[0, len(prompt_ids):].tolist()

    same = plain() == reference
    variants = {"annotated": annotated, "plain": plain,
                "annotated+hidden": lambda: annotated(hidden_layer=-1)}
    for fn in variants.values():  # warm-up: allocator, caches, lazy imports
        fn()

    speeds: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(max(3, args.reps)):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            t0 = time.perf_counter()
            ids = variants[name]()
            dt = time.perf_counter() - t0
            if len(ids) != n:
                raise SystemExit(f"{name} produced {len(ids)} tokens, expected {n}")
            speeds[name].append(n / dt)
        print(f"rep {rep + 1}: " + "  ".join(f"{k} {speeds[k][-1]:.1f}" for k in names),
              flush=True)

    med = {k: statistics.median(v) for k, v in speeds.items()}
    ratio = med["annotated"] / med["plain"]
    ratio_h = med["annotated+hidden"] / med["plain"]
    per_rep = statistics.median(a / p for a, p in zip(speeds["annotated"], speeds["plain"],
                                                       strict=True))
    print()
    print(f"model {lm.name} on {lm.device} ({lm.dtype}), torch threads "
          f"{torch.get_num_threads()}, prompt {len(prompt_ids)} tokens, {n} new tokens, "
          f"{len(speeds['plain'])} reps; same tokens as generate: {same}")
    for k in names:
        print(f"  {k:17} {med[k]:6.1f} tok/s (median; min {min(speeds[k]):.1f}, "
              f"max {max(speeds[k]):.1f})")
    verdict = "meets" if ratio >= GOAL else "misses"
    print(f"annotated / plain = {ratio:.3f} (median of per-rep ratios {per_rep:.3f}); "
          f"goal >= {GOAL}: {verdict}")
    print(f"annotated+hidden / plain = {ratio_h:.3f} (information only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
