"""Representation MI between each step's hidden state and the answer's (MI-Peaks, HSIC).

science.md §2. The d hidden dimensions are d paired scalar samples (x_i = h_t[i],
y_i = h_y[i]); Gaussian kernel K_ij = exp(-(a_i - a_j)^2 / (2 sigma^2)), sigma = 50 by
default; right centring Kc = K H with H = I - 11^T/d; R = Kc (Kc + eps*d*I)^-1 with
eps = 1e-5; score = sum(R_x * R_y^T) = tr(R_x R_y) (normalised, NOCCO-style HSIC).
``normalised=False`` gives the paper's plain HSIC tr(K_x H K_y H) / (d-1)^2.

How this compares with MI-Peaks' public code (read in the stored fork hhh2210/MI-Peaks,
commit 52d282bf, src/mi_estimators.py: ``hsic_normalized_cca``, ``kernelmat``,
``distmat``, ``sigma_estimation``; called per token from src/cal_mi.py ``calculate_mi``):
- Same formula: ``Kxc = Kx @ H`` (right centring only), ``Rx = Kxc @ inv(Kxc + 1e-5*m*I)``
  with m = d, ``Pxy = sum(Rx * Ry.T)``; ``variance = 2 sigma^2 * X.size(1)`` where
  X.size(1) == 1 (each vector is reshaped to (d, 1)), so the kernel is the one above.
- Precision: they cast the kernel to float32 (``.type(torch.FloatTensor)``) and invert
  in float32, and ``distmat`` forms squared distances as |a|^2 - 2ab + |b|^2 (then
  abs), which cancels for large entries. forkview takes (a_i - a_j)^2 directly and
  works in float64, so values can differ from theirs in the last float32 digits (the
  regularised system has condition number up to ~1/eps = 1e5).
- Median bandwidth: their fallback ``sigma_estimation`` (used only when sigma is falsy,
  never in their runs) takes the median of SQUARED distances over the lower triangle of
  ``cat([X, X])`` (which includes the d zero self-pairs and every pair twice), uses it as
  sigma without a square root, replaces a median <= 0 by the mean and floors it at 1e-2.
  forkview's ``bandwidth="median"`` is the usual heuristic instead: sigma = median of
  |a_i - a_j| over the d(d-1)/2 pairs i < j (numpy's median: the mean of the two middle
  values when the count is even), computed per vector (h_y once, each h_t separately);
  a median of 0 falls back to the mean distance, a constant vector to sigma = 1 (its
  kernel is all ones for any sigma). ``params`` records every sigma used.
- Cost: they invert two d x d matrices per token (h_y's again for every token).

``hsic_direct`` transcribes the formulas literally (the reference). ``HsicTarget`` is
built once per trace from h_y and scores many tokens; it relies on two exact rewrites:

1. tr(R_x R_y) = tr(P_x P_y) with P = M (M + cI)^-1, M = H K H (symmetric), c = eps*d:
   R_x = K_x H (M_x + cI)^-1 by the push-through identity, and H commutes with M.
2. Low rank with a certified error ("lowrank", the default). A pivoted Cholesky factor
   K ~ L^T L (rank r << d for a Gaussian kernel on scalars) leaves a PSD residual E.
   P is operator monotone and concave with P(mu) <= mu/c, so (Rotfel'd's trace
   inequality) replacing M by H L^T L H moves the score by at most tr(E)/c per side.
   Each side stops when tr(E) <= atol*c/2, so |score - exact| <= atol (default 1e-8;
   the per-token bound is in ``params``). With G = L centred over the d samples,
   P = G^T (G G^T + cI)^-1 G, and a token costs O(d r^2 + d r r_y) instead of O(d^3).
   A vector whose rank would pass ``max_rank`` is done densely instead (Cholesky of
   M + cI, O(d^3)); ``method="dense"`` does every token that way (torch, or numpy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_SIGMA = 50.0
DEFAULT_EPS = 1e-5
DEFAULT_ATOL = 1e-8
METHODS = ("lowrank", "dense")
BACKENDS = ("torch", "numpy")

# Working-set budgets (float64 elements): a batch of pivoted-Cholesky factors at full
# max_rank, and a batch of dense d x d matrices. They bound memory, never results.
_LOWRANK_BUDGET = 1 << 23  # 64 MiB
_DENSE_BUDGET = 1 << 24  # 128 MiB per d x d stack


# ---------------------------------------------------------------- checks and kernels


def _vector(a: Any, name: str) -> np.ndarray:
    v = np.asarray(a, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector, got shape {v.shape}")
    if v.size < 2:
        raise ValueError(f"{name} needs at least 2 dimensions, got {v.size}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return v


def _bandwidth(bandwidth: Any) -> float | str:
    """A positive finite float (sigma, used as is) or the string "median"."""
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f"unknown bandwidth {bandwidth!r}: use a positive float or 'median'")
        return bandwidth
    real = (int, float, np.integer, np.floating)
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, real):
        raise ValueError(f"bandwidth must be a positive float or 'median', got {bandwidth!r}")
    sigma = float(bandwidth)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"bandwidth sigma must be a positive finite number, got {sigma}")
    return sigma


def _eps(eps: Any) -> float:
    e = float(eps)
    if not (math.isfinite(e) and e > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    return e


def median_bandwidth(a: np.ndarray) -> float:
    """Median of |a_i - a_j| over the d(d-1)/2 pairs i < j, as ``np.median`` of them.

    Exact (the mean of the two middle values when the count is even) without forming
    all d^2/2 distances: a selection over the sorted vector (see ``_pairwise_select``).
    Fallbacks: the mean distance when the median is 0 (more than half the pairs tie),
    and 1.0 for a constant vector, whose kernel is all ones whatever sigma is.
    """
    s = np.sort(np.asarray(a, dtype=np.float64))
    d = s.size
    m = d * (d - 1) // 2
    lo_val, hi_val = _pairwise_select(s, (m - 1) // 2, m // 2)
    med = (lo_val + hi_val) / 2.0
    if med > 0:
        return med
    # mean of s[j] - s[i] over i < j: each s[k] enters with sign + k times, - (d-1-k) times
    mean = float(np.dot(s, 2.0 * np.arange(d) - (d - 1)) / m)
    return mean if mean > 0 else 1.0


def _row_counts(
    s: np.ndarray, lo: np.ndarray, hi: np.ndarray, p: float, strict: bool
) -> np.ndarray:
    """Per row i: how many j in [lo_i, hi_i) have s[j] - s[i] < p (or <= p).

    fl(s[j] - s[i]) is non-decreasing in j for a sorted s, so a binary search per row
    (vectorised over rows) counts the computed differences exactly.
    """
    a, b = lo.copy(), hi.copy()
    while True:
        live = a < b
        if not live.any():
            return a - lo
        mid = np.minimum((a + b) // 2, s.size - 1)
        v = s[mid] - s
        ok = (v < p) if strict else (v <= p)
        a = np.where(live & ok, mid + 1, a)
        b = np.where(live & ~ok, mid, b)


def _pairwise_select(s: np.ndarray, k0: int, k1: int) -> tuple[float, float]:
    """The k0-th and k1-th smallest (0-based, k0 <= k1) of s[j] - s[i], i < j, s sorted.

    Randomised selection over the implicit sorted rows i (candidates j in
    [lo_i, hi_i)); each round counts around a random candidate pivot in O(d log d).
    When few candidates remain they are formed and partitioned. Deterministic (fixed
    seed); the pivots only affect speed, never the result.
    """
    d = s.size
    rng = np.random.default_rng(0)
    lo = np.arange(1, d + 1)
    hi = np.full(d, d)
    below = 0  # differences dropped on the left (all <= every remaining candidate)
    for _ in range(200):
        sizes = hi - lo
        total = int(sizes.sum())
        if total <= max(4 * d, 1 << 18):  # few enough to form and partition
            break
        r = int(rng.integers(total))
        ends = np.cumsum(sizes)
        i = int(np.searchsorted(ends, r, side="right"))
        j = lo[i] + r - (int(ends[i - 1]) if i else 0)
        p = float(s[j] - s[i])
        n_lt = _row_counts(s, lo, hi, p, strict=True)
        n_le = _row_counts(s, lo, hi, p, strict=False)
        less, leq = below + int(n_lt.sum()), below + int(n_le.sum())
        if k0 >= less and k1 < leq:
            return p, p
        if k1 < less:
            hi = lo + n_lt
        elif k1 < leq:  # k1 is p itself, k0 is smaller
            hi = lo + n_le
        elif k0 >= leq:
            below, lo = leq, lo + n_le
        else:  # k0 is p itself (k0 >= less), k1 is larger
            below, lo = less, lo + n_lt
    sizes = hi - lo
    rows = np.repeat(np.arange(d), sizes)
    starts = np.repeat(lo - np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes)
    cols = starts + np.arange(rows.size)
    vals = s[cols] - s[rows]
    kth = sorted({k0 - below, k1 - below})
    part = np.partition(vals, kth)
    return float(part[k0 - below]), float(part[k1 - below])


def _sigma_for(a: np.ndarray, bandwidth: float | str) -> float:
    return median_bandwidth(a) if bandwidth == "median" else float(bandwidth)


def gaussian_kernel(a: np.ndarray, sigma: float) -> np.ndarray:
    """K_ij = exp(-(a_i - a_j)^2 / (2 sigma^2)) for one vector (d,) or a batch (b, d)."""
    a = np.asarray(a, dtype=np.float64)
    sig = np.asarray(sigma, dtype=np.float64).reshape((*a.shape[:-1], 1, 1))
    k = a[..., :, None] - a[..., None, :]
    np.multiply(k, k, out=k)  # in place: at d = 4096 each d x d copy is 128 MiB
    k *= -0.5 / (sig * sig)
    return np.exp(k, out=k)


def _double_centre(k: np.ndarray) -> np.ndarray:
    """H K H for symmetric K, batched over leading axes, in place (O(d^2), no matmul)."""
    row = k.mean(axis=-1, keepdims=True)
    k -= row
    k -= np.swapaxes(row, -1, -2)
    k += row.mean(axis=-2, keepdims=True)
    return k


# ---------------------------------------------------------------- the reference


def hsic_direct(
    hx: np.ndarray,
    hy: np.ndarray,
    sigma: float | str = DEFAULT_SIGMA,
    eps: float = DEFAULT_EPS,
    normalised: bool = True,
) -> float:
    """The formulas of science.md §2 as written: two d x d inversions, float64.

    ``sigma`` is a float or "median" (computed per vector, see ``median_bandwidth``).
    The reference for tests and the baseline for the benchmark; use HsicTarget for work.
    """
    x, y = _vector(hx, "hx"), _vector(hy, "hy")
    if x.shape != y.shape:
        raise ValueError(f"hx and hy differ in length: {x.size} != {y.size}")
    bw, e = _bandwidth(sigma), _eps(eps)
    d = x.size
    kx = gaussian_kernel(x, _sigma_for(x, bw))
    ky = gaussian_kernel(y, _sigma_for(y, bw))
    h = np.eye(d) - np.ones((d, d)) / d
    if not normalised:
        return float(np.trace(kx @ h @ ky @ h) / (d - 1) ** 2)
    kxc, kyc = kx @ h, ky @ h
    reg = e * d * np.eye(d)
    rx = kxc @ np.linalg.inv(kxc + reg)
    ry = kyc @ np.linalg.inv(kyc + reg)
    return float(np.sum(rx * ry.T))


# ---------------------------------------------------------------- building blocks


def _pivoted_cholesky(
    a: np.ndarray, sigmas: np.ndarray, tol: float, max_rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pivoted Cholesky of each row's Gaussian kernel, in lockstep over a batch.

    a: (b, d); returns L (b, r, d) with K ~ L^T L, the residual traces tr(K - L^T L)
    (b,), and which rows reached tr <= tol within max_rank columns. Only the pivot
    columns of K are ever formed. Rows that have converged get zero columns.
    """
    b, d = a.shape
    rows = np.arange(b)
    inv2s2 = (0.5 / (sigmas * sigmas))[:, None]
    diag = np.ones((b, d))  # residual diagonal; K_ii = 1
    resid = diag.sum(axis=1)
    active = resid > tol
    cap = min(max_rank, 16)
    factor = np.zeros((b, cap, d))
    k = 0
    while k < max_rank and active.any():
        if k == cap:
            cap = min(max_rank, 2 * cap)
            factor = np.concatenate([factor, np.zeros((b, cap - k, d))], axis=1)
        piv = np.argmax(diag, axis=1)
        col = a - a[rows, piv][:, None]
        np.exp(-(col * col) * inv2s2, out=col)  # column piv of K
        if k:
            col -= np.matmul(factor[rows, :k, piv][:, None, :], factor[:, :k, :])[:, 0, :]
        pivot = np.where(active, diag[rows, piv], 1.0)
        col /= np.sqrt(pivot)[:, None]
        col[~active] = 0.0
        factor[:, k, :] = col
        diag -= col * col
        act = rows[active]
        diag[act, piv[active]] = 0.0  # exact in exact arithmetic; kills rounding noise
        np.maximum(diag, 0.0, out=diag)
        resid = diag.sum(axis=1)
        active &= resid > tol
        k += 1
    return factor[:, :k, :], resid, resid <= tol


def _centred_gram(factor: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """G = L centred over the d samples (so M ~ G^T G) and A = G G^T + cI."""
    g = factor - factor.mean(axis=-1, keepdims=True)
    # A contiguous transpose: numpy's stacked matmul is ~100x slower on a strided view.
    gram = np.matmul(g, np.ascontiguousarray(np.swapaxes(g, -1, -2)))
    gram += c * np.eye(g.shape[-2])
    return g, gram


def _dense_projection(
    a: np.ndarray, sigmas: np.ndarray, c: float, backend: str, device: str
) -> np.ndarray:
    """P = M (M + cI)^-1 = I - c (M + cI)^-1 for a batch (b, d), float64, dense."""
    m = _double_centre(gaussian_kernel(a, sigmas))
    d = a.shape[-1]
    if backend == "torch":
        import torch  # lazy: the low-rank path and the store never need it

        s = torch.from_numpy(m).to(device)
        s.diagonal(dim1=-2, dim2=-1).add_(c)
        chol, info = torch.linalg.cholesky_ex(s)
        if bool((info != 0).any()):  # not expected (eigenvalues >= c); LU is the safe way
            inv = torch.linalg.inv(s)
        else:  # cholesky_solve(I): several times faster than cholesky_inverse on CPU (MKL)
            eye = torch.eye(d, dtype=s.dtype, device=s.device).expand_as(s)
            inv = torch.cholesky_solve(eye, chol)
        p = inv.mul_(-c)
        p.diagonal(dim1=-2, dim2=-1).add_(1.0)
        return p.cpu().numpy()
    m += c * np.eye(d)
    p = np.linalg.inv(m) * -c
    p += np.eye(d)
    return p


@dataclass
class HsicScores:
    """Scores for a batch of tokens and exactly how they were computed."""

    values: np.ndarray  # (n,) float64
    params: dict[str, Any] = field(default_factory=dict)


class HsicTarget:
    """MI-Peaks' HSIC against one answer representation h_y, for many tokens.

    Build once per trace; ``scores(H)`` returns one value per row of H (n, d), equal to
    ``hsic_direct(H[i], h_y, ...)`` to within ``atol`` (lowrank) or rounding (dense).
    """

    def __init__(
        self,
        hy: np.ndarray,
        *,
        bandwidth: float | str = DEFAULT_SIGMA,
        eps: float = DEFAULT_EPS,
        normalised: bool = True,
        method: str = "lowrank",
        atol: float = DEFAULT_ATOL,
        max_rank: int | None = None,
        backend: str = "torch",
        device: str = "cpu",
    ):
        self.y = _vector(hy, "hy")
        self.d = d = self.y.size
        self.bandwidth = _bandwidth(bandwidth)
        self.eps = _eps(eps)
        self.c = self.eps * d
        self.normalised = bool(normalised)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
        if not (math.isfinite(atol) and atol > 0):
            raise ValueError(f"atol must be a positive finite number, got {atol}")
        self.method, self.atol, self.backend, self.device = method, float(atol), backend, device
        self.max_rank = max(1, d // 4) if max_rank is None else int(max_rank)
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        self.sigma_y = _sigma_for(self.y, self.bandwidth)
        # The answer's side, computed once: a factor W (P_y = W^T W) or a dense P_y.
        self._w_y: np.ndarray | None = None
        self._w_y_t: np.ndarray | None = None
        self._p_y: np.ndarray | None = None
        self._m_y: np.ndarray | None = None
        self._err_y = 0.0
        if not self.normalised:
            self._m_y = _double_centre(gaussian_kernel(self.y, self.sigma_y))
        elif method == "lowrank":
            factor, resid, ok = _pivoted_cholesky(
                self.y[None], np.array([self.sigma_y]), self._tol, self.max_rank)
            if ok[0]:
                g, gram = _centred_gram(factor[0], self.c)
                self._w_y = np.linalg.solve(np.linalg.cholesky(gram), g)  # C^-1 G
                self._w_y_t = np.ascontiguousarray(self._w_y.T)
                self._err_y = float(resid[0]) / self.c
        if self.normalised and self._w_y is None:
            self._p_y = self._dense(self.y[None], np.array([self.sigma_y]))[0]

    @property
    def _tol(self) -> float:
        return self.atol * self.c / 2.0  # per side: tr(E)/c <= atol/2

    @property
    def params(self) -> dict[str, Any]:
        """What every score from this target shares (``evaluate`` adds per-token items)."""
        p: dict[str, Any] = {
            "estimator": "hsic",
            "variant": "normalised" if self.normalised else "plain",
            "formula": ("sum(R_x * R_y^T), R = K H (K H + eps*d*I)^-1" if self.normalised
                        else "tr(K_x H K_y H) / (d-1)^2"),
            "kernel": "gaussian exp(-(a_i-a_j)^2 / (2 sigma^2))",
            "bandwidth": "median" if self.bandwidth == "median" else "fixed",
            "sigma_y": self.sigma_y,
            "eps": self.eps,
            "centring": "right",
            "d": self.d,
            "dtype": "float64",
            "reference": "MI-Peaks hsic_normalized_cca (Qian et al. 2025), float64",
        }
        if self.bandwidth != "median":
            p["sigma"] = float(self.bandwidth)
        if self.normalised:
            p["method"] = self.method
            if self.method == "lowrank":
                p["atol"] = self.atol
                p["max_rank"] = self.max_rank
        return p

    def scores(self, hs: np.ndarray) -> np.ndarray:
        """One score per row of ``hs`` (n, d)."""
        return self.evaluate(hs).values

    def evaluate(self, hs: np.ndarray) -> HsicScores:
        h = np.asarray(hs, dtype=np.float64)
        if h.ndim != 2 or h.shape[1] != self.d:
            raise ValueError(f"hidden states must have shape (n, {self.d}), got {h.shape}")
        if not np.all(np.isfinite(h)):
            raise ValueError("hidden states contain NaN or infinite values")
        n = h.shape[0]
        sig = np.array([_sigma_for(row, self.bandwidth) for row in h]) if n else np.zeros(0)
        values = np.zeros(n)
        bound = np.zeros(n)
        dense = np.zeros(n, dtype=bool)
        if not self.normalised:
            values = self._plain(h, sig)
        elif self.method == "dense":
            dense[:] = True
        else:
            dense = self._lowrank(h, sig, values, bound)
        if self.normalised and dense.any():
            values[dense] = self._dense_scores(h[dense], sig[dense])
            bound[dense] = self._err_y if self.method == "lowrank" else 0.0
        params = self.params
        params["n"] = n
        if self.bandwidth == "median":
            params["sigma_x"] = sig.tolist()
        if self.normalised and self.method == "lowrank":
            params["dense_y"] = self._w_y is None
            params["dense_tokens"] = np.flatnonzero(dense).tolist()
            params["error_bound_max"] = float(bound.max()) if n else 0.0
        return HsicScores(values=values, params=params)

    # ------------------------------------------------------------ internals

    def _dense(self, a: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
        return _dense_projection(a, sigmas, self.c, self.backend, self.device)

    def _plain(self, h: np.ndarray, sig: np.ndarray) -> np.ndarray:
        # tr(K_x H K_y H) = sum((H K_x H) * (H K_y H)): O(d^2) per token, no matmul.
        out = np.empty(h.shape[0])
        step = max(1, _DENSE_BUDGET // (self.d * self.d))
        for i in range(0, h.shape[0], step):
            m = _double_centre(gaussian_kernel(h[i:i + step], sig[i:i + step]))
            out[i:i + step] = np.einsum("bij,ij->b", m, self._m_y)
        return out / (self.d - 1) ** 2

    def _lowrank(
        self, h: np.ndarray, sig: np.ndarray, values: np.ndarray, bound: np.ndarray
    ) -> np.ndarray:
        """Fill values/bound for the tokens a low-rank factor covers; return the others."""
        dense = np.zeros(h.shape[0], dtype=bool)
        step = max(1, _LOWRANK_BUDGET // (self.d * self.max_rank))
        for i in range(0, h.shape[0], step):
            sl = slice(i, i + step)
            factor, resid, ok = _pivoted_cholesky(h[sl], sig[sl], self._tol, self.max_rank)
            dense[sl] = ~ok
            if not ok.any():
                continue
            g, gram = _centred_gram(factor[ok], self.c)
            if self._w_y is not None:
                q = np.matmul(g, self._w_y_t)  # (b, r, r_y): G_x W_y^T
            else:
                gt = np.ascontiguousarray(np.swapaxes(g, -1, -2))
                q = np.matmul(np.matmul(g, self._p_y), gt)
            # tr(P_x P_y) = tr(A_x^-1 G_x P_y G_x^T) = sum(A^-1 Q * Q) with P_y = W^T W
            sol = np.linalg.solve(gram, q)
            idx = np.flatnonzero(ok) + i
            if self._w_y is not None:
                values[idx] = np.einsum("bij,bij->b", sol, q)
            else:
                values[idx] = np.trace(sol, axis1=-2, axis2=-1)
            bound[idx] = resid[ok] / self.c + self._err_y
        return dense

    def _dense_scores(self, h: np.ndarray, sig: np.ndarray) -> np.ndarray:
        out = np.empty(h.shape[0])
        step = max(1, _DENSE_BUDGET // (self.d * self.d))
        for i in range(0, h.shape[0], step):
            p = self._dense(h[i:i + step], sig[i:i + step])
            if self._w_y is not None:  # tr(W P_x W^T)
                out[i:i + step] = np.einsum("ij,bij->b", self._w_y,
                                            np.matmul(self._w_y, p))
            else:
                out[i:i + step] = np.einsum("bij,ij->b", p, self._p_y)
        return out
