"""`hsic`: representation MI between each step's hidden state and the answer's, as in
MI-Peaks' public code (science.md §2; the formulas live in models/hsic.py).

Defaults reproduce MI-Peaks: the last decoder layer's output before the final norm at
the step that emits each token (one teacher-forced forward pass over the trace gives
exactly those states), h_y = that layer's last-token state after one forward pass over
the reference solution text (else the reference answer; with neither, the trace's own
extracted final answer, flagged `self_reference`), sigma = 50, eps = 1e-5, the
normalised score tr(R_x R_y).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from models.errors import ModelError
from models.estimators.base import (
    REFERENCES,
    Estimator,
    EstimatorChunk,
    TraceData,
    missing_reference,
    pick_reference,
    register,
)


@register
class HsicEstimator(Estimator):
    name = "hsic"
    needs = frozenset({"hidden", "reference"})
    headline: ClassVar[tuple[str, ...]] = ("bandwidth",)
    short_names: ClassVar[dict[str, str]] = {"bandwidth": "σ", "normalised": "norm"}
    defaults: ClassVar[dict[str, Any]] = {
        "layer": -1,
        "bandwidth": 50.0,  # sigma; or "median" (per-vector median heuristic)
        "eps": 1e-5,
        "normalised": True,  # False: the paper's plain HSIC tr(K_x H K_y H)/(d-1)^2
        "reference": "auto",  # auto | solution | answer | self
    }

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        bw = params["bandwidth"]
        if isinstance(bw, str) and bw != "median":
            raise ModelError(f"bandwidth must be a positive number or 'median', got '{bw}'")
        if not isinstance(bw, str) and not float(bw) > 0:
            raise ModelError(f"bandwidth must be a positive number or 'median', got {bw}")
        if not float(params["eps"]) > 0:
            raise ModelError(f"eps must be positive, got {params['eps']}")
        if params["reference"] not in REFERENCES:
            raise ModelError(f"reference must be one of {', '.join(REFERENCES)}, "
                             f"got '{params['reference']}'")
        return params

    def check(self, trace: TraceData) -> str | None:
        return missing_reference(trace, self.params["reference"])

    def run(self, lm: Any, trace: TraceData, positions: Sequence[int]) -> Iterator[EstimatorChunk]:
        # numpy and torch are imported here, not with the registry: listing estimators
        # (the explorer's start, `forkview --help`) needs neither.
        import numpy as np
        import torch

        from models.generate import HiddenCapture, score_tokens
        from models.hsic import HsicTarget

        if not positions:
            return
        p = self.params
        ref_text, kind = pick_reference(trace, p["reference"])
        steps = score_tokens(lm, trace.prompt_ids, trace.token_ids, hidden_layer=p["layer"])
        hidden = np.stack([s.hidden for s in steps]).astype(np.float64)
        # h_y: one forward pass over the reference text alone, last token, same layer.
        ref_ids = lm.tokenizer(ref_text, add_special_tokens=True)["input_ids"]
        capture = HiddenCapture(lm.model, p["layer"])
        try:
            with torch.inference_mode():
                device = next(lm.model.parameters()).device
                lm.model(input_ids=torch.tensor([ref_ids], device=device), logits_to_keep=1)
            h_y = capture.pop_all()[-1].float().cpu().numpy().astype(np.float64)
        finally:
            capture.close()
        target = HsicTarget(h_y, bandwidth=p["bandwidth"], eps=float(p["eps"]),
                            normalised=bool(p["normalised"]))
        wanted = sorted(positions)
        scores = target.evaluate(hidden[wanted])
        info = {k: v for k, v in scores.params.items() if k not in ("sigma_x", "dense_tokens")}
        info.update(reference_kind=kind, self_reference=kind == "self",
                    reference_text=ref_text[:2000], reference_tokens=len(ref_ids),
                    layer_index=capture.layer)
        details = {}
        if "sigma_x" in scores.params:
            details = {pos: {"sigma_x": s} for pos, s in zip(wanted, scores.params["sigma_x"],
                                                             strict=True)}
        yield EstimatorChunk(
            values={pos: float(v) for pos, v in zip(wanted, scores.values, strict=True)},
            details=details, info=info,
        )
