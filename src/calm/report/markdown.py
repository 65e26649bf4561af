"""results.md sections built from prediction records: confusion matrices and per-class accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calm.report._markup import method_title
from calm.report.predictions import Confusion, per_class_accuracy

MAX_MARKDOWN_CLASSES = 25  # wider matrices are left to figures/ and report.html


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def confusion_markdown(confs: Sequence[Confusion]) -> str:
    """One table per method and shot count: mean count over seeds with the row percentage."""
    if not confs:
        return ""
    lines = ["## Confusion matrices (rows true, columns predicted; mean count over seeds, row %)", ""]
    for conf in confs:
        lines += [f"### {method_title(conf.method)}, {conf.shots} shots ({len(conf.seeds)} seeds)", ""]
        if len(conf.classes) > MAX_MARKDOWN_CLASSES:
            lines += [f"{len(conf.classes)} classes: see report.html and figures/.", ""]
            continue
        cols = conf.classes + (["no answer"] if conf.has_no_answer else [])
        pct = conf.row_percent
        lines.append("| true \\ predicted | " + " | ".join(_cell(c) for c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for i, name in enumerate(conf.classes):
            cells = [f"{conf.counts[i, j]:.1f} ({pct[i, j]:.0f}%)" for j in range(len(cols))]
            lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def per_class_markdown(confs: Sequence[Confusion]) -> str:
    """Per shot count: rows classes, columns methods, accuracy mean ± std over seeds (%)."""
    if not confs:
        return ""
    lines = ["## Per-class accuracy (%, mean ± std over seeds)", ""]
    for shots in sorted({c.shots for c in confs}):
        group = [c for c in confs if c.shots == shots]
        stats = [per_class_accuracy(c) for c in group]
        lines += [f"### {shots} shots", ""]
        lines.append("| class | " + " | ".join(method_title(c.method) for c in group) + " |")
        lines.append("|---|" + "---|" * len(group))
        for j, name in enumerate(group[0].classes):
            cells = [
                "–" if not np.isfinite(mean[j]) else f"{mean[j]:.1f} ± {std[j]:.1f}" for mean, std in stats
            ]
            lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
