"""MI-Peaks' HSIC per token: batched ``HsicTarget.scores`` vs the literal ``hsic_direct``.

    uv run python benchmarks/bench_hsic.py [--dims 576 4096] [--tokens 8 3]
        [--bandwidth 50|median] [--method lowrank|dense] [--npz FILE]

Same inputs for both: synthetic last-layer hidden states (Student-t, scale 30, like
SmolLM2-135M's), token i = rho_i * h_y + noise, or real ones from an .npz with arrays
H (n, d) and hy (d,). hsic_direct is timed token by token; HsicTarget is built once
(setup, shown apart: once per trace) then scores all tokens in one call. Prints the
per-token times, the speed ratio (goal >= 2x) and the largest relative difference.
Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.hsic import HsicTarget, hsic_direct

GOAL = 2.0


def synthetic(d: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hy = rng.standard_t(4, d) * 30.0
    rho = np.linspace(0.0, 0.9, n)[:, None]
    hs = rho * hy + np.sqrt(1 - rho**2) * rng.standard_t(4, (n, d)) * 30.0
    return hs, hy


def bench(hs: np.ndarray, hy: np.ndarray, bandwidth: float | str, method: str) -> float:
    n, d = hs.shape
    t0 = time.perf_counter()
    want = np.array([hsic_direct(h, hy, sigma=bandwidth) for h in hs])
    t_direct = (time.perf_counter() - t0) / n

    HsicTarget(hy, bandwidth=bandwidth, method=method).scores(hs[:1])  # warm-up
    t0 = time.perf_counter()
    target = HsicTarget(hy, bandwidth=bandwidth, method=method)
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = target.evaluate(hs)
    t_scores = (time.perf_counter() - t0) / n

    rel = float(np.max(np.abs(res.values - want) / np.abs(want)))
    ratio = t_direct / t_scores
    ratio_setup = t_direct / (t_scores + t_setup / n)
    print(f"d={d:5d} n={n:3d}  direct {t_direct * 1e3:10.1f} ms/token   "
          f"target {t_scores * 1e3:8.2f} ms/token (+ setup {t_setup * 1e3:.1f} ms/trace)")
    print(f"        speed-up x{ratio:.0f} (x{ratio_setup:.0f} with setup over these {n} tokens)"
          f"  max rel diff {rel:.1e}  error bound {res.params.get('error_bound_max', 0):.1e}"
          f"  dense tokens {len(res.params.get('dense_tokens', []))}"
          f"  scores {np.round(want[:3], 4).tolist()}...")
    return ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[576, 4096])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 3],
                    help="tokens per dimension (direct is slow at d = 4096)")
    ap.add_argument("--bandwidth", default="50", help="sigma (float) or 'median'")
    ap.add_argument("--method", default="lowrank", choices=["lowrank", "dense"])
    ap.add_argument("--npz", type=Path, help="real hidden states: arrays H (n, d), hy (d,)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    bandwidth = args.bandwidth if args.bandwidth == "median" else float(args.bandwidth)
    print(f"bandwidth={bandwidth} method={args.method} (float64, numpy "
          f"{np.__version__})")
    if args.npz:
        data = np.load(args.npz)
        cases = [(data["H"][: args.tokens[0]].astype(np.float64), data["hy"])]
    else:
        tokens = (args.tokens * len(args.dims))[: len(args.dims)] if len(args.tokens) == 1 \
            else args.tokens
        cases = [synthetic(d, n, args.seed) for d, n in zip(args.dims, tokens, strict=True)]
    ratios = [bench(hs, hy, bandwidth, args.method) for hs, hy in cases]
    ok = min(ratios) >= GOAL
    print(f"goal x{GOAL:.0f}: {'met' if ok else 'NOT met'} (worst x{min(ratios):.0f})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
