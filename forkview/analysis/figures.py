"""The report's figures with matplotlib (Agg: no display), from the report's plain data.

Each figure is a function of a Report (or one of its rows) returning a matplotlib
Figure; `write_figures` saves every one as PDF and SVG at paper column width (3.4 in,
TrueType fonts embedded in the PDF, text as paths in the SVG so it looks the same
everywhere), and `inline_svg` gives the HTML report its inline pictures (text kept as
text there, so it stays small and searchable). Nothing here computes a statistic: it
draws what forkview/analysis/report.py computed.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

COLUMN_WIDTH = 3.4  # inches: one column of a two-column paper
HEIGHT = 2.3
BLUE, ORANGE, GREY = "#1f77b4", "#ff7f0e", "#777777"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "legend.fontsize": 6,
        "xtick.labelsize": 6, "ytick.labelsize": 6, "axes.spines.top": False,
        "axes.spines.right": False, "pdf.fonttype": 42, "ps.fonttype": 42,
        "svg.hashsalt": "forkview", "figure.dpi": 100,
    })
    return plt


def _fig(height: float = HEIGHT) -> tuple[Any, Any]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, height), layout="constrained")
    return fig, ax


def _t(text: Any) -> str:
    """User text (model names, estimators) for a label: a "$" is a dollar sign, not
    the start of math (matplotlib's mathtext stays on for the axis ticks)."""
    return str(text).replace("$", r"\$")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


# ---------------------------------------------------------------------- figures
def entropy_histogram(model: Any) -> Any:
    return _histogram(model.histogram, BLUE, None, model.threshold,
                      f"E threshold {model.threshold:.3g} nats"
                      if model.threshold is not None else "",
                      "entropy (nats)", "tokens", f"{model.name}: {model.n_tokens:,} tokens")


def _histogram(hist: dict[str, Any], colour: str, label: str | None, mark: float | None,
               mark_label: str, xlabel: str, ylabel: str, title: str) -> Any:
    """Counts on bin edges as a filled step plot, with a red line at `mark`."""
    fig, ax = _fig()
    if hist.get("counts"):
        ax.stairs(hist["counts"], hist["edges"], fill=True, color=colour, alpha=0.7,
                  label=label)
    if mark is not None:
        ax.axvline(mark, color="#d62728", ls="--", lw=1.0, label=mark_label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_t(title))
    return fig


def density(row: Any) -> Any:
    fig, ax = _fig()
    d = row.result.density
    counts = np.asarray(d.get("counts") or [[0]], dtype=float)
    if d.get("x_edges"):
        from matplotlib.colors import LogNorm

        m = ax.pcolormesh(d["x_edges"], d["y_edges"], np.where(counts > 0, counts, np.nan).T,
                          norm=LogNorm(vmin=1, vmax=max(1.0, counts.max())),
                          cmap="viridis", shading="flat")
        fig.colorbar(m, ax=ax, label="tokens")
    ax.set_xlabel("entropy (nats)")
    ax.set_ylabel(_t(f"MI ({row.estimator})"))
    ax.set_title(_t(f"{row.model} · {row.estimator}"))
    return fig


def lag_profile(row: Any) -> Any:
    fig, ax = _fig()
    lags = row.result.lags
    x = np.array([r["lag"] for r in lags])
    for key, colour, dx in (("precision", BLUE, -0.08), ("jaccard", ORANGE, 0.08)):
        v = np.array([r[key] for r in lags], dtype=float)
        lo = np.array([r[f"{key}_lo"] for r in lags], dtype=float)
        hi = np.array([r[f"{key}_hi"] for r in lags], dtype=float)
        ax.errorbar(x + dx, v, yerr=[np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)],
                    color=colour, marker="o", ms=3, lw=1, capsize=2, label=key.capitalize()
                    if key == "jaccard" else "precision")
    base = row.result.stats["base_rate"].value
    if base is not None and math.isfinite(base):
        ax.axhline(base, color=GREY, ls="--", lw=0.8, label="base rate |E|/n")
    ax.set_xticks(x)
    ax.set_xlabel("lag (peak at t + lag)")
    ax.set_ylabel("overlap")
    ax.legend(frameon=False)
    ax.set_title(_t(f"{row.model} · {row.estimator}"))
    return fig


def position_profile(row: Any) -> Any:
    fig, ax = _fig()
    prof = row.result.inference.get("position_profile") or {}
    x = np.asarray(prof.get("bin_start", []), dtype=float) + 0.05
    h = np.array([np.nan if v is None else v for v in prof.get("entropy", [])], dtype=float)
    m = np.array([np.nan if v is None else v for v in prof.get("mi", [])], dtype=float)
    ax.plot(x, h, color=BLUE, marker="o", ms=3, lw=1)
    ax.set_ylabel("mean entropy (nats)", color=BLUE)
    ax2 = ax.twinx()
    ax2.spines["right"].set_visible(True)
    ax2.plot(x, m, color=ORANGE, marker="s", ms=3, lw=1)
    ax2.set_ylabel(_t(f"mean MI ({row.estimator})"), color=ORANGE)
    ax.set_xlabel("relative position in the trace")
    ax.set_title(_t(f"{row.estimator}: position trend"))
    return fig


def jaccard_histogram(row: Any) -> Any:
    fig, ax = _fig()
    jac = [v for v in row.result.per_trace.get("jaccard", [])
           if isinstance(v, float) and math.isfinite(v)]
    if jac:
        ax.hist(jac, bins=20, range=(0, 1), color=BLUE, alpha=0.8)
    ax.set_xlabel("Jaccard of E and P per trace")
    ax.set_ylabel("traces")
    ax.set_title(_t(f"{row.estimator}: {len(jac):,} traces"))
    return fig


def roc(row: Any) -> Any:
    fig, ax = _fig(HEIGHT + 0.4)
    curve = row.result.figures.get("roc", {})
    ax.plot([0, 1], [0, 1], color=GREY, ls="--", lw=0.8)
    if curve.get("fpr"):
        auc = row.result.stats["auroc"].value
        ax.plot(curve["fpr"], curve["tpr"], color=BLUE, lw=1.2,
                label=f"pooled AUROC {auc:.3f}" if auc is not None else None)
        ax.legend(frameon=False, loc="lower right")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    ax.set_title(_t(f"entropy as a detector of P: {row.estimator}"))
    return fig


def null_distribution(row: Any) -> Any:
    nd = row.result.figures.get("odds_ratio_null", {})
    p = row.result.stats["odds_ratio"]
    return _histogram(nd, GREY, "circular-shift null", nd.get("observed"), "observed",
                      "log odds ratio, pooled 2×2 (E × P)", "shifts",
                      f"{row.estimator}: p two-sided {p.p:.4f} ({p.tail})"
                      if p.p is not None else row.estimator)


def forest(report: Any) -> Any:
    rows = report.primary_rows
    fig, ax = _fig(0.7 + 0.28 * max(1, len(rows)))
    several = len({r.model_id for r in rows}) > 1
    labels = []
    for i, r in enumerate(rows):
        prim = r.result.primary
        est, (lo, hi) = prim.get("estimate"), prim.get("ci") or (None, None)
        y = len(rows) - 1 - i
        labels.append(_t(f"{r.model[:16]} · {r.estimator}" if several else r.estimator))
        if _pos(lo) and _pos(hi):
            ax.plot([lo, hi], [y, y], color=BLUE, lw=1.2)
        if _pos(est):
            ax.plot([est], [y], "o", color=BLUE, ms=4)
    ax.axvline(1.0, color=GREY, ls="--", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels[::-1])
    ax.set_xlabel("odds ratio E × P (95% CI)")
    ax.set_title(_t("primary endpoints" if several or not rows else
                    f"primary endpoints: {rows[0].model[:24]}"))
    return fig


def _pos(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def counterfactual(row: Any) -> Any:
    from forkview.analysis.counterfactual import CATEGORIES, CATEGORY_LABELS

    fig, ax = _fig()
    for i, c in enumerate(CATEGORIES):
        m = (row.categories.get(c, {}).get("importance") or {})
        mean, (lo, hi) = m.get("mean"), m.get("ci") or (None, None)
        if lo is not None and hi is not None:
            ax.plot([i, i], [lo, hi], color=BLUE, lw=1.2)
        if mean is not None:
            ax.plot([i], [mean], "o", color=BLUE, ms=4)
    ax.axhline(0, color=GREY, ls="--", lw=0.8)
    ax.set_xticks(range(len(CATEGORIES)))
    ax.set_xticklabels([CATEGORY_LABELS[c] for c in CATEGORIES])
    ax.set_ylabel("importance (answer changes)")
    ax.set_title(_t(f"{row.model} · peaks from {row.peaks_from}"))
    return fig


# ---------------------------------------------------------------------- output
def figures(report: Any) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(file stem, figure maker) for every figure of the report, in report order."""
    for m in report.models:
        yield f"entropy-{slug(m.name)}", lambda m=m: entropy_histogram(m)
    if report.primary_rows:
        yield "forest-primary", lambda: forest(report)
    for r in report.rows:
        stem = f"{slug(r.model)}-{slug(r.estimator)}-{slug(r.group)}"
        yield f"density-{stem}", lambda r=r: density(r)
        yield f"lags-{stem}", lambda r=r: lag_profile(r)
        yield f"position-{stem}", lambda r=r: position_profile(r)
        yield f"roc-{stem}", lambda r=r: roc(r)
        yield f"null-{stem}", lambda r=r: null_distribution(r)
    for c in report.counterfactual:
        yield f"counterfactual-{slug(c.model)}-{slug(c.peaks_from)}", \
            lambda c=c: counterfactual(c)


def write_figures(report: Any, directory: Path) -> list[Path]:
    """Every figure as DIR/<stem>.pdf and .svg; returns the paths written."""
    plt = _plt()
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for stem, make in figures(report):
        fig = make()
        for ext in ("pdf", "svg"):
            path = directory / f"{stem}.{ext}"
            with plt.rc_context({"svg.fonttype": "path"}):
                fig.savefig(path, format=ext, metadata=_metadata(ext))
            out.append(path)
        plt.close(fig)
    return out


def _metadata(ext: str) -> dict[str, Any]:
    # no creation date: the same report gives the same files
    return ({"CreationDate": None, "Creator": None, "Producer": None} if ext == "pdf"
            else {"Date": None, "Creator": None})


def inline_svg(fig: Any) -> str:
    """The figure as an <svg> element for the HTML report (text kept as text)."""
    plt = _plt()
    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata=_metadata("svg"))
    plt.close(fig)
    text = buf.getvalue()
    # the <svg> element alone, without matplotlib's RDF metadata block (it only names
    # the format and namespaces: nothing a reader sees)
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text[text.index("<svg"):],
                  flags=re.S)
