"""The entropy colour scale and token display text (the high-entropy rule itself is
models/high_entropy.py, re-exported here for the views).

Pure Python (Rich styles only): the trace view, the side panel and the legend all
read colours from here so one token looks the same everywhere.

The scale is absolute (bin edges in nats below), not normalised per trace, so two
traces can be compared by eye. The edges are denser near zero because that is where
most tokens are: Wang et al. report over half of all tokens below 0.01 nats and the
80th percentile at 0.672 nats, so even half-nat bins would paint 80% of a trace in
one colour. Colours are viridis stops: perceptually ordered,
distinct in 256-colour terminals, and readable for the common colour-vision
deficiencies. Each token gets its colour as a background with black or white text,
whichever contrasts more, so it reads on light and dark themes alike.
"""

from __future__ import annotations

import bisect
import math
from functools import lru_cache

from rich.color import Color
from rich.style import Style
from rich.text import Text

from models.high_entropy import (  # noqa: F401  (re-exported for the views)
    HIGH_ENTROPY_FRACTION,
    high_entropy_positions,
    high_entropy_threshold,
)

# Viridis sampled at 9 evenly spaced points (0 = low entropy, 8 = high).
VIRIDIS = (
    "#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c",
    "#28ae80", "#5ec962", "#addc30", "#fde725",
)
# Lower edges (nats) of bins 1..8; bin 0 is [0, 0.01), the last bin is open (>= 3).
BIN_EDGES = (0.01, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
N_BINS = len(VIRIDIS)

NEWLINE_MARK = "⏎"
EMPTY_MARK = "∅"  # a token whose text is empty (special token, held-back bytes)
TAB_MARK = "⇥"


def entropy_bin(entropy: float) -> int:
    if entropy is None or math.isnan(entropy) or entropy <= 0:
        return 0
    return bisect.bisect_right(BIN_EDGES, entropy)


def bin_label(i: int) -> str:
    lo = 0.0 if i == 0 else BIN_EDGES[i - 1]
    text = f"{lo:g}"
    if text.startswith("0."):
        text = text[1:]
    return text + ("+" if i == N_BINS - 1 else "")


def _luminance(hex_colour: str) -> float:
    r, g, b = (int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))

    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)


def foreground_for(hex_colour: str) -> str:
    """Black or white, whichever has the higher WCAG contrast on this background."""
    lum = _luminance(hex_colour)
    on_black = (lum + 0.05) / 0.05
    on_white = 1.05 / (lum + 0.05)
    return "#000000" if on_black >= on_white else "#ffffff"


@lru_cache(maxsize=64)
def bin_style(i: int) -> Style:
    bg = VIRIDIS[i]
    return Style(bgcolor=Color.parse(bg), color=Color.parse(foreground_for(bg)))


def entropy_style(entropy: float) -> Style:
    return bin_style(entropy_bin(entropy))


# The cursor and the NO_COLOR high-entropy mark are attributes, not colours, so they
# survive NO_COLOR and monochrome terminals.
CURSOR_STYLE = Style(reverse=True, bold=True)
HIGH_STYLE = Style(bold=True, underline=True)


@lru_cache(maxsize=256)
def token_style(bin_index: int, cursor: bool, high: bool, no_color: bool) -> Style:
    style = bin_style(bin_index)
    if no_color and high:
        style += HIGH_STYLE
    if cursor:
        style += CURSOR_STYLE
    return style


# The MI views: a token without an MI value is drawn neutral (grey text, no
# background); MI peaks are bold + underlined. Under NO_COLOR, where the background
# cannot carry entropy, the "both" view marks high entropy bold and peaks underlined.
NEUTRAL_STYLE = Style(color="grey50")
NEUTRAL_NO_COLOR = Style(dim=True)
PEAK_STYLE = Style(bold=True, underline=True)
VIEWS = ("entropy", "mi", "both")


@lru_cache(maxsize=1024)
def overlay_style(view: str, entropy_index: int, mi_index: int | None, cursor: bool,
                  high: bool, peak: bool, no_color: bool) -> Style:
    """A token's style in a view: `entropy` (colour = entropy), `mi` (colour = the MI
    step of the chosen estimator, peaks marked) or `both` (colour = entropy, MI peaks
    marked)."""
    if view == "entropy":
        return token_style(entropy_index, cursor, high, no_color)
    if view == "mi":
        if mi_index is None:
            style = NEUTRAL_NO_COLOR if no_color else NEUTRAL_STYLE
        else:
            style = bin_style(mi_index)
        if peak:
            style += PEAK_STYLE
    else:
        style = bin_style(entropy_index)
        if no_color:
            style += Style(bold=high, underline=peak)
        elif peak:
            style += PEAK_STYLE
    if cursor:
        style += CURSOR_STYLE
    return style


# A branch's inherited prefix (the tokens before its fork) is drawn faded: still on
# its colour, but clearly not the branch's own.
PREFIX_STYLE = Style(dim=True)


def append_entropy_scale(text: Text, *, compact: bool = False, units: bool = True) -> Text:
    """The entropy legend: "entropy" then each step's lower edge on its colour
    (0 … 3+), then "nats". The explorer's legend and `forkview figure` both draw it."""
    text.append("H" if compact else "entropy", style="dim")
    for i in range(N_BINS):
        text.append(f"{bin_label(i):>4}", style=bin_style(i))
    if units and not compact:
        text.append(" nats", style="dim")
    return text


def append_mi_scale(text: Text, label: str, lo: float, hi: float) -> Text:
    """The MI legend: the series, its per-trace scale lo … hi (5th to 95th percentile,
    forkview.analysis.peaks) as the colour steps between."""
    text.append("MI ", style="dim")
    text.append(label, style="bold")
    text.append(f" {lo:.3g} ", style="dim")
    for i in range(N_BINS):
        text.append("  ", style=bin_style(i))
    text.append(f" {hi:.3g}", style="dim")
    text.append(" p5–p95", style="dim")
    return text


_CONTROL = {i: chr(0x2400 + i) for i in range(0x20)}  # control pictures: ␀ ␁ ...
_CONTROL[0x7F] = "␡"
_CONTROL[ord("\t")] = TAB_MARK
_CONTROL[ord("\r")] = "␍"


def display_chunks(text: str) -> list[tuple[str, bool]]:
    """How a token piece is drawn: (chunk, line break after it) pairs.

    Newlines become a visible ⏎ followed by a real line break; empty pieces become ∅
    so the cursor can land on them; other control characters are drawn as Unicode
    control pictures so they cannot corrupt the terminal.
    """
    if text == "":
        return [(EMPTY_MARK, False)]
    out: list[tuple[str, bool]] = []
    parts = text.split("\n")
    for i, part in enumerate(parts):
        shown = part.translate(_CONTROL)
        if i < len(parts) - 1:
            out.append((shown + NEWLINE_MARK, True))
        elif shown:
            out.append((shown, False))
    return out
