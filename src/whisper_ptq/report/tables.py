"""Tables, written one way for every output that has them (the bench report, sensitivity, search): a display
table (formatted cells and numbered notes) as Markdown, and raw values as CSV for spreadsheets and scripts."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def markdown_table(table: Table) -> str:
    """A GitHub-flavoured Markdown table, its notes numbered below it."""
    lines = [f"| {' | '.join(map(_md_cell, table.headers))} |", "|" + "---|" * len(table.headers)]
    lines += [f"| {' | '.join(map(_md_cell, row))} |" for row in table.rows]
    lines += [f"\n{i}. {note}" if i == 1 else f"{i}. {note}" for i, note in enumerate(table.notes, 1)]
    return "\n".join(lines)


def csv_text(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Raw values, one line per row; NaN and None as empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow(["" if c is None or (isinstance(c, float) and math.isnan(c)) else c for c in row])
    return buffer.getvalue()


def format_p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def format_p(p: float) -> str:
    """`p = 0.25`, or `p < 0.001`."""
    value = format_p_value(p)
    return f"p {value}" if value.startswith("<") else f"p = {value}"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
