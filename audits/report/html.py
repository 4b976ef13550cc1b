"""Building blocks of self-contained HTML pages: escaping by default, one plotly.js, figures as data.

Every builder returns :class:`Markup`; any plain ``str`` handed to a builder is text and gets escaped. That makes
escaping the default rather than a step someone can forget: a class named ``<img src=x onerror=...>`` is shown as
text wherever it appears.

Figures are not inlined as ``<script>`` tags of their own: :meth:`Page.figure` stores the figure's JSON in the
page's single data block and leaves a placeholder that the page's script renders, also inside collapsed sections
once they are opened (see ``static/report.js``). plotly.js is embedded once, in the head.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import numpy as np

from .images import png_data_uri

__all__ = [
    "Markup",
    "esc",
    "join",
    "Page",
    "section",
    "table",
    "img",
    "figure_cell",
    "link",
    "json_for_script",
]


class Markup(str):
    """HTML that is already safe (built here); plain ``str`` is text."""

    __slots__ = ()


def esc(value: Any) -> Markup:
    """Text -> HTML (quotes too, so the result is safe inside attributes); Markup passes through."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[Any], sep: str = "") -> Markup:
    return Markup(esc(sep).join(esc(p) for p in parts))


def tag(name: str, *children: Any, **attrs: Any) -> Markup:
    """``<name attrs>children</name>``; attribute names use ``_`` for ``-`` and a trailing ``_`` for keywords."""
    rendered = "".join(
        f" {k.rstrip('_').replace('_', '-')}" + ("" if v is True else f'="{esc(v)}"')
        for k, v in attrs.items()
        if v is not None and v is not False
    )
    return Markup(f"<{name}{rendered}>{join(children)}</{name}>")


def json_for_script(data: Any) -> Markup:
    """JSON for a ``<script type="application/json">`` block: ``</`` is escaped so no string can end the block."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False, default=_json_default)
    return Markup(text.replace("</", "<\\/").replace("<!--", "<\\!--"))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def img(picture: np.ndarray | str, alt: str, *, width: int | None = None, cls: str | None = None) -> Markup:
    """An inline image: an ``(H, W, 3)`` uint8 array or a ``data:`` URI (see ``images.relevance_data_uri``);
    ``width`` scales it in the page (pixelated, so small maps stay readable)."""
    if isinstance(picture, str):
        if not picture.startswith("data:image/"):
            raise ValueError("img() takes arrays or data:image URIs only: the page must not load anything")
        src, shape = picture, None
    else:
        src, shape = png_data_uri(picture), picture.shape
    size = ""
    if width:
        height = int(round(width * shape[0] / shape[1])) if shape else int(width)
        size = f' width="{int(width)}" height="{height}"'
    return Markup(
        f'<img src="{esc(src)}" alt="{esc(alt)}" title="{esc(alt)}"{size}'
        + (f' class="{esc(cls)}"' if cls else "")
        + ">"
    )


def figure_cell(image: Markup, caption: Any) -> Markup:
    return tag("figure", image, tag("figcaption", caption), class_="cell")


def link(href: str, text: Any) -> Markup:
    return tag("a", text, href=href)


def section(
    title: Any, body: Any, *, anchor: str | None = None, open: bool = True, lazy: bool = False, level: int = 2
) -> Markup:
    """A collapsible section. ``lazy=True`` keeps its body in a ``<template>`` (inert: no image is decoded, no plot
    drawn) until it is opened, which keeps a page with hundreds of sections fast."""
    heading = tag(f"h{level}", title)
    content = tag("template", body) if lazy else tag("div", body, class_="body")
    return tag("details", tag("summary", heading), content, id=anchor, open=open, class_="lazy" if lazy else None)


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], *, cls: str | None = None) -> Markup:
    head = tag("thead", tag("tr", *(tag("th", h) for h in header)))
    body = tag("tbody", *(tag("tr", *(tag("td", c) for c in row)) for row in rows))
    return tag("table", head, body, class_=cls)


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


class Page:
    """One standalone HTML document: head (style, plotly.js once), body blocks, one JSON data block, one script."""

    def __init__(self, title: str):
        self.title = title
        self._blocks: list[Markup] = []
        self._figures: dict[str, dict] = {}
        self.data: dict[str, Any] = {}

    def add(self, *blocks: Any) -> Page:
        self._blocks.extend(esc(b) for b in blocks)
        return self

    def figure(self, fig: Any, *, cls: str = "plot") -> Markup:
        """Register a plotly figure; returns its placeholder, to be put anywhere (also in lazy sections)."""
        import plotly.io as pio

        key = f"fig{len(self._figures)}"
        spec = json.loads(pio.to_json(fig, validate=False, remove_uids=True))
        self._figures[key] = {"data": spec.get("data", []), "layout": spec.get("layout", {})}
        return tag("div", "", class_=cls, data_figure=key)

    @property
    def n_figures(self) -> int:
        return len(self._figures)

    def render(self) -> str:
        payload = {"figures": self._figures, **self.data}
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            # nothing on this page may come from the network: images are data URIs, scripts are inline
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            "style-src 'unsafe-inline'; script-src 'unsafe-inline' 'unsafe-eval'; font-src data:\">\n"
            f"<title>{esc(self.title)}</title>\n<style>\n{_static('report.css')}\n</style>\n"
            f"<script>\n{_plotly_js()}\n</script>\n</head>\n<body>\n"
            + "\n".join(self._blocks)
            + f'\n<script type="application/json" id="report-data">{json_for_script(payload)}</script>\n'
            f"<script>\n{_static('report.js')}\n</script>\n</body>\n</html>\n"
        )
