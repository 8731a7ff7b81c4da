"""A report as a list of blocks (headings, paragraphs, bullets, tables, figures), rendered to Markdown and to a
self-contained HTML page, so both formats say exactly the same thing."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass

from whisper_ptq.report.tables import Table, markdown_table


@dataclass(frozen=True)
class Plot:
    name: str  # file name, fig_*.png
    caption: str
    png: bytes


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class FigureBlock:
    plot: Plot


Block = Heading | Para | Bullets | Table | FigureBlock


def render_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for block in blocks:
        match block:
            case Heading(text, level):
                out.append(f"{'#' * level} {text}")
            case Para(text):
                out.append(text)
            case Bullets(items):
                out.append("\n".join(f"- {item}" for item in items))
            case Table():
                out.append(markdown_table(block))
            case FigureBlock(plot):
                out.append(f"![{plot.caption}]({plot.name})\n\n*{plot.caption}*")
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    """Escape, then turn the only Markdown the blocks use (**bold**) into <strong>."""
    parts = html.escape(text).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } tr:nth-child(even) td { background: #fafafa; }
th, td:not(:last-child) { white-space: nowrap; } /* numbers and their intervals stay on one line; verdicts wrap */
.wide { overflow-x: auto; }
img { max-width: 100%; } figure { margin: 1.5em 0; } figcaption, ol { font-size: 0.85em; color: #555; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    out = []
    for block in blocks:
        match block:
            case Heading(text, level):
                out.append(f"<h{level}>{_inline_html(text)}</h{level}>")
            case Para(text):
                out.append(f"<p>{_inline_html(text)}</p>")
            case Bullets(items):
                out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in items) + "</ul>")
            case Table(headers, rows, notes):
                head = "".join(f"<th>{_inline_html(h)}</th>" for h in headers)
                body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rows)
                foot = "<ol>" + "".join(f"<li>{_inline_html(n)}</li>" for n in notes) + "</ol>" if notes else ""
                table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                out.append(f'<div class="wide">{table}</div>{foot}')
            case FigureBlock(plot):
                data = base64.b64encode(plot.png).decode("ascii")
                alt = html.escape(plot.caption)
                out.append(
                    f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{alt}</figcaption></figure>"
                )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )
