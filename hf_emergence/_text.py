"""Plain-text formatting shared by the plan, the measure results and the CLI."""

from __future__ import annotations

from typing import Any, Collection


def format_k(k: Any) -> str:
    """A layer exponent: ``-`` for none, an int when whole (``-2``), else signed with one decimal (``+0.5``)."""
    if k is None:
        return "-"
    return str(int(k)) if float(k).is_integer() else f"{k:+.1f}"


def text_table(cols: list[str], cells: list[list[str]], left: Collection[str] = ("chain", "block", "probe", "name")) -> str:
    """Aligned text table of already formatted cells: columns named in ``left`` left-aligned, the rest right-aligned."""
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    left_at = {i for i, c in enumerate(cols) if c in left}

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in left_at else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(cols)] + [line(row) for row in cells])
