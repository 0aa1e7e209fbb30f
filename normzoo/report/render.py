"""A report as a list of blocks (headings, paragraphs, tables, figures) rendered to Markdown and to one
self-contained HTML file (figures inlined as base64 PNG, CSS inline, no script, nothing fetched)."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    name: str  # file stem under the figures folder
    caption: str
    png: bytes


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def figure(self, figure: Figure) -> None:
        self.blocks.append(("figure", figure))

    @property
    def figures(self) -> list[Figure]:
        return [b for kind, b in self.blocks if kind == "figure"]

    def markdown(self, figures_dir: str) -> str:
        out = [f"# {self.title}", ""]
        for kind, block in self.blocks:
            if kind == "h2":
                out += [f"## {block}", ""]
            elif kind == "p":
                out += [block, ""]
            elif kind == "ul":
                out += [f"- {item}" for item in block] + [""]
            elif kind == "table":
                if block.caption:
                    out += [f"*{block.caption}*", ""]
                out.append("| " + " | ".join(block.columns) + " |")
                out.append("|" + "|".join("---" for _ in block.columns) + "|")
                out += ["| " + " | ".join(cell(v).replace("|", "\\|") for v in row) + " |" for row in block.rows]
                out.append("")
            elif kind == "figure":
                out += [f"![{block.name}]({figures_dir}/{block.name}.png)", "", f"*{block.caption}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        body = [f"<h1>{_inline(self.title)}</h1>"]
        for kind, block in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{_inline(block)}</h2>")
            elif kind == "p":
                body.append(f"<p>{_inline(block)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{_inline(c)}</th>" for c in block.columns)
                rows = "".join("<tr>" + "".join(f"<td>{_inline(cell(v))}</td>" for v in row) + "</tr>"
                               for row in block.rows)
                caption = f"<caption>{_inline(block.caption)}</caption>" if block.caption else ""
                body.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "figure":
                data = base64.b64encode(block.png).decode("ascii")
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                            f"<figcaption>{_inline(block.caption)}</figcaption></figure>")
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
                f"<title>{html.escape(self.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
                + "\n".join(body) + "\n</body>\n</html>\n")


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: .3em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1.2em 0; } img { max-width: 100%; height: auto; }
figcaption { font-style: italic; color: #555; }
code { background: #f3f3f3; padding: 0 .2em; }
"""


def _inline(text: str) -> str:
    """Escape, then turn `code` spans into <code> (the only Markdown used in report text)."""
    parts = html.escape(str(text)).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "not reached" if value > 0 else "-inf"
        return f"{value:.4g}"
    return str(value)
