"""Time to first token, cold vs warm start of the default model.

    uv run python benchmarks/bench_startup.py [--warm-runs 2]

Each start is a fresh `python -c` process that imports forkview's model code, loads
the default model on the CPU and generates one annotated token. Cold: FORKVIEW_CACHE
points at a new empty directory, so the embedded GGUF is dequantised and cached.
Warm: the same directory again, cache built. Goal: warm / cold <= 0.25.
Not a test: timings depend on the machine, its load and the OS file cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.25

# Runs in the child. `spawn` is the parent's wall clock just before starting the
# process, so time to first token includes interpreter start-up.
CHILD = r"""
import json, sys, time
spawn = float(sys.argv[1])
t0 = time.perf_counter()
import torch, transformers
from models.generate import encode_prompt, stream_annotated
from models.loading import load_model
from models.types import GenerationParams
t1 = time.perf_counter()
# transformers imports most of itself lazily on the first from_pretrained (weight
# loading pulls in torch.distributed); done here so `load` is the loading proper.
import transformers.core_model_loading, transformers.models.llama.modeling_llama
t1b = time.perf_counter()
lm = load_model("default", device="cpu")
t2 = time.perf_counter()
ids = encode_prompt(lm, "What is 2 + 3?")
step = next(iter(stream_annotated(lm, ids, GenerationParams(max_new_tokens=1))))
t3 = time.perf_counter()
print(json.dumps({
    "ttft": time.time() - spawn, "import": t1 - t0, "lazy_import": t1b - t1, "load": t2 - t1b,
    "first_token": t3 - t2, "from_cache": lm.from_cache, "token": step.text,
}))
"""


def run_once(cache: Path) -> dict[str, float]:
    env = dict(os.environ, FORKVIEW_CACHE=str(cache), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    spawn = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, repr(spawn)], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=False)
    wall = time.time() - spawn
    if out.returncode != 0:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["startup"] = result["ttft"] - sum(
        result[k] for k in ("import", "lazy_import", "load", "first_token"))
    result["wall"] = wall
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warm-runs", type=int, default=2)
    args = ap.parse_args(argv)

    runs: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="forkview-bench-cache-") as tmp:
        cache = Path(tmp)
        for kind in ["cold"] + ["warm"] * max(1, args.warm_runs):
            r = run_once(cache)
            expected_cache = kind == "warm"
            if bool(r["from_cache"]) != expected_cache:
                raise SystemExit(f"{kind} run had from_cache={r['from_cache']}")
            runs.append((kind, r))
            print(f"{kind}: time to first token {r['ttft']:5.1f} s = interpreter "
                  f"{r['startup']:4.2f} + imports {r['import']:4.1f} + lazy transformers "
                  f"imports {r['lazy_import']:4.1f} + load {r['load']:4.1f} + first token "
                  f"{r['first_token']:4.2f}", flush=True)

    cold = runs[0][1]["ttft"]
    warm = statistics.median(r["ttft"] for k, r in runs if k == "warm")
    ratio = warm / cold
    verdict = "meets" if ratio <= GOAL else "misses"
    print(f"\ncold {cold:.1f} s, warm {warm:.1f} s (median of {len(runs) - 1}), "
          f"warm / cold = {ratio:.3f}; goal <= {GOAL}: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
