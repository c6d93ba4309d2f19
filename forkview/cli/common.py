"""What several commands print or check the same way: status lines on stderr, MI
estimators named on the command line, the entropy-coloured token stream."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from forkview.cli.parser import PROG


def status_line(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def estimators_named(names: Sequence[str], params: Sequence[str]) -> list[Any]:
    """Estimator objects, validated before any model is loaded."""
    from models.estimators import get_estimator, parse_params

    out = []
    for name in names:
        name = name.strip()
        out.append(get_estimator(name, parse_params(name, params)))
    return out


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def token_printer():
    """Stream tokens to stderr coloured by entropy, for a person watching a terminal."""
    from rich.console import Console
    from rich.text import Text

    from forkview.ui.scale import entropy_style

    console = Console(stderr=True, highlight=False)

    def show(step: Any) -> None:
        console.print(Text(step.text, style=entropy_style(step.entropy)), end="")

    return show
