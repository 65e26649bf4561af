"""The open-set tables (results.json's `open_set`, `calm.evaluate.openset`) as plain text rows, and
as the "Open set" part of results.md; report.html's section (`calm.evaluate.openset_html`) reads the
same rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from calm.methods import REGISTRY

__all__ = ["COLUMNS", "markdown_table", "open_set_markdown", "paired_rows", "summary_rows"]

#: metric -> its column title (the metrics of `calm.evaluate.openset`, in table order)
COLUMNS: dict[str, str] = {
    "auroc_top_proba": "AUROC top prob. (baseline)",
    "auroc_top_decision": "AUROC top decision",
    "auroc_margin": "AUROC margin",
    "auroc_similarity": "AUROC similarity",
    "auroc_known_score": "AUROC known score (reject option)",
    "far95_top_proba": "FAR@95 top prob. (test thr.)",
    "far95_known_score": "FAR@95 known score (test thr.)",
    "far95_support": "FAR@95 top prob. (support thr.)",
    "far95_support_known": "FAR@95 reject option (support thr.)",
    "accept_support_known": "known accepted by reject option",
    "open_accuracy": "open-set accuracy (top prob.)",
    "open_accuracy_known": "open-set accuracy (reject option)",
    "open_macro_f1": "open-set macro-F1",
    "coverage": "coverage (α 0.1)",
    "set_size": "set size",
    "empty_unknown": "unknowns with empty set",
}


def _title(method: str) -> str:
    return REGISTRY[method].title if method in REGISTRY else method


def summary_rows(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per method and shots, mean ± std over seeds of each metric ("–": none)."""
    summary = doc.get("summary", [])
    lookup = {(s["method"], s["shots"], s["metric"]): s for s in summary}
    rows = []
    for method in dict.fromkeys(s["method"] for s in summary):
        for shots in sorted({s["shots"] for s in summary if s["method"] == method}):
            cells = [_title(method), str(shots)]
            for metric in COLUMNS:
                s = lookup.get((method, shots, metric))
                cells.append("–" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f}")
            rows.append(cells)
    return ["method", "shots", *COLUMNS.values()], rows


def paired_rows(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each alternative score minus the baseline, per method, shots and metric."""
    rows = []
    for p in doc.get("paired", []):
        low, high = p["ci95_low"], p["ci95_high"]
        ci = "–" if low is None else f"[{low:+.2f}, {high:+.2f}]"
        metric = "AUROC" if p["metric"] == "auroc" else "FAR@95 (test thr.)"
        rows.append([_title(p["method"]), str(p["shots"]), p["a"], metric, f"{p['mean_diff']:+.2f}", ci])
    head = ["method", "shots", "score", "metric", "mean score − baseline", "95 % interval"]
    return head, rows


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A results.md table (lines, a blank one last) of already formatted cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def open_set_markdown(doc: Mapping[str, Any] | None) -> list[str]:
    """results.md's "Open set" lines (none without an open-set evaluation)."""
    if not doc:
        return []
    held = doc.get("held_out", {})
    external = doc.get("n_unknowns_external", 0)
    seeds = "; ".join(f"seed {s}: {', '.join(c)}" for s, c in held.items())
    lines = [
        "## Open set (%, mean ± std over seeds; set size in classes)",
        "",
        (
            f"{doc['n_held_out']} class(es) held out per seed ({seeds})"
            if doc.get("n_held_out")
            else "No class held out"
        )
        + (f"; the {external} clips of {doc.get('unknowns_features')} as unknowns" if external else "")
        + f". Thresholds accept {100 * doc.get('accept', 0.95):.0f} % of known clips.",
        "",
    ]
    lines += markdown_table(*summary_rows(doc))
    head, rows = paired_rows(doc)
    if rows:
        lines += ["### Open set: paired per-seed differences against the top-probability baseline", ""]
        lines += markdown_table(head, rows)
    return lines
