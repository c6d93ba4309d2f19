"""The `?` help screen: every key, and how to read the colours."""

from __future__ import annotations

from typing import ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from forkview.ui.scale import N_BINS, bin_label, bin_style

KEYS = [
    ("Explorer", [
        ("Enter", "generate from the prompt (in the prompt box)"),
        ("Esc", "stop generating: the trace keeps its tokens, status stopped; stop"
                " MI: values computed so far are kept; when idle, leave the prompt box"),
        ("p  Tab", "go to the prompt box / back to the trace"),
        ("ctrl+u", "in the prompt box: delete everything left of the cursor"),
        ("← →  h l", "previous / next token"),
        ("↑ ↓  k j", "token on the line above / below"),
        ("Home End  g G", "first / last token (End follows a running generation)"),
        ("PgUp PgDn", "a page up / down"),
        ("n  N", "next / previous high-entropy token (top 20% of this trace)"),
        ("click", "select a token; in the chart, jump to that column"),
        ("b  F2", "trace browser"),
    ]),
    ("Forks", [
        ("Enter", "on a token: the fork panel (its entropy, MI and recorded top-k"
                  " alternatives with their probabilities)"),
        ("  ↑ ↓ Enter", "branch from an alternative: it streams into the trace view"),
        ("  type, Enter", "force any text as the next token(s) and continue from it"),
        ("  sample N", "N continuations in one batch, keeping the token or resampling"
                       " it; their answers are shown next to the original's"),
        ("Esc", "stop the growing branches (they keep their tokens, marked stopped);"
                " queued requests run one after another"),
        ("t", "the family tree: root, branches, rollouts (grouped per position)"),
        ("  Enter", "open a node (a branch shows its whole response, the inherited"
                    " prefix faded)"),
        ("  c  c", "mark a node, then compare it with another side by side"),
        ("  d", "delete a branch and everything below it (asks first)"),
        ("  Space", "fold / unfold a node"),
    ]),
    ("MI", [
        ("v", "view: colour by entropy → by MI → both (entropy colour, MI peaks"
              " underlined)"),
        ("e", "next MI series: estimator + parameters, among the runs with values"),
        ("r", "peak rule: tukey τ=1.5 (m > Q3 + 1.5·IQR) → top-k k=20 → top-r ρ=0.2"),
        ("]  [", "next / previous MI peak"),
        ("m", "compute MI on this trace (hsic, answer-gain; needs the model;"
              " runs by itself after each generation)"),
        ("R", "overlap report of this database: high-entropy tokens against MI"
              " peaks, per model × estimator (filter by model, set, estimator)"),
    ]),
    ("Browser", [
        ("↑ ↓  Enter", "choose a trace and open it in the explorer"),
        ("/", "filter by text (prompt or output) and by model"),
        ("Esc", "back to the explorer"),
    ]),
    ("Compare", [
        ("← → ↑ ↓", "move the cursor; the other column follows to the same position"),
        ("Tab", "the other column leads"),
        ("v", "entropy / MI / both, on both columns"),
        ("Esc", "back to the tree"),
    ]),
    ("Everywhere", [
        ("?  F1", "this help (F1 also inside a text box)"),
        ("q", "quit; inside a text box q types a letter, so use ctrl+q there"),
        ("ctrl+q", "quit from anywhere; a running generation is saved as stopped"),
    ]),
]

NOTES = (
    "Each token's background is its entropy: nats over the full vocabulary at T = 1, "
    "from the step that chose it, on a fixed scale so traces compare by eye. The side "
    "panel shows the selected token's numbers and its top alternatives (▶ = chosen). "
    "⏎ marks a newline inside a token, ∅ a token with no text of its own (a special "
    "token, or bytes completed by a later token). With NO_COLOR set, the top 20% "
    "entropy tokens are bold + underlined and the cursor is reversed.\n\n"
    "MI view: the colour is the chosen MI series on a per-trace scale (its 5th to 95th "
    "percentile in 9 equal steps, values outside clipped; hsic is a kernel score, not "
    "nats); grey tokens have no value. MI peaks are bold + underlined, by the rule shown "
    "in the legend. The chart under the trace: H = entropy (bar height relative to the "
    "trace's largest, colour on the entropy scale), MI = the chosen series (min..max of "
    "the trace), markers • high entropy (top 20%), ▲ MI peak, ◆ both; the reversed column "
    "is the cursor. With many tokens a column holds several (bars show the largest). The "
    "side panel lists every MI run at the cursor (▸ = shown, ▲ = peak) and, at a rollout "
    "position, the answers each forked alternative reached. With NO_COLOR, the both "
    "view marks high entropy bold and MI peaks underlined.\n\n"
    "Forks: a branch is a child trace that keeps its parent's tokens before the fork "
    "position, puts the chosen (or typed) token(s) there and continues with the same "
    "settings and its own seed (samples of a greedy trace are drawn at T = 1). Shown "
    "in the explorer, its inherited prefix is faded and the status line reads "
    "⑂#parent@position; `forkview replay --db PATH --trace ID` regenerates it token for token."
)


def help_renderable() -> Group:
    keys = Table.grid(padding=(0, 2))
    keys.add_column(style="bold", no_wrap=True)
    keys.add_column()
    for n, (section, rows) in enumerate(KEYS):
        if n:
            keys.add_row("", "")
        keys.add_row(Text(section, style="bold underline"), "")
        for key, what in rows:
            keys.add_row(key, what)
    scale = Text("Colours", style="bold underline")
    scale.append("  ", style="")
    for i in range(N_BINS):
        scale.append(f"{bin_label(i):>4}", style=bin_style(i))
    scale.append(" nats", style="")
    return Group(keys, Text(""), scale, Text(""), Text(NOTES))


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen {
        align: center middle;
    }
    HelpScreen > VerticalScroll {
        width: 90%;
        max-width: 96;
        height: 90%;
        border: round $primary;
        border-title-align: center;
        background: $surface;
        padding: 0 1;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark,f1", "dismiss", "close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll() as scroll:
            scroll.border_title = "help · Esc closes"
            yield Static(help_renderable())
