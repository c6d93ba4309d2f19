"""The entropy colour scale, shared by the CLI's streamed output and the explorer.

Perceptually ordered (viridis, sampled at 9 stops) on a fixed absolute scale in nats,
so the same colour means the same entropy in every trace. Colours are backgrounds
with a black or white foreground picked by luminance, which reads on light and dark
terminal themes alike; Rich maps them down to 256 colours where truecolor is missing.
"""

from __future__ import annotations

# Upper edges (nats) of each colour band; the last band is open-ended.
ENTROPY_EDGES = (0.01, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
VIRIDIS = (
    "#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c",
    "#28ae80", "#5ec962", "#addc30", "#fde725",
)


def entropy_band(entropy: float) -> int:
    for i, edge in enumerate(ENTROPY_EDGES):
        if entropy < edge:
            return i
    return len(ENTROPY_EDGES)


def _foreground(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "#000000" if luminance > 0.45 else "#ffffff"


def entropy_colours(entropy: float) -> tuple[str, str]:
    """(foreground, background) hex colours for a token of this entropy."""
    bg = VIRIDIS[entropy_band(entropy)]
    return _foreground(bg), bg


def entropy_style(entropy: float) -> str:
    fg, bg = entropy_colours(entropy)
    return f"{fg} on {bg}"


def legend_labels() -> list[str]:
    lows = (0.0, *ENTROPY_EDGES)
    return [f"<{ENTROPY_EDGES[0]:g}"] + [f"{lo:g}+" for lo in lows[1:]]
