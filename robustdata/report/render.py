"""Documents as data, rendered to markdown and to HTML by the Jinja2 templates in templates/.

A document is a list of (heading, blocks) sections, the first heading being its title. A block is a
paragraph (str), a bullet list (list[str]), a DocTable or a DocImage. The same document renders to both
formats, so report.md and report.html always say the same thing. HTML is autoescaped by Jinja2; markdown
text goes through the `md` filter: class names come from a user's folder names and must never become
markup in either format.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from robustdata.io import write_bytes_atomic


@dataclass(frozen=True)
class DocTable:
    header: list[str]
    rows: list[list[str]]
    marked: list[bool] = field(default_factory=list)  # rows to highlight (poisoned classes, the removal method)


@dataclass(frozen=True)
class DocImage:
    title: str
    src: str  # relative to the document


DocBlock = str | list[str] | DocTable | DocImage  # a paragraph, a bullet list, a table, a figure
Document = list[tuple[str, list[DocBlock]]]

_MARKDOWN_SPECIAL = str.maketrans({ch: "\\" + ch for ch in "\\`*[]|"})


def markdown_escape(text: object) -> str:
    """Text safe in markdown: no raw HTML and no emphasis, code or table-breaking pipes."""
    return html.escape(str(text), quote=False).translate(_MARKDOWN_SPECIAL)


@functools.cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("robustdata.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=True),
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the render instead of printing nothing
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    environment.filters["md"] = markdown_escape
    environment.tests["table"] = lambda block: isinstance(block, DocTable)
    environment.tests["image"] = lambda block: isinstance(block, DocImage)
    return environment


def render_markdown(document: Document) -> str:
    return _environment().get_template("document.md").render(document=document)


def render_html(document: Document) -> str:
    """One page in the shared layout (templates/layout.html, inline CSS); figures linked by relative path."""
    return _environment().get_template("document.html").render(document=document)


def write_documents(out_dir: Path, stem: str, document: Document) -> dict[str, Path]:
    """<out_dir>/<stem>.html and <stem>.md, each atomic; {"html": path, "markdown": path}."""
    paths = {"html": Path(out_dir) / f"{stem}.html", "markdown": Path(out_dir) / f"{stem}.md"}
    write_bytes_atomic(paths["html"], render_html(document).encode())
    write_bytes_atomic(paths["markdown"], render_markdown(document).encode())
    return paths
