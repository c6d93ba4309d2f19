"""Batched annotation throughput on models of real sizes, prepared to run as is on a GPU.

    uv run python benchmarks/bench_gpu_annotate.py [--sizes 0.5b,1.5b] [--batch 16]
        [--tokens 128] [--prompt-tokens 64] [--dtype bfloat16] [--device cuda] [--reps 3]
    uv run python benchmarks/bench_gpu_annotate.py --sizes tiny --device cpu --dtype float32
        (a smoke run of the script itself, anywhere)

Throughput does not depend on the weights, so the models are built from Qwen2-style
configs of the published 0.5B and 1.5B sizes (hidden 896 / 1536, 24 / 28 layers, 14 / 12
heads with 2 key-value heads, vocabulary 151,936) with random weights: no download.
For each size, side by side and alternating which goes first after one warm-up of each:
- annotated: `models.branch.grow_branches` (what `forkview annotate --prompts ...
  --samples N` does per prompt): N rows in one lock-step batch from one prompt, every
  token with its full-vocabulary entropy, log-prob, rank and top-10;
- plain: `model.generate` with the same batch, sampling at T = 1, same lengths
  (min_new_tokens = max_new_tokens, so both make exactly the same number of tokens).
Printed per size: tokens/s of each and annotated / plain (the cost of annotation at
scale), peak GPU memory. Not a test: no GPU here; run it where there is one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Qwen2.5-0.5B and Qwen2.5-1.5B shapes (their published configs); "tiny" for smoke runs.
SIZES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2048),
}


def build(size: str, dtype: str, device: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from models.loading import wrap_model

    cfg = Qwen2Config(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=True,
                      rope_theta=1e6, torch_dtype=dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    return wrap_model(model, tokenizer(SIZES[size]["vocab_size"]), name=f"qwen2-{size}")


def tokenizer(vocab: int):
    """A word-level tokenizer with one token per id ("t0", "t1", ...; the last is EOS),
    so any sampled id decodes: the annotation's text work is done as for a real model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{vocab - 1}",
                                   pad_token=f"t{vocab - 1}")


def measure(size: str, args: argparse.Namespace) -> None:
    """One size: annotated and plain batched decoding, side by side."""
    import torch

    from models.branch import BranchRequest, grow_branches
    from models.types import GenerationParams

    lm = build(size, args.dtype, args.device)
    prompt = list(range(10, 10 + args.prompt_tokens))

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def annotated(n: int = args.tokens) -> int:
        reqs = [BranchRequest((), GenerationParams(max_new_tokens=n, temperature=1.0,
                                                   seed=i)) for i in range(args.batch)]
        outs = grow_branches(lm, prompt, [], 0, reqs)
        sync()
        return sum(len(o.token_ids) for o in outs)

    def plain(n: int = args.tokens) -> int:
        ids = torch.tensor([prompt] * args.batch, device=lm.model.device)
        with torch.inference_mode():
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=n, min_new_tokens=n, do_sample=True,
                                    temperature=1.0, top_k=0, top_p=1.0,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        sync()
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    annotated(4)
    plain(4)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates: dict[str, list[float]] = {"annotated": [], "plain": []}
    for rep in range(args.reps):
        for name in (("annotated", "plain") if rep % 2 == 0 else ("plain", "annotated")):
            t0 = time.perf_counter()
            n = annotated() if name == "annotated" else plain()
            rates[name].append(n / (time.perf_counter() - t0))
    a, p = statistics.median(rates["annotated"]), statistics.median(rates["plain"])
    mem = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
           if args.device == "cuda" else "")
    n_params = sum(x.numel() for x in lm.model.parameters()) / 1e9
    print(f"{size} ({n_params:.2f} B parameters, {args.dtype}, {args.device}{mem}): "
          f"batch {args.batch} x {args.tokens} tokens after {args.prompt_tokens}")
    print(f"  annotated {a:9.1f} tok/s   plain generate {p:9.1f} tok/s   "
          f"annotated / plain = {a / p:.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5b,1.5b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine, or pass --device cpu "
              "--dtype float32 --sizes tiny for a smoke run", file=sys.stderr)
        return 1
    for size in args.sizes.split(","):
        measure(size, args)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
