"""The trace: every generated token on its entropy colour, with a token cursor.

A Line API widget: it lays tokens out itself (wrapping at token boundaries, breaking
lines at newline tokens) so it always knows which screen line holds which token.
That makes cursor scrolling, up/down by line and mouse clicks exact, and appending
a streamed batch costs only the new tokens.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from rich.cells import cell_len, chop_cells
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from forkview.ui.scale import (
    EMPTY_MARK,
    PREFIX_STYLE,
    display_chunks,
    entropy_bin,
    high_entropy_positions,
    high_entropy_threshold,
    overlay_style,
)
from models.types import TokenStep


@dataclass
class _Piece:
    token: int  # index into the trace's steps
    text: str
    x: int  # first cell on its line


class TraceView(ScrollView, can_focus=True):
    """Shows a trace's tokens; arrows/hjkl move the cursor, n/N jump between
    high-entropy tokens."""

    DEFAULT_CSS = """
    TraceView {
        scrollbar-gutter: stable;
        overflow-x: hidden;
        height: 1fr;
    }
    TraceView .trace-view--placeholder {
        color: $text-muted;
        text-style: italic;
    }
    """
    COMPONENT_CLASSES: ClassVar[set[str]] = {"trace-view--placeholder"}

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("left,h", "move(-1)", "prev", show=False),
        Binding("right,l", "move(1)", "next", show=False),
        Binding("up,k", "line(-1)", "line up", show=False),
        Binding("down,j", "line(1)", "line down", show=False),
        Binding("pageup", "page(-1)", "page up", show=False),
        Binding("pagedown", "page(1)", "page down", show=False),
        Binding("home,g", "first", "first", show=False),
        Binding("end,G", "last", "last", show=False),
        Binding("n", "high(1)", "next high-H"),
        Binding("N", "high(-1)", "prev high-H", show=False),
        Binding("right_square_bracket", "peak(1)", "next MI peak", show=False),
        Binding("left_square_bracket", "peak(-1)", "prev MI peak", show=False),
    ]

    cursor: reactive[int] = reactive(-1, always_update=True, repaint=False)

    class CursorMoved(Message):
        """The cursor landed on another token (index -1: no tokens)."""

        def __init__(self, view: TraceView, index: int) -> None:
            super().__init__()
            self.view = view
            self.index = index

        @property
        def control(self) -> TraceView:
            return self.view

    def __init__(self, *, placeholder: str = "", name: str | None = None,
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.placeholder = placeholder
        self.steps: list[TokenStep] = []
        # While streaming, the cursor rides on the newest token until the user moves it.
        self.follow = False
        self._high: list[int] = []
        self._high_set: set[int] = set()
        self.threshold: float | None = None
        # The view (see scale.VIEWS) and, for the MI views, each token's MI colour step
        # (None: no value) and the MI peaks.
        self.view_mode = "entropy"
        self._mi_bins: list[int | None] = []
        self._peaks: list[int] = []
        self._peak_set: set[int] = set()
        self._lines: list[list[_Piece]] = [[]]
        self._token_lines: list[tuple[int, int]] = []  # first and last line per token
        self._x = 0
        self._layout_width = 0
        # Tokens before this index are a branch's inherited prefix (drawn faded).
        self.dim_before = 0

    # ---------------------------------------------------------------- data
    @property
    def high_positions(self) -> list[int]:
        return self._high

    def is_high(self, index: int) -> bool:
        return index in self._high_set

    def set_steps(self, steps: Sequence[TokenStep], *, cursor: int | None = 0) -> None:
        """Replace the trace (cursor None keeps following the newest token)."""
        self.steps = list(steps)
        self._update_high()
        self._relayout()
        if cursor is None or not self.steps:
            self.cursor = len(self.steps) - 1
        else:
            self.cursor = max(0, min(cursor, len(self.steps) - 1))
        self.scroll_to(y=0, animate=False, immediate=True)
        self._scroll_to_cursor()
        self.refresh()

    def append_steps(self, steps: Iterable[TokenStep]) -> None:
        start = len(self.steps)
        self.steps.extend(steps)
        self._update_high()
        if self._layout_width:
            for i in range(start, len(self.steps)):
                self._place(i)
            self._sync_virtual_size()
        if self.follow and self.steps:
            self.cursor = len(self.steps) - 1
            self._scroll_to_cursor()
        self.refresh()

    @property
    def peak_positions(self) -> list[int]:
        return self._peaks

    def is_peak(self, index: int) -> bool:
        return index in self._peak_set

    def set_overlay(self, view_mode: str, mi_bins: Sequence[int | None],
                    peaks: Iterable[int]) -> None:
        """Colour by entropy, MI or both; repaints only (the layout is unchanged)."""
        self.view_mode = view_mode
        self._mi_bins = list(mi_bins)
        self._peaks = sorted(peaks)
        self._peak_set = set(self._peaks)
        self.refresh()

    def _update_high(self) -> None:
        entropies = [s.entropy for s in self.steps]
        self.threshold = high_entropy_threshold(entropies)
        self._high = high_entropy_positions(entropies)
        self._high_set = set(self._high)

    # ---------------------------------------------------------------- layout
    def _width(self) -> int:
        # 0 until the first layout; on_resize lays out again then.
        return max(0, self.scrollable_content_region.width)

    def _relayout(self) -> None:
        self._layout_width = self._width()
        self._lines = [[]]
        self._token_lines = []
        self._x = 0
        if self._layout_width:
            for i in range(len(self.steps)):
                self._place(i)
        self._sync_virtual_size()

    def _newline(self) -> None:
        self._lines.append([])
        self._x = 0

    def _place(self, index: int) -> None:
        width = self._layout_width
        first = len(self._lines) - 1
        chunks = display_chunks(self.steps[index].text)
        if all(cell_len(c) == 0 for c, _ in chunks):
            # e.g. a lone combining mark: give the cursor something to land on
            chunks = [(c + EMPTY_MARK, brk) for c, brk in chunks]
        started = False
        for chunk, line_break in chunks:
            w = cell_len(chunk)
            if self._x and self._x + w > width:
                self._newline()
            if not started:
                first = len(self._lines) - 1
                started = True
            parts = chop_cells(chunk, width) if w > width else [chunk]
            for j, part in enumerate(parts):
                if j:
                    self._newline()
                self._lines[-1].append(_Piece(index, part, self._x))
                self._x += cell_len(part)
            if line_break:
                self._newline()
        last = len(self._lines) - 1
        if not self._lines[-1] or self._lines[-1][-1].token != index:
            last -= 1  # the token ended with a line break
        self._token_lines.append((first, max(first, last)))

    def _sync_virtual_size(self) -> None:
        self.virtual_size = Size(self._layout_width, len(self._lines))

    def on_resize(self, _event: events.Resize) -> None:
        if self._width() != self._layout_width:
            self._relayout()
            self._scroll_to_cursor()
            self.refresh()

    # ---------------------------------------------------------------- rendering
    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base = self.rich_style
        line_no = self.scroll_offset.y + y
        if not self.steps:
            hint = textwrap.wrap(self.placeholder, max(8, width - 2))
            if 1 <= y <= len(hint):
                style = base + self.get_component_rich_style("trace-view--placeholder")
                return Strip([Segment(" " + hint[y - 1], style)]).adjust_cell_length(
                    width, base)
            return Strip.blank(width, base)
        if line_no >= len(self._lines):
            return Strip.blank(width, base)
        segments = []
        for piece in self._lines[line_no]:
            style = self._style(piece.token, piece.token == self.cursor)
            segments.append(Segment(piece.text, base + style))
        return Strip(segments).adjust_cell_length(width, base)

    # ---------------------------------------------------------------- cursor
    def watch_cursor(self, old: int, new: int) -> None:
        self.refresh()
        self.post_message(self.CursorMoved(self, new))

    def _scroll_to_cursor(self) -> None:
        if not (0 <= self.cursor < len(self._token_lines)):
            return
        first, last = self._token_lines[self.cursor]
        height = self.scrollable_content_region.height
        top = self.scroll_offset.y
        if first < top:
            self.scroll_to(y=first, animate=False, immediate=True)
        elif last >= top + height:
            self.scroll_to(y=max(0, last - height + 1), animate=False, immediate=True)

    def select(self, index: int, *, follow: bool = False) -> None:
        if not self.steps:
            return
        self.follow = follow
        self.cursor = max(0, min(index, len(self.steps) - 1))
        self._scroll_to_cursor()

    def _token_at(self, line: int, x: int) -> int | None:
        if not (0 <= line < len(self._lines)) or not self._lines[line]:
            return None
        best = self._lines[line][-1].token
        for piece in self._lines[line]:
            if x < piece.x + cell_len(piece.text):
                best = piece.token
                break
        return best

    def _cursor_x(self) -> int:
        first, _ = self._token_lines[self.cursor]
        for piece in self._lines[first]:
            if piece.token == self.cursor:
                return piece.x
        return 0

    def _move_lines(self, delta: int) -> None:
        if not self.steps or not self._token_lines:
            return
        first, last = self._token_lines[self.cursor]
        line = (first if delta < 0 else last) + delta
        line = max(0, min(line, len(self._lines) - 1))
        while 0 <= line < len(self._lines) and not self._lines[line]:
            line += 1 if delta > 0 else -1
        target = self._token_at(line, self._cursor_x())
        if target is None:
            target = 0 if delta < 0 else len(self.steps) - 1
        self.select(target)

    def action_move(self, delta: int) -> None:
        if self.steps:
            self.select(self.cursor + delta)

    def action_line(self, delta: int) -> None:
        self._move_lines(delta)

    def action_page(self, direction: int) -> None:
        self._move_lines(direction * max(1, self.scrollable_content_region.height - 1))

    def action_first(self) -> None:
        self.select(0)

    def action_last(self) -> None:
        # End while streaming resumes following the newest token.
        self.select(len(self.steps) - 1, follow=True)

    def action_high(self, direction: int) -> None:
        """Jump to the next (1) / previous (-1) high-entropy token, wrapping around."""
        if not self._high:
            return
        if direction > 0:
            after = [i for i in self._high if i > self.cursor]
            target = after[0] if after else self._high[0]
        else:
            before = [i for i in self._high if i < self.cursor]
            target = before[-1] if before else self._high[-1]
        self.select(target)

    def action_peak(self, direction: int) -> None:
        """Jump to the next (1) / previous (-1) MI peak, wrapping around."""
        if not self._peaks:
            self.notify("No MI peaks on this trace (press m to compute MI, v to show it).",
                        timeout=3)
            return
        if direction > 0:
            after = [i for i in self._peaks if i > self.cursor]
            target = after[0] if after else self._peaks[0]
        else:
            before = [i for i in self._peaks if i < self.cursor]
            target = before[-1] if before else self._peaks[-1]
        self.select(target)

    def on_click(self, event: events.Click) -> None:
        line = self.scroll_offset.y + event.y
        target = self._token_at(line, event.x)
        if target is not None:
            self.select(target)

    @property
    def line_count(self) -> int:
        return len(self._lines)

    def token_lines(self, index: int) -> tuple[int, int]:
        return self._token_lines[index]

    def set_dim_before(self, index: int) -> None:
        """Fade the tokens before `index` (a branch's prefix; 0: none)."""
        if index != self.dim_before:
            self.dim_before = index
            self.refresh()

    def _style(self, index: int, cursor: bool) -> Style:
        mi = self._mi_bins[index] if index < len(self._mi_bins) else None
        style = overlay_style(self.view_mode, entropy_bin(self.steps[index].entropy), mi,
                              cursor, index in self._high_set, index in self._peak_set,
                              self.app.no_color)
        if index < self.dim_before and not cursor:
            style += PREFIX_STYLE
        return style

    def style_for(self, index: int) -> Style:
        return self._style(index, False)
