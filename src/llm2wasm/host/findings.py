"""The layout every check list prints in (`invoke doctor`'s host checks and the pins' preflight):
'ok  what' or 'NO  what' with the fix under each problem."""

from __future__ import annotations

from collections.abc import Iterable


def report_lines(items: Iterable[tuple[bool, str, str]]) -> tuple[str, bool]:
    """The lines of (ok, what, fix) findings, and whether all were ok."""
    lines = []
    healthy = True
    for ok, what, fix in items:
        lines.append(f"{'ok ' if ok else 'NO '} {what}")
        if not ok and fix:
            lines.append(f"     fix: {fix}")
        healthy = healthy and ok
    return "\n".join(lines), healthy
