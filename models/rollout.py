"""Outcome MI from rollouts: how much a token choice tells about the final answer.

science.md §3 (Bigelow et al., "Forking paths"). At position t of a trace, every
alternative w with p(w | x_<t) > min_prob (T = 1, full vocabulary, the distribution
token t was drawn from) plus the emitted token x_t is forced, S continuations are
sampled after each at temperature T (default 1) until EOS or ``max_new_tokens``, and
each continuation's final answer is extracted. Answers are grouped into equivalence
classes (greedily, against each class's first member). With o_{t,w} the class
histogram through w and p~(w) = p(w) / sum of the kept p:

    I_t = H(sum_w p~(w) o_{t,w}) - sum_w p~(w) H(o_{t,w})      (nats)

a generalised Jensen-Shannon divergence, bounded by H(p~) (``choice_entropy``).

Miller-Madow. Plug-in entropies are biased low for small S, so the correction
H_MM = H + (K - 1) / (2N) is applied by default, K the number of non-empty classes of
a histogram and N its sample size. A per-alternative histogram o_{t,w} has N = S (its
own counts). The mixture o_t is not a histogram of S * M draws but a p~-weighted mean
of M histograms of S draws each: its class frequencies have variance
sum_w p~(w)^2 p(1 - p) / S, so its first-order bias is that of a plain histogram of
Kish's effective size (science.md §6)

    N_eff = 1 / sum_w (p~(w)^2 / n_w) = S / sum_w p~(w)^2     (every n_w = S),

between S (one alternative dominates) and S * M (equal weights, where it equals the
total count). ``mixture_n="total"`` restores the first version's N = S * M (wrong for
unequal weights). Both the plug-in and the corrected value are kept.

No choice. When only the emitted token passes ``min_prob`` (``n_choices`` = 1),
I_t = 0 by construction, not by measurement: the result says so (``no_choice``) and the
value is exactly 0.0, so that such positions can be left out of comparisons with
entropy. ``value_normalised`` = I_t / H(p~) (None when H(p~) = 0).

No answer. A continuation whose answer cannot be extracted gets ``answer = None`` and
falls into an explicit class of its own, "no answer" (``NO_ANSWER``, the
representative None in ``classes``; ``no_answer_class`` is its index): it is an
outcome like any other in every histogram, never dropped. A continuation cut off by
``max_new_tokens`` or by the model's context (``stop_reason`` "length" / "context",
``cut_off``) has not finished its response, so the last number it happens to have
written is not its answer. ``cut_off_answers`` decides what such a row keeps:
"explicit" (default) only an answer stated explicitly (extractor methods
``EXPLICIT_METHODS``: \\boxed{}, "final answer" / "####"; an extractor returning a bare
string states nothing), "none" never an answer, "any" whatever ``extract`` finds (the
first version's behaviour). A dropped answer is kept as ``dropped_answer``; a cut-off
row left without an answer has ``answer_method`` "cut_off". This is the one rule of
models.answers (``accept_answer``), which generated traces and branches follow too.

Choices beyond science.md (recorded in ``params``):
- The answer of a continuation is extracted from the whole response it completes
  (x_<t + w + continuation, prompt excluded; ``answer_scope="response"``), as in the
  paper where a continuation *is* a full response. Extracting from w + continuation
  alone (``"continuation"``) misreads answers already stated before t and numbers
  split at t ("... is 4" | "2").
- ``max_new_tokens`` counts the sampled tokens after w (w is forced, not sampled).
- Each position's generator is seeded from (seed, position), so a position gives the
  same continuations whether run alone or within ``rollout_positions``.

Counterfactual importance (``counterfactual``; stored in each position's details under
"counterfactual"). The same histograms answer a second question: does the answer move
when the token at t is drawn again? "keep" is the emitted token's outcome distribution
o_keep = o_{t,x_t} (its S continuations); "redraw" is the p~-weighted mixture over all
kept alternatives, o_redraw = o_t (redrawing the token draws it again from the model,
the emitted token included, restricted to the kept alternatives: tokens below
``min_prob`` are not drawn). The "no answer" class is an outcome like any other.

    p_change          = 1 - sum_c o_keep(c) o_redraw(c)
                        (a keep continuation and a redraw continuation disagree)
    p_change_baseline = 1 - sum_c o_keep(c)^2
                        (two independent continuations after the same token already
                        disagree this often)
    importance        = p_change - p_change_baseline
                      = sum_{w != x_t} p~(w) (sum_c o_keep(c)^2 - sum_c o_keep(c) o_w(c))
    tv                = 1/2 sum_c |o_keep(c) - o_redraw(c)|

"Independent" is taken literally: sum_c o_keep(c)^2, wherever it pairs two keep
continuations (the baseline, and the emitted token's share p~(x_t) of the redraw term),
is estimated from distinct pairs, sum_c n_c (n_c - 1) / (S (S - 1)) (unbiased; the
plug-in square pairs each continuation with itself and is biased up by
(1 - sum p^2) / S, which would bias the importance up by (1 - p~(x_t)) (1 - sum p^2) / S,
more where the emitted token is less likely: at high-entropy positions). With S = 1 the
plug-in is used (``unbiased`` False). ``tv`` is the plug-in distance, biased up by
sampling noise. A forced outcome (the answer is the token at t) gives
importance = p_change = tv = 1 - p~(x_t); a token that does not matter gives about 0;
with one kept choice everything is exactly 0. With a reference answer, accuracy_keep is
the share of keep continuations whose answer is equivalent to it (``equivalent``, as
the store marks continuations; "no answer" is wrong), accuracy_redraw the p~-weighted
share over the alternatives, accuracy_change = accuracy_redraw - accuracy_keep (all
None without a reference). n_keep and n_redraw count the continuations behind o_keep
(S) and o_redraw (S x alternatives).

Budget. ``budget`` (a ``TokenBudget``) caps the sampled tokens of many positions
together: before sampling, a position whose worst case (alternatives x S x the token
limit) would take the tokens spent past the cap raises ``BudgetExhausted`` (a
``RolloutCancelled``: ``rollout_positions`` then ends quietly, the positions already
yielded complete); the tokens actually generated are counted after each position.

Cost: all continuations of a position are ONE batch (alternatives x S rows) that
reuses the prefix's KV cache: the prefix is encoded once (or taken from the caller),
the cache is repeated over the rows, the forced tokens are fed, and every row is
sampled in lock-step; a row that emits EOS stops (its slot is fed padding and
ignored), and once half the rows of the batch are done the finished ones are dropped
from the batch and the cache.
"""

from __future__ import annotations

import copy
import inspect
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from models.answers import (  # noqa: F401  (the cut-off rule's names, re-exported)
    CUT_OFF_ANSWERS,
    CUT_OFF_REASONS,
    EXPLICIT_METHODS,
    ExtractedAnswer,
    accept_answer,
    answers_equivalent,
    extract_answer,
    is_cut_off,
)
from models.errors import ModelError
from models.generate import Detokenizer, _annotate, _entropy, cache_kwarg
from models.high_entropy import stratified_positions  # noqa: F401  (re-exported)
from models.loading import LoadedModel
from models.types import Alternative, GenerationParams, TokenStep

AnswerExtractor = Callable[[str], "ExtractedAnswer | str | None"]
Equivalence = Callable[[str, str], bool]

ANSWER_SCOPES = ("response", "continuation")
NO_ANSWER = None  # label of the class of continuations without an extractable answer
MIXTURE_N = ("kish", "total")  # sample size of the mixture's Miller-Madow term


class RolloutCancelled(Exception):
    """Raised by ``rollout_position`` when ``cancel`` is set during its decoding."""


class BudgetExhausted(RolloutCancelled):
    """Raised by ``rollout_position`` before sampling when its worst case does not fit
    the ``TokenBudget`` left."""


@dataclass
class TokenBudget:
    """A cap on sampled continuation tokens shared by every position of a command
    (module doc, "Budget"). ``spent`` counts tokens actually generated, ``positions``
    the positions finished under it; ``exhausted`` is set by the first refusal."""

    limit: int
    spent: int = 0
    positions: int = 0
    exhausted: bool = False

    def allows(self, worst_case: int) -> bool:
        if self.spent + worst_case > self.limit:
            self.exhausted = True
            return False
        return True

    def spend(self, tokens: int) -> None:
        self.spent += int(tokens)
        self.positions += 1


# ---------------------------------------------------------------- KV cache helpers


def cache_from_output(out: Any) -> Any:
    """The cache a forward pass returned (``cache`` in transformers 5, else
    ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def crop_cache(cache: Any, length: int) -> None:
    """Shrink ``cache`` in place to its first ``length`` positions.

    A negative argument to ``crop`` means "remove that many" in transformers 4.x and
    5.x alike (5.x refuses a positive, absolute length). Cropping slices the tensors
    (views); later ``update``s concatenate into new tensors, so a cache forked from
    this one with ``fork_cache`` is never affected.
    """
    current = cache.get_seq_length()
    if length > current:
        raise ValueError(f"cannot crop a cache of {current} positions to {length}")
    if length < current:
        if getattr(cache, "is_croppable", True) is False:
            raise ModelError(f"the model's cache ({type(cache).__name__}) cannot be cropped")
        cache.crop(length - current)


def fork_cache(cache: Any, repeats: int = 1) -> Any:
    """An independent cache holding the same positions, each row repeated ``repeats``
    times (``repeat_interleave`` order), leaving ``cache`` untouched.

    A DynamicCache is copied shallowly: its layers are new objects sharing the same
    tensors, which is safe because crop/update/repeat reassign tensors instead of
    writing into them. Other caches are deep-copied.
    """
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in layers]
    elif isinstance(getattr(cache, "key_cache", None), list):  # transformers 4.x
        new = copy.copy(cache)
        new.key_cache = list(cache.key_cache)
        new.value_cache = list(cache.value_cache)
    else:
        new = copy.deepcopy(cache)
    if repeats > 1:
        new.batch_repeat_interleave(repeats)
    return new


# ---------------------------------------------------------------- the estimator proper


def plugin_entropy(counts: Sequence[float]) -> float:
    """Plug-in (maximum-likelihood) entropy of a histogram, in nats."""
    total = float(sum(counts))
    if total <= 0:
        return 0.0
    return -sum(c / total * math.log(c / total) for c in counts if c > 0)


def miller_madow_entropy(counts: Sequence[float], n: float | None = None) -> float:
    """H_plugin + (K - 1) / (2N): K non-empty bins, N samples (default: the counts' sum)."""
    n = float(sum(counts)) if n is None else float(n)
    k = sum(1 for c in counts if c > 0)
    return plugin_entropy(counts) + ((k - 1) / (2 * n) if n > 0 and k > 0 else 0.0)


def effective_sample_size(weights: Sequence[float], sizes: Sequence[float]) -> float:
    """Kish's effective sample size of the p~-weighted mixture of histograms of
    ``sizes`` samples each: 1 / sum_w (p~_w^2 / n_w), i.e. S / sum_w p~_w^2 when every
    n_w = S (science.md §6). ``weights`` are renormalised to sum to 1."""
    if len(weights) != len(sizes) or not weights:
        raise ValueError("weights and sizes must be non-empty and of the same length")
    total_w = float(sum(weights))
    if total_w <= 0:
        raise ValueError("the weights must sum to a positive number")
    if any(n <= 0 for n in sizes):
        raise ValueError("every histogram needs at least one sample")
    return 1.0 / sum((w / total_w) ** 2 / float(n) for w, n in zip(weights, sizes, strict=True))


def mutual_information(
    counts: Sequence[Sequence[float]], weights: Sequence[float], *, miller_madow: bool = True,
    mixture_n: str = "kish",
) -> float:
    """I = H(sum_w p~_w o_w) - sum_w p~_w H(o_w) from per-alternative class counts.

    ``weights`` are renormalised to sum to 1. With ``miller_madow`` each histogram's
    entropy gets (K - 1) / (2N), K its non-empty classes: N = the alternative's own
    count (S) for o_w; for the mixture N = N_eff = 1 / sum_w (p~_w^2 / n_w) = S / sum_w
    p~_w^2 (``mixture_n="kish"``, science.md §6; see ``effective_sample_size``), or the
    total number of samples (``"total"``, the first version; equal to N_eff only for
    equal weights).
    """
    if len(counts) != len(weights) or not counts:
        raise ValueError("counts and weights must be non-empty and of the same length")
    if mixture_n not in MIXTURE_N:
        raise ValueError(f"mixture_n must be one of {', '.join(MIXTURE_N)}, not {mixture_n!r}")
    total_w = float(sum(weights))
    if total_w <= 0:
        raise ValueError("the weights must sum to a positive number")
    w = [x / total_w for x in weights]
    n_classes = max(len(c) for c in counts)
    dists = []
    for c in counts:
        s = float(sum(c))
        if s <= 0:
            raise ValueError("every alternative needs at least one sample")
        dists.append([(c[i] if i < len(c) else 0) / s for i in range(n_classes)])
    mixture = [sum(wi * d[i] for wi, d in zip(w, dists, strict=True)) for i in range(n_classes)]
    h_mix = plugin_entropy(mixture)
    h_cond = sum(wi * plugin_entropy(c) for wi, c in zip(w, counts, strict=True))
    if miller_madow:
        sizes = [float(sum(c)) for c in counts]
        n_mix = effective_sample_size(w, sizes) if mixture_n == "kish" else sum(sizes)
        k_mix = sum(1 for p in mixture if p > 0)
        h_mix += (k_mix - 1) / (2 * n_mix)
        h_cond += sum(
            wi * (sum(1 for x in c if x > 0) - 1) / (2 * n)
            for wi, c, n in zip(w, counts, sizes, strict=True)
        )
    return h_mix - h_cond


def group_answers(
    answers: Sequence[str | None], equivalent: Equivalence = answers_equivalent
) -> tuple[list[int], list[str | None]]:
    """Greedy equivalence classes: each answer joins the first class whose first member
    it is equivalent to (``equivalent(answer, representative)``), else opens a new one.
    None (``NO_ANSWER``) is an explicit outcome class of its own, "no answer": every
    None joins it, it never matches an answer, and ``equivalent`` is never asked about
    it. Returns (class per answer, representatives); the no-answer class's
    representative is None.
    """
    reps: list[str | None] = []
    labels: list[int] = []
    memo: dict[tuple[str, str], bool] = {}
    for a in answers:
        found = None
        for i, r in enumerate(reps):
            if a is None or r is None:
                same = a is None and r is None
            else:
                key = (a, r)
                if key not in memo:
                    memo[key] = bool(a == r or equivalent(a, r))
                same = memo[key]
            if same:
                found = i
                break
        if found is None:
            reps.append(a)
            found = len(reps) - 1
        labels.append(found)
    return labels, reps


def counterfactual(
    counts: Sequence[Sequence[float]], weights: Sequence[float], keep: int,
    correct: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Counterfactual importance of a position (module doc) from the per-alternative
    class ``counts``, the weights p~ (renormalised), the index ``keep`` of the emitted
    token's alternative and, with a reference answer, ``correct``: the number of each
    alternative's continuations whose answer is right (None: no reference)."""
    if len(counts) != len(weights) or not counts or not 0 <= keep < len(counts):
        raise ValueError("counts and weights must be non-empty, of the same length, and "
                         "keep an index into them")
    total_w = float(sum(weights))
    if total_w <= 0:
        raise ValueError("the weights must sum to a positive number")
    w = [x / total_w for x in weights]
    n_classes = max(len(c) for c in counts)
    sizes = [float(sum(c)) for c in counts]
    if any(n <= 0 for n in sizes):
        raise ValueError("every alternative needs at least one sample")
    dists = [[(c[i] if i < len(c) else 0) / n for i in range(n_classes)]
             for c, n in zip(counts, sizes, strict=True)]
    o_keep = dists[keep]
    n_keep = sizes[keep]
    unbiased = n_keep >= 2
    if unbiased:  # distinct pairs of keep continuations
        kc = counts[keep]
        same_keep = sum(float(x) * (float(x) - 1) for x in kc) / (n_keep * (n_keep - 1))
    else:
        same_keep = sum(p * p for p in o_keep)
    agree = sum(
        wa * (same_keep if a == keep else sum(p * q for p, q in zip(o_keep, d, strict=True)))
        for a, (wa, d) in enumerate(zip(w, dists, strict=True))
    )
    o_redraw = [sum(wa * d[i] for wa, d in zip(w, dists, strict=True)) for i in range(n_classes)]
    p_change = min(1.0, max(0.0, 1.0 - agree))
    baseline = min(1.0, max(0.0, 1.0 - same_keep))
    out: dict[str, Any] = {
        "p_change": p_change,
        "p_change_baseline": baseline,
        "importance": p_change - baseline,
        "tv": 0.5 * sum(abs(p - q) for p, q in zip(o_keep, o_redraw, strict=True)),
        "accuracy_keep": None,
        "accuracy_redraw": None,
        "accuracy_change": None,
        "n_keep": int(n_keep),
        "n_redraw": int(sum(sizes)),
        "unbiased": unbiased,
    }
    if correct is not None:
        acc = [float(k) / n for k, n in zip(correct, sizes, strict=True)]
        out["accuracy_keep"] = acc[keep]
        out["accuracy_redraw"] = sum(wa * x for wa, x in zip(w, acc, strict=True))
        out["accuracy_change"] = out["accuracy_redraw"] - out["accuracy_keep"]
    return out


# ---------------------------------------------------------------- results


@dataclass
class Continuation:
    """One sampled continuation through a forced token w at position t."""

    token_ids: list[int]  # w, then the sampled tokens (ending with EOS if it stopped there)
    text: str  # decoded token_ids (special tokens skipped)
    answer: str | None  # extracted final answer; None: "no answer" (none found, or dropped)
    answer_method: str | None  # which extractor found it
    answer_class: int  # index into RolloutResult.classes
    stop_reason: str  # eos | length | context
    # Annotated like a generated trace, positions t, t+1, ... (w's step is the fork's
    # distribution); None when annotate=False.
    steps: list[TokenStep] | None = None
    cut_off: bool = False  # stopped by max_new_tokens or the context, not by EOS
    # What the extractor found in a cut-off row that ``cut_off_answers`` did not accept.
    dropped_answer: str | None = None


@dataclass
class RolloutAlternative:
    token_id: int
    text: str
    prob: float  # p(w | x_<t) at T = 1
    weight: float  # p~(w): prob renormalised over the kept alternatives
    emitted: bool  # w is the trace's own token x_t
    continuations: list[Continuation] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # histogram over RolloutResult.classes
    n_cut_off: int = 0  # continuations cut off (stop_reason length / context)


@dataclass
class RolloutResult:
    position: int
    value: float  # I_t in nats: Miller-Madow corrected unless params["miller_madow"] is False
    value_plugin: float  # uncorrected (plug-in) estimate
    value_miller_madow: float  # corrected estimate
    entropy: float  # H_t of the distribution at t (T = 1, full vocabulary)
    alternatives: list[RolloutAlternative]
    classes: list[str | None]  # representative answer of each class; None = no answer
    mixture: list[float]  # o_t = sum_w p~(w) o_{t,w}
    params: dict[str, Any]
    generated_tokens: int  # sampled tokens over all rows (forced tokens not counted)
    seconds: float
    # Added in the second version (module doc); defaults keep old constructors working.
    n_choices: int = 0  # kept alternatives with p~ > 0 (the emitted token included)
    no_choice: bool = False  # n_choices < 2: I_t = 0 by construction, not a measurement
    choice_entropy: float = 0.0  # H(p~) over the kept alternatives, nats (I_t <= it)
    value_normalised: float | None = None  # value / choice_entropy; None when that is 0
    mixture_n_eff: float = 0.0  # sample size of the mixture's Miller-Madow term
    n_no_answer: int = 0  # continuations in the "no answer" class
    n_cut_off: int = 0  # continuations cut off (length / context)
    no_answer_class: int | None = None  # index of the "no answer" class in classes
    # Keep vs redraw (module doc, ``counterfactual``); None in results made before it.
    counterfactual: dict[str, Any] | None = None

    def details(self) -> dict[str, Any]:
        """The JSON-able per-position record the rollout estimator stores."""
        return {
            "entropy": self.entropy,
            "value_plugin": self.value_plugin,
            "value_miller_madow": self.value_miller_madow,
            "n_choices": self.n_choices,
            "no_choice": self.no_choice,
            "choice_entropy": self.choice_entropy,
            "value_normalised": self.value_normalised,
            "mixture_n_eff": self.mixture_n_eff,
            "n_no_answer": self.n_no_answer,
            "n_cut_off": self.n_cut_off,
            "no_answer_class": self.no_answer_class,
            "classes": self.classes,
            "mixture": self.mixture,
            "alternatives": [
                {"token_id": a.token_id, "text": a.text, "prob": a.prob,
                 "weight": a.weight, "emitted": a.emitted, "counts": a.counts,
                 "n_cut_off": a.n_cut_off}
                for a in self.alternatives
            ],
            **({"counterfactual": self.counterfactual}
               if self.counterfactual is not None else {}),
        }


# ---------------------------------------------------------------- sampling


def position_seed(seed: int, position: int) -> int:
    """The generator seed of one position: fixed by (seed, position) alone."""
    return (int(seed) * 1_000_003 + int(position) * 7_919 + 17) % (2**63 - 1)


@dataclass
class _Rows:
    """What the batched sampler produced per row."""

    tokens: list[list[int]]
    stop: list[str]
    stats: list[list[tuple[float, int, float, float, list[int], list[float]]]]


def _sample_rows(
    model: Any,
    cache: Any,
    first: torch.Tensor,
    *,
    limit: int,
    limit_reason: str,
    temperature: float,
    generator: torch.Generator,
    eos: Collection[int],
    pad_id: int,
    annotate: GenerationParams | None,
    cancel: threading.Event | None,
) -> _Rows:
    """Sample after the forced tokens ``first`` [B] in lock-step, one forward per step.

    ``cache`` holds the prefix repeated B times. A row stops at EOS (kept as its last
    token) or after ``limit`` tokens. Finished rows are fed ``pad_id`` and ignored;
    once at most half of the batch is alive the batch (and cache) is compacted, when
    the cache supports ``batch_select_indices``.
    """
    kv = cache_kwarg(model)
    device = first.device
    n_rows = first.shape[0]
    out = _Rows(tokens=[[] for _ in range(n_rows)], stop=["" for _ in range(n_rows)],
                stats=[[] for _ in range(n_rows)])
    eos_t = torch.tensor(sorted(eos), device=device, dtype=torch.long)
    rows = torch.arange(n_rows, device=device)  # original row of each batch slot
    alive = ~torch.isin(first, eos_t)
    for r in (~alive).nonzero()[:, 0].tolist():
        out.stop[r] = "eos"  # the forced token itself ends the response
    if limit <= 0 or not bool(alive.any()):
        for r in alive.nonzero()[:, 0].tolist():
            out.stop[r] = limit_reason
        return out
    can_compact = hasattr(cache, "batch_select_indices")
    inputs = first
    for _ in range(limit):
        if cancel is not None and cancel.is_set():
            raise RolloutCancelled("cancelled")
        n_alive = int(alive.sum())
        if can_compact and n_alive <= alive.shape[0] // 2:
            keep = alive.nonzero()[:, 0]
            cache.batch_select_indices(keep)
            rows, inputs, alive = rows[keep], inputs[keep], alive[keep]
        fed = torch.where(alive, inputs, torch.full_like(inputs, pad_id))
        res = model(input_ids=fed[:, None], use_cache=True, logits_to_keep=1, **{kv: cache})
        logits = res.logits[:, -1, :].float()
        probs = torch.softmax(logits / temperature, dim=-1)
        chosen = torch.multinomial(probs, 1, generator=generator)[:, 0]
        idx = alive.nonzero()[:, 0]
        live_rows = rows[idx].tolist()
        live_tokens = chosen[idx].tolist()
        stats = _annotate(logits[idx], chosen[idx], annotate) if annotate is not None else None
        for j, (r, tok) in enumerate(zip(live_rows, live_tokens, strict=True)):
            out.tokens[r].append(tok)
            if stats is not None:
                out.stats[r].append((stats.logprob[j], stats.rank[j], stats.entropy[j],
                                     stats.sampling_entropy[j], stats.top_ids[j],
                                     stats.top_probs[j]))
        done = torch.isin(chosen, eos_t) & alive
        for r in rows[done].tolist():
            out.stop[r] = "eos"
        alive = alive & ~done
        inputs = chosen
        if not bool(alive.any()):
            break
    for r in rows[alive].tolist():
        out.stop[r] = limit_reason
    return out


def _answer_of(
    extract: AnswerExtractor, text: str, cut_off: bool, policy: str
) -> tuple[str | None, str | None, str | None]:
    """(answer, method, dropped answer) of one continuation under ``cut_off_answers``:
    the cut-off rule of generated traces too (models.answers.accept_answer)."""
    return accept_answer(extract(text), cut_off=cut_off, policy=policy)


def _steps(
    tokenizer: Any,
    context: Sequence[int],
    position: int,
    token_ids: Sequence[int],
    stats: Sequence[tuple[float, int, float, float, list[int], list[float]]],
    texts: Callable[[int], str],
) -> list[TokenStep]:
    """TokenSteps of a continuation; pieces decoded after a few prefix tokens so that
    merges and multi-byte characters at the fork come out as in the full trace."""
    detok = Detokenizer(tokenizer)
    for tok in context:
        detok.push(tok)
    pieces = [detok.push(t) for t in token_ids]
    rest = detok.flush()
    if rest and pieces:
        pieces[-1] += rest
    return [
        TokenStep(
            position=position + i, token_id=int(tok), text=pieces[i], logprob=s[0], rank=s[1],
            entropy=s[2], sampling_entropy=s[3],
            top=[Alternative(token_id=a, text=texts(a), prob=p)
                 for a, p in zip(s[4], s[5], strict=True)],
        )
        for i, (tok, s) in enumerate(zip(token_ids, stats, strict=True))
    ]


# ---------------------------------------------------------------- public API


def _validate(
    prompt_ids: Sequence[int], token_ids: Sequence[int], positions: Iterable[int], *,
    samples: int, min_prob: float, max_new_tokens: int, temperature: float,
    answer_scope: str, mixture_n: str = "kish", cut_off_answers: str = "explicit",
) -> None:
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    for p in positions:
        if not 0 <= p < len(token_ids):
            raise ValueError(f"position {p} is out of range (the trace has {len(token_ids)} "
                             "tokens)")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    if not 0.0 < min_prob < 1.0:
        raise ValueError(f"min_prob must be in (0, 1), not {min_prob}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, not {temperature}")
    if answer_scope not in ANSWER_SCOPES:
        raise ValueError(f"answer_scope must be one of {', '.join(ANSWER_SCOPES)}, "
                         f"not {answer_scope!r}")
    if mixture_n not in MIXTURE_N:
        raise ValueError(f"mixture_n must be one of {', '.join(MIXTURE_N)}, not {mixture_n!r}")
    if cut_off_answers not in CUT_OFF_ANSWERS:
        raise ValueError(f"cut_off_answers must be one of {', '.join(CUT_OFF_ANSWERS)}, "
                         f"not {cut_off_answers!r}")


@torch.inference_mode()
def rollout_position(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    token_ids: Sequence[int],
    position: int,
    *,
    samples: int = 8,
    min_prob: float = 0.05,
    max_new_tokens: int = 256,  # see RolloutEstimator.defaults
    temperature: float = 1.0,
    seed: int = 0,
    miller_madow: bool = True,
    extract: AnswerExtractor = extract_answer,
    equivalent: Equivalence = answers_equivalent,
    prefix_cache: Any = None,
    alternatives: Sequence[int] | None = None,
    eos_token_ids: Collection[int] | None = None,
    answer_scope: str = "response",
    annotate: bool = True,
    cancel: threading.Event | None = None,
    mixture_n: str = "kish",
    cut_off_answers: str = "explicit",
    reference_answer: str | None = None,
    budget: TokenBudget | None = None,
    answer_ids: Callable[[list[int]], ExtractedAnswer | str | None] | None = None,
) -> RolloutResult:
    """Rollout estimate of I_t at ``position`` of the trace ``token_ids`` (module doc).

    ``prefix_cache``: a cache holding exactly prompt + token_ids[:position] (left
    unchanged; it is forked). ``alternatives``: explicit token ids to fork on instead of
    the ``min_prob`` rule (the emitted token is always added). ``eos_token_ids``
    overrides the model's EOS set (an empty set: every row runs ``max_new_tokens``).
    ``extract`` returns an ``ExtractedAnswer``, a string or None. ``mixture_n``: "kish"
    or "total", ``cut_off_answers``: "explicit", "none" or "any" (module doc).
    ``reference_answer``: the accuracies of ``counterfactual`` (checked with
    ``equivalent``). ``answer_ids``: extract each answer from the token ids of the
    answer scope (x_<t + w + continuation, or w + continuation) instead of ``extract``
    on its text: scripted, token-level outcomes (tests). Raises ``RolloutCancelled`` if
    ``cancel`` is set while decoding, ``BudgetExhausted`` before sampling if the
    position's worst case does not fit ``budget`` (module doc).
    """
    _validate(prompt_ids, token_ids, [position], samples=samples, min_prob=min_prob,
              max_new_tokens=max_new_tokens, temperature=temperature,
              answer_scope=answer_scope, mixture_n=mixture_n, cut_off_answers=cut_off_answers)
    t0 = time.perf_counter()
    model = lm.model
    device = next(model.parameters()).device
    kv = cache_kwarg(model)
    prefix = [int(i) for i in prompt_ids] + [int(i) for i in token_ids[:position]]
    if lm.context_length and len(prefix) + 1 > lm.context_length:
        raise ModelError(f"position {position} is past the model's context "
                         f"({lm.context_length} tokens)")

    # The distribution at t: the logits after the prefix's last token.
    if prefix_cache is None:
        res = model(input_ids=torch.tensor([prefix], device=device), use_cache=True,
                    logits_to_keep=1)
        cache = cache_from_output(res)
    else:
        if prefix_cache.get_seq_length() != len(prefix):
            raise ValueError(f"prefix_cache holds {prefix_cache.get_seq_length()} positions, "
                             f"expected {len(prefix)} (prompt + tokens before {position})")
        cache = fork_cache(prefix_cache)
        crop_cache(cache, len(prefix) - 1)
        res = model(input_ids=torch.tensor([prefix[-1:]], device=device), use_cache=True,
                    logits_to_keep=1, **{kv: cache})
    logits = res.logits[0, -1, :].float()
    del res  # it references the cache, which is about to become the big batch cache
    logp = torch.log_softmax(logits, dim=-1)
    entropy = float(_entropy(logp))
    emitted = int(token_ids[position])

    if alternatives is None:
        picked = (logp.exp() > min_prob).nonzero()[:, 0].tolist()
    else:
        picked = [int(a) for a in alternatives]
    alt_ids = list(dict.fromkeys([*picked, emitted]))
    alt_probs = logp[torch.tensor(alt_ids, device=device)].exp().tolist()
    order = sorted(range(len(alt_ids)), key=lambda i: -alt_probs[i])
    alt_ids = [alt_ids[i] for i in order]
    alt_probs = [alt_probs[i] for i in order]
    total = sum(alt_probs)
    weights = [p / total for p in alt_probs]

    # One batch: row r continues alternative r // samples.
    n_alt = len(alt_ids)
    first = torch.tensor(alt_ids, device=device).repeat_interleave(samples)
    cache.batch_repeat_interleave(n_alt * samples)
    eos = set(lm.eos_token_ids) if eos_token_ids is None else {int(e) for e in eos_token_ids}
    pad = lm.tokenizer.pad_token_id
    pad_id = int(pad) if pad is not None else (min(eos) if eos else 0)
    limit, limit_reason = max_new_tokens, "length"
    if lm.context_length and len(prefix) + 1 + limit > lm.context_length:
        limit, limit_reason = lm.context_length - len(prefix) - 1, "context"
    if budget is not None and not budget.allows(n_alt * samples * max(limit, 0)):
        raise BudgetExhausted(f"position {position}: {n_alt} x {samples} x {limit} tokens "
                              f"would pass the budget ({budget.spent} of {budget.limit} spent)")
    generator = torch.Generator(device=device)
    generator.manual_seed(position_seed(seed, position))
    annotate_params = (GenerationParams(temperature=temperature, top_alternatives=10)
                       if annotate else None)
    rows = _sample_rows(model, cache, first, limit=limit, limit_reason=limit_reason,
                        temperature=temperature, generator=generator, eos=eos, pad_id=pad_id,
                        annotate=annotate_params, cancel=cancel)
    del cache  # the batch cache is the big allocation here

    # Answers, classes and the estimate.
    tok = lm.tokenizer

    def decode(ids: Sequence[int]) -> str:
        return tok.decode(list(ids), skip_special_tokens=True,
                          clean_up_tokenization_spaces=False)

    fork_stats = (_annotate(logits[None].expand(n_alt, -1),
                            torch.tensor(alt_ids, device=device), annotate_params)
                  if annotate_params is not None else None)
    text_cache: dict[int, str] = {}

    def token_text(i: int) -> str:
        if i not in text_cache:
            text_cache[i] = tok.decode([i], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        return text_cache[i]

    head = [int(i) for i in token_ids[:position]]
    context = prefix[-6:]
    conts: list[Continuation] = []
    found_answers: list[str | None] = []
    for r in range(n_alt * samples):
        a = r // samples
        ids = [alt_ids[a], *rows.tokens[r]]
        text = decode(ids)
        scope_text = decode(head + ids) if answer_scope == "response" else text
        cut_off = is_cut_off(rows.stop[r])
        if answer_ids is not None:
            scope_ids = head + ids if answer_scope == "response" else list(ids)
            answer, method, dropped = _answer_of(
                lambda _, ids_=scope_ids: answer_ids(ids_), scope_text, cut_off,
                cut_off_answers)
        else:
            answer, method, dropped = _answer_of(extract, scope_text, cut_off, cut_off_answers)
        steps = None
        if fork_stats is not None:
            s0 = (fork_stats.logprob[a], fork_stats.rank[a], fork_stats.entropy[a],
                  fork_stats.sampling_entropy[a], fork_stats.top_ids[a], fork_stats.top_probs[a])
            steps = _steps(tok, context, position, ids, [s0, *rows.stats[r]], token_text)
        conts.append(Continuation(token_ids=ids, text=text, answer=answer,
                                  answer_method=method, answer_class=-1,
                                  stop_reason=rows.stop[r], steps=steps, cut_off=cut_off,
                                  dropped_answer=dropped))
        found_answers.append(answer)
    labels, classes = group_answers(found_answers, equivalent)
    for c, label in zip(conts, labels, strict=True):
        c.answer_class = label
    alts: list[RolloutAlternative] = []
    for a in range(n_alt):
        mine = conts[a * samples:(a + 1) * samples]
        counts = [0] * len(classes)
        for c in mine:
            counts[c.answer_class] += 1
        alts.append(RolloutAlternative(
            token_id=alt_ids[a], text=token_text(alt_ids[a]), prob=alt_probs[a],
            weight=weights[a], emitted=alt_ids[a] == emitted, continuations=mine,
            counts=counts, n_cut_off=sum(c.cut_off for c in mine)))
    counts = [x.counts for x in alts]
    n_choices = sum(1 for w in weights if w > 0)  # an explicit p = 0 token is no choice
    no_choice = n_choices < 2
    if no_choice:  # I_t = 0 by construction (one outcome distribution, nothing to mix)
        plug = mm = 0.0
    else:
        plug = mutual_information(counts, weights, miller_madow=False)
        mm = mutual_information(counts, weights, miller_madow=True, mixture_n=mixture_n)
    value = mm if miller_madow else plug
    choice_entropy = plugin_entropy(weights) + 0.0  # never -0.0
    n_eff = (effective_sample_size(weights, [samples] * n_alt) if mixture_n == "kish"
             else float(n_alt * samples))
    mixture = [sum(w * x.counts[i] / samples for w, x in zip(weights, alts, strict=True))
               for i in range(len(classes))]
    keep = alt_ids.index(emitted)
    correct: list[int] | None = None
    if reference_answer is not None and str(reference_answer).strip():
        ref = str(reference_answer).strip()
        right: dict[str, bool] = {}
        for ans in found_answers:
            if ans is not None and ans not in right:
                right[ans] = bool(ans == ref or equivalent(ans, ref))
        correct = [sum(1 for c in x.continuations if c.answer is not None and right[c.answer])
                   for x in alts]
    cf = counterfactual(counts, weights, keep, correct)
    generated = sum(len(t) for t in rows.tokens)
    if budget is not None:
        budget.spend(generated)
    answer_fn = answer_ids if answer_ids is not None else extract
    params = {
        "samples": samples, "min_prob": min_prob, "max_new_tokens": max_new_tokens,
        "temperature": temperature, "seed": seed,
        "position_seed": position_seed(seed, position), "miller_madow": miller_madow,
        "mixture_n": mixture_n,  # "kish": S / sum p~^2; "total": S x alternatives
        "no_answer": "class",  # continuations without an answer are one outcome class
        "cut_off_answers": cut_off_answers,
        "cut_off_methods": list(EXPLICIT_METHODS) if cut_off_answers == "explicit" else None,
        "no_choice_value": 0.0,  # n_choices < 2: value 0.0, flagged no_choice
        "alternatives": "explicit" if alternatives is not None else f"p > {min_prob} + emitted",
        "answer_scope": answer_scope,
        "extract": getattr(answer_fn, "__name__", repr(answer_fn)),
        "equivalent": getattr(equivalent, "__name__", repr(equivalent)),
        "eos_token_ids": sorted(eos),
    }
    return RolloutResult(
        position=position, value=value, value_plugin=plug,
        value_miller_madow=mm, entropy=entropy, alternatives=alts, classes=classes,
        mixture=mixture, params=params,
        generated_tokens=generated,
        seconds=time.perf_counter() - t0,
        n_choices=n_choices, no_choice=no_choice, choice_entropy=choice_entropy,
        value_normalised=value / choice_entropy if choice_entropy > 1e-12 else None,
        mixture_n_eff=n_eff, n_no_answer=sum(c.answer is NO_ANSWER for c in conts),
        n_cut_off=sum(c.cut_off for c in conts),
        no_answer_class=classes.index(NO_ANSWER) if NO_ANSWER in classes else None,
        counterfactual=cf,
    )


@torch.inference_mode()
def rollout_positions(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    token_ids: Sequence[int],
    positions: Iterable[int],
    *,
    cancel: threading.Event | None = None,
    **kwargs: Any,
) -> Iterator[RolloutResult]:
    """``rollout_position`` at each of ``positions`` (duplicates dropped), in DESCENDING
    order, yielding each result as soon as it is done.

    The prefix up to the last position is encoded once; each position crops that cache
    to its own prefix, so nothing is re-encoded. Setting ``cancel`` ends the iteration
    quietly (the position in progress is dropped; those already yielded are complete).
    Other keyword arguments go to ``rollout_position``.
    """
    order = sorted({int(p) for p in positions}, reverse=True)
    # Check every argument before any work (an unknown keyword is a TypeError here).
    args = inspect.signature(rollout_position).bind(lm, prompt_ids, token_ids, 0, **kwargs)
    args.apply_defaults()
    a = args.arguments
    _validate(prompt_ids, token_ids, order, samples=a["samples"], min_prob=a["min_prob"],
              max_new_tokens=a["max_new_tokens"], temperature=a["temperature"],
              answer_scope=a["answer_scope"], mixture_n=a["mixture_n"],
              cut_off_answers=a["cut_off_answers"])
    if not order:
        return
    model = lm.model
    device = next(model.parameters()).device
    prompt = [int(i) for i in prompt_ids]
    ids = prompt + [int(i) for i in token_ids[:order[0]]]
    if lm.context_length and len(ids) + 1 > lm.context_length:
        raise ModelError(f"position {order[0]} is past the model's context "
                         f"({lm.context_length} tokens)")
    res = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
    shared = cache_from_output(res)
    del res
    for t in order:
        if cancel is not None and cancel.is_set():
            return
        crop_cache(shared, len(prompt) + t)
        try:
            yield rollout_position(lm, prompt, token_ids, t, prefix_cache=shared,
                                   cancel=cancel, **kwargs)
        except RolloutCancelled:
            return
