"""`forkview figure --trace ID`: one stored trace as an SVG, each response token on
the explorer's colour.

The colours come from forkview/ui/scale.py, the module that paints the explorer's
trace view (`overlay_style`), so a token looks the same in both; it is pure Rich, and
the figure is a recording rich Console exported as SVG: no Textual, no torch.

- by entropy (default): the absolute entropy scale, 0 … 3+ nats in nine viridis steps,
  as the explorer's entropy view;
- by mi: the latest complete run of one MI estimator on the trace, neither a control
  nor another model's (`forkview.analysis.categories.peaks_run`, the run the report's
  categories and `export`'s `mi_<estimator>` read), on the trace's own 5th–95th
  percentile scale as the explorer's MI view; its peaks (Tukey's fence, the explorer's
  default rule) bold and underlined, tokens without a value grey.

The prompt is shown dimmed above the response; a branch's inherited prefix is faded,
as in the explorer. The title holds the trace's id, uid and model; a legend line under
the text says what the colours mean, with units. Only reads the store.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

from rich.console import CONSOLE_SVG_FORMAT, Console
from rich.style import Style
from rich.terminal_theme import DEFAULT_TERMINAL_THEME, SVG_EXPORT_THEME
from rich.text import Text

from forkview.analysis.peaks import TUKEY, find_peaks, scale_bin, scale_range
from forkview.ui.scale import (
    HIGH_ENTROPY_FRACTION,
    PEAK_STYLE,
    PREFIX_STYLE,
    append_entropy_scale,
    append_mi_scale,
    display_chunks,
    entropy_bin,
    high_entropy_threshold,
    overlay_style,
)
from models.answers import is_cut_off

BY = ("entropy", "mi")
THEMES = {"light": DEFAULT_TERMINAL_THEME, "dark": SVG_EXPORT_THEME}
DEFAULT_WIDTH = 100
MIN_WIDTH = 40

# The figure stands alone: no web fonts fetched (the local Fira Code if installed,
# else the viewer's monospace font) and no terminal-window buttons.
_SVG_FORMAT = re.sub(r',\s*url\("[^"]*"\)\s*format\("[^"]*"\)', "", CONSOLE_SVG_FORMAT)
_WINDOW_BUTTONS = re.compile(r'\s*<g transform="translate\(26,22\)">\s*(?:<circle[^>]*/>\s*)+</g>')


class FigureError(ValueError):
    """A request the trace cannot answer (no MI run of that estimator): a usage error."""


@dataclass
class MIColouring:
    """The MI series a figure is coloured by."""

    run_id: int
    estimator: str
    label: str  # as the explorer's legend names the run
    values: dict[int, float | None]


def mi_colouring(store: Any, trace_id: int, estimator: str | None) -> MIColouring:
    """The run `--by mi` colours by: the latest complete run of `estimator` (without
    one: the trace's only estimator with such a run)."""
    from forkview.analysis.categories import peaks_run
    from forkview.ui.mi_data import MISeries
    from models.estimators import REGISTRY

    if estimator is not None and estimator not in REGISTRY:
        raise FigureError(f"--estimator: unknown estimator {estimator!r} "
                          f"(known: {', '.join(sorted(REGISTRY))})")
    have = sorted({r.estimator for r in store.mi_runs(trace_id)
                   if peaks_run(store, trace_id, r.estimator) is not None})
    if estimator is None:
        if len(have) != 1:
            found = f"it has {', '.join(have)}" if have else "it has none"
            raise FigureError(f"--by mi needs --estimator NAME: the estimator whose latest "
                              f"complete run on trace {trace_id} colours it ({found})")
        estimator = have[0]
    run = peaks_run(store, trace_id, estimator)
    if run is None:
        raise FigureError(
            f"trace {trace_id} has no complete {estimator} run (complete runs there: "
            f"{', '.join(have) or 'none'}); compute one with "
            f"`forkview mi --trace {trace_id} --estimator {estimator}`")
    values = store.mi_values(run.id)
    return MIColouring(run.id, estimator, MISeries(run, values).label, values)


def _answer(info: Any) -> str:
    if info.answer is not None:
        mark = {True: " ✓", False: " ✗", None: ""}[info.correct]
        return f"answer {info.answer}{mark}"
    if is_cut_off(info.stop_reason):
        return "no answer (cut off)"
    return "no answer"


def trace_text(store: Any, trace_id: int, *, by: str = "entropy",
               estimator: str | None = None) -> tuple[Text, str]:
    """The figure's content (heading, prompt, coloured response, legend) and its title."""
    if by not in BY:
        raise FigureError(f"--by must be one of {', '.join(BY)}, not {by!r}")
    if estimator is not None and by != "mi":
        raise FigureError("--estimator goes with --by mi")
    info = store.trace(trace_id)  # StoreError for an unknown id
    steps = store.full_tokens(trace_id)
    n = len(steps)
    dim_before = 0 if info.is_root else int(info.fork_position or 0)
    entropies = [s.entropy for s in steps]
    threshold = high_entropy_threshold(entropies)
    mi = mi_colouring(store, trace_id, estimator) if by == "mi" else None
    mi_bins: list[int | None] = [None] * n
    peaks: set[int] = set()
    mi_range = None
    if mi is not None:
        values = {p: v for p, v in mi.values.items() if 0 <= p < n}
        peaks = set(find_peaks(values, TUKEY))
        mi_range = scale_range(values)
        if mi_range is not None:
            mi_bins = [scale_bin(values.get(i), *mi_range) for i in range(n)]

    title = f"trace {info.id} · {info.uid} · {info.model_name}"
    text = Text()
    text.append(f"trace {info.id}", style="bold")
    text.append(f" · {info.uid} · model {info.model_name}", style="bold")
    if info.model_spec and info.model_spec != info.model_name:
        text.append(f" ({info.model_spec})", style="dim")
    kind = "root" if info.is_root else f"{info.origin} branch at {info.fork_position}"
    text.append(f"\n{kind} · {info.status}"
                f"{' (' + info.stop_reason + ')' if info.stop_reason else ''}"
                f" · {n} tokens · {_answer(info)}", style="dim")
    if info.reference_answer:
        text.append(f" · reference {info.reference_answer}", style="dim")
    text.append("\n\nprompt\n", style="bold dim")
    text.append(info.prompt.rstrip("\n") + "\n", style=Style(dim=True, italic=True))
    text.append("\nresponse", style="bold")
    if dim_before:
        text.append(f" (tokens before {dim_before} inherited from the parent, faded)",
                    style="dim")
    text.append("\n")
    view = "mi" if mi is not None else "entropy"
    for i, step in enumerate(steps):
        high = threshold is not None and step.entropy is not None and step.entropy >= threshold
        style = overlay_style(view, entropy_bin(step.entropy), mi_bins[i], False, high,
                              i in peaks, False)
        if i < dim_before:
            style += PREFIX_STYLE
        for chunk, newline in display_chunks(step.text):
            text.append(chunk, style=style)
            if newline:
                text.append("\n")
    text.append("\n\n")
    if mi is None:
        append_entropy_scale(text)
        text.append(" (next-token entropy; the same scale for every trace)", style="dim")
        if threshold is not None:
            pct = round(HIGH_ENTROPY_FRACTION * 100)
            text.append(f"\ntop {pct}% of this trace: entropy ≥ {threshold:.3g} nats",
                        style="dim")
    else:
        if mi_range is None:
            text.append(f"MI {mi.label}: no values on this trace (run {mi.run_id})",
                        style="italic")
        else:
            append_mi_scale(text, mi.label, *mi_range)
            text.append(f" · run {mi.run_id}; the estimator's units, this trace's scale",
                        style="dim")
        text.append("\n")
        text.append("peaks", style=PEAK_STYLE)
        text.append(f" {TUKEY.label} ({TUKEY.definition}): {len(peaks)}", style="dim")
        text.append(" · ", style="dim")
        text.append("grey", style=overlay_style("mi", 0, None, False, False, False, False))
        text.append(": no value", style="dim")
    return text, title


def render_svg(store: Any, trace_id: int, *, by: str = "entropy",
               estimator: str | None = None, width: int = DEFAULT_WIDTH,
               theme: str = "light") -> str:
    """The trace as a standalone SVG document, `width` terminal columns wide."""
    if width < MIN_WIDTH:
        raise FigureError(f"--width must be at least {MIN_WIDTH} columns, got {width}")
    if theme not in THEMES:
        raise FigureError(f"--theme must be one of {', '.join(THEMES)}, not {theme!r}")
    text, title = trace_text(store, trace_id, by=by, estimator=estimator)
    # Colours fixed whatever the environment (NO_COLOR, a dumb terminal, COLUMNS).
    console = Console(record=True, file=io.StringIO(), width=width, color_system="truecolor",
                      force_terminal=True, force_jupyter=False, no_color=False,
                      highlight=False, markup=False, emoji=False, soft_wrap=False)
    console.print(text, overflow="fold")
    svg = console.export_svg(title=title, theme=THEMES[theme], code_format=_SVG_FORMAT)
    return _WINDOW_BUTTONS.sub("", svg)
