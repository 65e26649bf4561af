"""Small HTML-building helpers shared by the report's sections (escaped text in, markup out)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

import numpy as np


def titles() -> tuple[dict, dict]:
    from calm.evaluate import METHOD_TITLES, METRIC_TITLES

    return METHOD_TITLES, METRIC_TITLES


def method_title(method: str) -> str:
    return escape(titles()[0].get(method, method))


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None or not np.isfinite(value) else format(value, spec)


def table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """A table from already-escaped cell HTML (a cell may be a full `<td ...>` or `<th ...>`)."""

    def cell(c: str, tag: str) -> str:
        return c if c.startswith(("<td", "<th")) else f"<{tag}>{c}</{tag}>"

    out = [f'<table class="{cls}">' if cls else "<table>", "<thead><tr>"]
    out += [cell(h, "th") for h in head] + ["</tr></thead><tbody>"]
    out += ["<tr>" + "".join(cell(c, "td") for c in row) + "</tr>" for row in rows]
    return "".join(out) + "</tbody></table>"
