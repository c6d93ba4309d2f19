"""Answer gain over a whole trace vs generating that trace: what does `answer-gain` cost?

    uv run python benchmarks/bench_answer_gain.py [--tokens 128] [--reps 3] [--threads N]

Generates a greedy trace of --tokens tokens with `stream_annotated` (annotated, KV
cached), then times `models.answer_gain.answer_gain` over every position of it
(stride 1: n + 1 teacher-forced scores of cue + answer, each on a cropped KV cache)
and, for information, with stride 4. After one warm-up of each, the variants run
interleaved (rotating order) and medians are printed. Goal: answer-gain / generation
<= 2 (time ratio). Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL = 2.0
PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
          "clips in May. How many clips did Natalia sell altogether in April and May? "
          "Explain your reasoning step by step.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128, help="trace length")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="default")
    ap.add_argument("--answer", default="72", help="answer scored (default: the true one)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args(argv)

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from models.answer_gain import answer_gain
    from models.generate import encode_prompt, stream_annotated
    from models.loading import load_model
    from models.types import GenerationParams

    lm = load_model(args.model, device=args.device)
    prompt_ids = encode_prompt(lm, PROMPT)
    params = GenerationParams(max_new_tokens=args.tokens, temperature=0.0)

    def generate() -> list[int]:
        return [s.token_id for s in stream_annotated(lm, prompt_ids, params)]

    tokens = generate()
    n = len(tokens)
    variants = {
        "generate": generate,
        "answer-gain": lambda: answer_gain(lm, prompt_ids, tokens, args.answer),
        "answer-gain stride 4": lambda: answer_gain(lm, prompt_ids, tokens, args.answer,
                                                    stride=4),
    }
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for rep in range(max(1, args.reps)):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"rep {rep + 1}: " + "  ".join(f"{k} {times[k][-1]:.2f}s" for k in names),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = answer_gain(lm, prompt_ids, tokens, args.answer)
    print()
    print(f"model {lm.name} on {lm.device} ({lm.dtype}), torch threads "
          f"{torch.get_num_threads()}, prompt {len(prompt_ids)} tokens, trace {n} tokens, "
          f"answer {args.answer!r} = {len(res.params['answer_token_ids'])} tokens, cue "
          f"{len(res.params['cue_token_ids'])} tokens, {len(times['generate'])} reps")
    for k in names:
        print(f"  {k:21} {med[k]:7.2f} s (median; min {min(times[k]):.2f}, "
              f"max {max(times[k]):.2f})")
    ratio = med["answer-gain"] / med["generate"]
    verdict = "meets" if ratio <= GOAL else "misses"
    print(f"answer-gain / generate = {ratio:.3f} (time); goal <= {GOAL}: {verdict}")
    print(f"answer-gain stride 4 / generate = "
          f"{med['answer-gain stride 4'] / med['generate']:.3f} (information only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
