"""report.html's "Open set" section: the open-set summary and the paired differences of each score
against the top-probability baseline (`calm.evaluate.openset_report` rows)."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any

from calm.evaluate.openset_report import paired_rows, summary_rows
from calm.evaluate.report_sections import table
from calm.methods import DEFAULTS

__all__ = ["open_set_section"]


def open_set_section(results: Mapping[str, Any]) -> str:
    """The section's HTML ("" without an open-set evaluation)."""
    doc = results.get("open_set")
    if not doc:
        return ""
    held = doc.get("held_out", {})
    note = (
        f"{doc.get('n_held_out', 0)} class(es) held out per seed; "
        f"{doc.get('n_unknowns_external', 0)} clips of another store as unknowns. "
        "%, mean ± std over seeds; thresholds accept 95 % of known clips (test side, or set from the "
        "support set's leave-one-out scores: the top probability's, and the reject option's on its "
        f"known score, {DEFAULTS['unknown_score']})."
    )
    head, rows = summary_rows(doc)
    out = [f'<h2 id="open-set">Open set</h2><p class="muted">{escape(note)}</p>']
    out.append(table([escape(h) for h in head], [[escape(c) for c in r] for r in rows]))
    head, rows = paired_rows(doc)
    if rows:
        out.append("<h3>Paired per-seed differences against the top-probability baseline</h3>")
        out.append(table([escape(h) for h in head], [[escape(c) for c in r] for r in rows]))
    if doc.get("n_held_out"):
        items = "".join(f"<li>seed {escape(s)}: {escape(', '.join(c))}</li>" for s, c in held.items())
        out.append(f"<details><summary>held-out classes</summary><ul>{items}</ul></details>")
    return "".join(out)
