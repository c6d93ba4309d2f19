"""Small text helpers shared by the CLI, the report and the screens (no dependencies)."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """"1 trace", "2 traces", "1,000 traces": a count with its noun in the right number."""
    return f"{n:,} {noun if n == 1 else (plural or noun + 's')}"
