"""The engine seam and the llama.cpp engine.

The numpy statistics (models/decoding.py) are checked against the torch ones on the
same logits everywhere. The llama.cpp engine's tests need the optional `llama` extra
(llama-cpp-python) and skip without it; `.ci/run` installs the extra and runs them.
Measured on the embedded GGUF (SmolLM2-135M-Instruct Q4_1) against the dequantised
transformers model, teacher-forced on the same tokens: mean |ΔH| 0.024-0.050 nats per
trace, max 0.22 (quantised matmuls); the bounds below are those figures with margin.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from models.decoding import row_stats, sampling_logits_np
from models.engine import BACKENDS, for_needs
from models.errors import ModelError
from models.generate import _annotate, sampling_logits
from models.llama_backend import TOLERANCE_MAX_NATS as MAX_DH
from models.llama_backend import TOLERANCE_MEAN_NATS as MEAN_DH
from models.llama_backend import available
from models.types import GenerationParams

HAVE_LLAMA = available()
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="needs the `llama` extra "
                                 "(llama-cpp-python)")

PROMPTS = ["What is 12 times 7?", "Name three primary colours.",
           "Solve: 3x + 5 = 20. Give x.", "Write a haiku about entropy."]

# --- numpy statistics == torch statistics ----------------------------------------------

@pytest.mark.parametrize("params", [
    GenerationParams(),
    GenerationParams(temperature=1.0),
    GenerationParams(temperature=0.7, top_k=20),
    GenerationParams(temperature=1.3, top_p=0.9),
    GenerationParams(temperature=0.8, top_k=50, top_p=0.8, top_alternatives=5),
])
def test_numpy_row_stats_equal_torch(params):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 500)) * 3).astype(np.float32)
    chosen = rng.integers(0, 500, size=6)
    ref = _annotate(torch.from_numpy(logits), torch.from_numpy(chosen), params)
    for i in range(6):
        got = row_stats(logits[i], int(chosen[i]), params)
        assert got.logprob == pytest.approx(ref.logprob[i], abs=1e-5)
        assert got.rank == ref.rank[i]
        assert got.entropy == pytest.approx(ref.entropy[i], abs=1e-5)
        assert got.sampling_entropy == pytest.approx(ref.sampling_entropy[i], abs=1e-4)
        assert got.top_ids == ref.top_ids[i]
        assert got.top_probs == pytest.approx(ref.top_probs[i], abs=1e-6)


def test_numpy_sampling_mask_equals_torch():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(300) * 2).astype(np.float32)
    for params in (GenerationParams(temperature=0.9, top_k=7),
                   GenerationParams(temperature=1.0, top_p=0.5),
                   GenerationParams(temperature=2.0, top_k=40, top_p=0.7)):
        ours = np.isfinite(sampling_logits_np(logits, params))
        ref = torch.isfinite(sampling_logits(torch.from_numpy(logits)[None], params))[0]
        assert ours.tolist() == ref.tolist()


# --- the seam without the extra --------------------------------------------------------

def test_backends_listed():
    assert BACKENDS == ("hf", "llama.cpp")


def test_missing_extra_is_one_line(monkeypatch, capsys, tmp_path):
    import models.llama_backend as lb
    from forkview import cli

    monkeypatch.setattr(lb, "available", lambda: False)
    code = cli.main(["annotate", "--prompt", "hi", "--backend", "llama.cpp", "--db",
                     str(tmp_path / "x.db")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and "llama" in err[0] and "extra" in err[0]


def test_hf_model_needs_nothing_else(tiny_lm):
    assert for_needs(tiny_lm, {"hidden", "reference"}, "hsic") is tiny_lm


def test_llama_refuses_hf_directories(tiny_model_dir):
    if not HAVE_LLAMA:
        pytest.skip("needs the llama extra")
    from models.llama_backend import load_llama

    with pytest.raises(ModelError, match="GGUF"):
        load_llama(str(tiny_model_dir))


# --- the embedded GGUF on llama.cpp ----------------------------------------------------

@pytest.fixture(scope="module")
def llama_lm():
    if not HAVE_LLAMA:
        pytest.skip("needs the `llama` extra (llama-cpp-python)")
    from models.llama_backend import load_llama

    return load_llama("default")


@needs_llama
def test_prompt_ids_and_tokenizer_match_transformers(llama_lm, real_lm):
    from models.prompting import encode_prompt

    for p in PROMPTS:
        assert encode_prompt(llama_lm, p) == encode_prompt(real_lm, p)
        assert encode_prompt(llama_lm, p, system="Be brief.") == encode_prompt(
            real_lm, p, system="Be brief.")
        assert encode_prompt(llama_lm, p, raw=True) == encode_prompt(real_lm, p, raw=True)
    # Stored token ids mean the same on both engines (forks and rescoring rely on it).
    assert llama_lm.tokenizer_hash == real_lm.tokenizer_hash
    assert llama_lm.eos_token_ids & real_lm.eos_token_ids


@needs_llama
@pytest.mark.integration
def test_greedy_trace_agrees_with_transformers(llama_lm, real_lm):
    from models.engine import score_tokens, stream_annotated
    from models.prompting import encode_prompt

    ids = encode_prompt(llama_lm, PROMPTS[0])
    params = GenerationParams(max_new_tokens=48)
    ours = list(stream_annotated(llama_lm, ids, params))
    theirs = list(stream_annotated(real_lm, ids, params))
    # Same top-1 tokens on this greedy trace (measured: all of them, 64 of 64 at 64
    # tokens; other prompts diverge after 12-52 tokens, at near-ties).
    assert [s.token_id for s in ours] == [s.token_id for s in theirs]
    assert "".join(s.text for s in ours) == "".join(s.text for s in theirs)
    # Entropies of the same tokens, transformers teacher-forced.
    ref = score_tokens(real_lm, ids, [s.token_id for s in ours])
    dh = np.array([abs(a.entropy - b.entropy) for a, b in zip(ours, ref, strict=True)])
    assert dh.mean() < MEAN_DH and dh.max() < MAX_DH
    # llama.cpp's greedy choice is transformers' top-1 almost everywhere.
    assert np.mean([s.rank == 1 for s in ref]) >= 0.95


@needs_llama
def test_stream_score_and_branches(llama_lm):
    from models.branch_types import BranchRequest
    from models.engine import grow_branches, score_tokens, stream_annotated
    from models.prompting import encode_prompt

    ids = encode_prompt(llama_lm, PROMPTS[1])
    greedy = list(stream_annotated(llama_lm, ids, GenerationParams(max_new_tokens=20)))
    assert [s.position for s in greedy] == list(range(len(greedy)))
    assert all(s.rank == 1 and s.sampling_entropy == 0 for s in greedy)
    assert all(len(s.top) == 10 and s.top[0].token_id == s.token_id for s in greedy)
    tokens = [s.token_id for s in greedy]
    # Teacher-forced: the same ids with their log-probs; a batched decode differs from
    # token-by-token decoding by quantised-kernel rounding only.
    scored = score_tokens(llama_lm, ids, tokens)
    assert [s.token_id for s in scored] == tokens
    assert "".join(s.text for s in scored) == "".join(s.text for s in greedy)
    dh = [abs(a.entropy - b.entropy) for a, b in zip(scored, greedy, strict=True)]
    assert np.mean(dh) < MEAN_DH
    # A seed replays a sampled trace exactly.
    sp = GenerationParams(max_new_tokens=12, temperature=1.0, seed=7)
    a = [s.token_id for s in stream_annotated(llama_lm, ids, sp)]
    b = [s.token_id for s in stream_annotated(llama_lm, ids, sp)]
    assert a == b
    # Branches at position 5: forced alternative, then free; two seeded samples.
    alt = greedy[5].top[1].token_id
    reqs = [BranchRequest((alt,), replace(sp, max_new_tokens=6, seed=3)),
            BranchRequest((), replace(sp, max_new_tokens=6, seed=1)),
            BranchRequest((), replace(sp, max_new_tokens=6, seed=2))]
    out = grow_branches(llama_lm, ids, tokens, 5, reqs)
    assert out[0].steps[0].token_id == alt and out[0].steps[0].position == 5
    assert all(o.stop_reason in ("eos", "length") for o in out)
    assert all(len(o.steps) <= 7 for o in out)
    again = grow_branches(llama_lm, ids, tokens, 5, reqs[1:2])
    assert again[0].token_ids == out[1].token_ids
    # The fork's first distribution is the trace's own at that position, up to the
    # rounding of a batched prefix decode against a token-by-token one (quantised
    # kernels differ by batch size on llama.cpp).
    assert out[0].steps[0].entropy == pytest.approx(greedy[5].entropy, abs=MAX_DH)


@needs_llama
def test_cli_annotate_on_llama_records_the_engine(tmp_path, capsys):
    from forkview import cli

    db = tmp_path / "l.db"
    assert cli.main(["annotate", "--prompt", PROMPTS[0], "--answer", "84", "--backend",
                     "llama.cpp", "--max-new-tokens", "12", "--mi", "hsic", "--json",
                     "--db", str(db)]) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert len(data["tokens"]) >= 1
    import sqlite3

    con = sqlite3.connect(db)
    assert con.execute("SELECT backend, dtype, device FROM models").fetchall() == [
        ("llama.cpp", "Q4_1", "cpu")]
    # hsic needs hidden states: computed on transformers from the same file, said once,
    # stored as the trace's own run with the engine in its info.
    assert "on transformers (same file)" in out.err
    status, info = con.execute("SELECT status, info FROM mi_runs").fetchone()
    assert status == "complete" and json.loads(info)["engine"].startswith("hf (")
    n = con.execute("SELECT COUNT(*) FROM mi_values").fetchone()[0]
    assert n == len(data["tokens"])


@needs_llama
def test_llama_engine_never_imports_torch():
    """What the explorer does on the llama.cpp engine (load, encode, stream) imports
    no torch: it is ready in about a second."""
    code = (
        "import sys\n"
        "from models.engine import load, stream_annotated\n"
        "from models.prompting import encode_prompt\n"
        "from models.types import GenerationParams\n"
        "lm = load('default', backend='llama.cpp')\n"
        "ids = encode_prompt(lm, 'Hi')\n"
        "steps = list(stream_annotated(lm, ids, GenerationParams(max_new_tokens=3)))\n"
        "import forkview.app, forkview.ui.explorer\n"
        "assert steps and 'torch' not in sys.modules, sorted(m for m in sys.modules "
        "if m.startswith('torch'))[:3]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_llama
def test_hidden_states_come_from_transformers_on_the_same_file(llama_lm):
    from models.estimators import get_estimator

    lines: list[str] = []
    est = get_estimator("hsic")
    hf = for_needs(llama_lm, est.needs, est.name, status=lines.append)
    assert hf is not llama_lm and getattr(hf, "backend", "hf") == "hf"
    assert hf.content_hash == llama_lm.content_hash
    assert len(lines) >= 1 and "transformers" in lines[0]
    assert for_needs(llama_lm, est.needs, est.name) is hf  # loaded once


@needs_llama
def test_many_branches_grow_in_groups_of_sequences(llama_lm):
    """More branches than the context's sequences: grown in groups, every one complete,
    each with its own seeded draw, and the cache left holding only the prefix."""
    from models.branch_types import BranchRequest
    from models.engine import grow_branches, stream_annotated
    from models.llama_backend import MAX_SEQUENCES
    from models.prompting import encode_prompt

    ids = encode_prompt(llama_lm, PROMPTS[2])
    steps = list(stream_annotated(llama_lm, ids, GenerationParams(max_new_tokens=8)))
    tokens = [s.token_id for s in steps]
    fork = max(range(len(steps)), key=lambda i: steps[i].entropy)  # where draws differ
    n = MAX_SEQUENCES + 2
    reqs = [BranchRequest((), GenerationParams(max_new_tokens=3, temperature=1.0, seed=i))
            for i in range(n)]
    out = grow_branches(llama_lm, ids, tokens, fork, reqs)
    assert len(out) == n and all(1 <= len(o.steps) <= 3 for o in out)
    assert all(o.steps[0].position == fork for o in out)
    assert len({tuple(o.token_ids) for o in out}) > 1  # different seeds, different draws
    # The engine is usable as before: a greedy decode after the batch is unchanged.
    again = [s.token_id for s in stream_annotated(llama_lm, ids,
                                                  GenerationParams(max_new_tokens=8))]
    assert again == tokens


@pytest.mark.parametrize("argv", [["--backend", "llama.cpp", "--device", "cuda"],
                                  ["--backend", "llama.cpp", "--dtype", "bfloat16"],
                                  ["serve", "--backend", "llama.cpp", "--device", "cuda"]])
def test_options_the_engine_cannot_take_fail_before_the_tui(argv, tmp_path, capsys,
                                                              monkeypatch):
    """Refused in one line before the explorer (or the server) starts, whether or not
    the extra is installed."""
    import models.llama_backend as lb
    from forkview import cli

    monkeypatch.setattr(lb, "available", lambda: True)
    code = cli.main([*argv, "--db", str(tmp_path / "x.db")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "llama.cpp backend" in err[0]
