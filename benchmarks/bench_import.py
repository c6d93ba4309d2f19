"""`forkview import` vs generation: teacher-forced scoring of traces made elsewhere,
against generating the same tokens (Hugging Face engine).

    uv run python benchmarks/bench_import.py [--prompts 8] [--tokens 96] [--reps 3]

The default model generates --prompts greedy traces of up to --tokens tokens each
(forkview.pipeline.annotate_prompt: annotated decoding, stored); their texts go into a
JSONL file with the exact token ids, as a vLLM run would write it; `import_file` then
tokenises, scores teacher-forced in batches (8 traces per forward pass) and stores the
same tokens. Both paths write to their own database; the timings include storing.
Generation and import alternate, rotating order every repetition; medians are printed.
Goal: import / generate <= 0.2 (time per token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOAL = 0.2
PROMPTS = [
    "Tom has 3 boxes with 12 apples each. He gives away 7 apples. How many are left?",
    "A train travels 60 km in 45 minutes. What is its speed in km per hour?",
    "What is the sum of the first 20 positive integers? Explain briefly.",
    "Sara reads 15 pages a day. How many days does a 240-page book take her?",
    "A rectangle is 7 cm by 9 cm. What are its area and its perimeter?",
    "If 4 pens cost 6 dollars, how much do 10 pens cost?",
    "Write the prime numbers between 30 and 60 and count them.",
    "A shop sells a 80 dollar coat at 25% off. What is the new price?",
    "How many minutes are there in 3.5 hours? Show the steps.",
    "Explain why the sum of two odd numbers is even.",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    from forkview.importer import import_file
    from forkview.pipeline import annotate_prompt
    from models.loading import load_model
    from models.types import GenerationParams
    from store import Store

    lm = load_model("default", device="cpu")
    params = GenerationParams(max_new_tokens=args.tokens)
    prompts = (PROMPTS * ((args.prompts + len(PROMPTS) - 1) // len(PROMPTS)))[:args.prompts]
    tmp = Path(tempfile.mkdtemp())
    counter = iter(range(10_000))

    def generate() -> tuple[int, list[dict]]:
        store = Store.open(tmp / f"gen{next(counter)}.db")
        rows, n = [], 0
        for i, p in enumerate(prompts):
            r = annotate_prompt(lm, store, p, params)
            ids = [s.token_id for s in r.steps]
            n += len(ids)
            rows.append({"id": f"q{i}", "prompt": p, "response": r.text, "token_ids": ids})
        store.close()
        return n, rows

    n_tokens, rows = generate()  # warm-up, and the file to import
    src = tmp / "traces.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def do_import() -> int:
        store = Store.open(tmp / f"imp{next(counter)}.db")
        summary = import_file(lm, store, src)
        store.close()
        if summary.skipped:
            raise SystemExit(f"import skipped lines: {summary.skipped[0]}")
        return summary.tokens

    do_import()  # warm-up
    times: dict[str, list[float]] = {"generate": [], "import": []}
    for rep in range(max(3, args.reps)):
        order = ["generate", "import"] if rep % 2 == 0 else ["import", "generate"]
        for name in order:
            t0 = time.perf_counter()
            n = generate()[0] if name == "generate" else do_import()
            times[name].append((time.perf_counter() - t0) / n)
        print(f"rep {rep + 1}: generate {1 / times['generate'][-1]:.1f} tok/s, import "
              f"{1 / times['import'][-1]:.1f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["import"] / med["generate"]
    print(f"\n{lm.name} on {lm.device} ({lm.dtype}): {len(prompts)} traces, {n_tokens} "
          f"tokens; generate {1 / med['generate']:.1f} tok/s, import "
          f"{1 / med['import']:.1f} tok/s (medians, storing included)")
    print(f"import / generate (time per token) = {ratio:.3f}; goal <= {GOAL}: "
          f"{'meets' if ratio <= GOAL else 'misses'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
