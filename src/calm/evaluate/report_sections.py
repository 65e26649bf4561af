"""report.html's markup helpers and analysis sections: confusion matrices, per-class accuracy and the
classes CALM gains or loses, and the misclassified clips with audio players (all from per-episode
prediction records)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from calm.evaluate.predictions import Confusion, class_changes, misclassified, per_class_accuracy
from calm.evaluate.reports import METHOD_TITLES
from calm.evaluate.skew import STARVED_RATIO
from calm.methods import REGISTRY, principal

MAX_MATRIX_CLASSES = 25  # above this a confusion matrix is summarised by its largest confusions
MAX_CLIPS = 40  # misclassified clips listed per method


def method_title(method: str) -> str:
    return escape(METHOD_TITLES.get(method, method))


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


def _heat(pct: float) -> str:
    alpha = min(pct / 100.0, 1.0) * 0.85
    ink = "color:#fff;" if alpha > 0.5 else ""
    return f' style="background:rgba(var(--heat),{alpha:.2f});{ink}"'


def matrix_table(conf: Confusion) -> str:
    """Confusion matrix as a heat-mapped table: mean count over seeds, row percentage below it."""
    if len(conf.classes) > MAX_MATRIX_CLASSES:
        return top_confusions(conf)
    cols = conf.classes + (["no answer"] if conf.has_no_answer else [])
    head = ['<th class="l">true \\ predicted</th>'] + [f'<th class="rot">{escape(c)}</th>' for c in cols]
    pct = conf.row_percent
    rows = []
    for i, name in enumerate(conf.classes):
        row = [f'<th class="l">{escape(name)}</th>']
        for j in range(len(cols)):
            text = f"{conf.counts[i, j]:.1f}".removesuffix(".0")
            style = _heat(pct[i, j]) if conf.counts[i, j] else ' class="z"'
            row.append(f'<td{style} data-i="{i}" data-j="{j}">{text}<small>{pct[i, j]:.0f}%</small></td>')
        rows.append(row)
    return table(head, rows, "cm")


def top_confusions(conf: Confusion, n: int = 20) -> str:
    off = conf.counts[:, : len(conf.classes)].copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:n]
    pct = conf.row_percent
    rows = [
        [f'<td class="l">{escape(conf.classes[i])}</td>', f'<td class="l">{escape(conf.classes[j])}</td>']
        + [f"{off[i, j]:.1f}", f"{pct[i, j]:.1f}"]
        for i, j in zip(*np.unravel_index(order, off.shape), strict=True)
        if off[i, j] > 0
    ]
    head = ['<th class="l">true</th>', '<th class="l">predicted</th>', "mean count", "% of the class"]
    return f"<p>{len(conf.classes)} classes: the {n} largest confusions.</p>" + table(head, rows)


def confusion_section(confs: Sequence[Confusion]) -> str:
    out = ['<h2 id="confusion">Confusion matrices</h2>']
    if not confs:
        return out[0] + "<p>This run kept no per-episode predictions.</p>"
    out.append(
        '<p class="muted">Rows: true class; columns: predicted class. Each cell: mean count over seeds '
        "(parts summed within a seed) and the percentage of the true class's queries.</p>"
    )
    top = max(c.shots for c in confs)
    for shots in sorted({c.shots for c in confs}, reverse=True):
        cards = []
        for conf in (c for c in confs if c.shots == shots):
            seeds = f"{len(conf.seeds)} seed{'s' if len(conf.seeds) != 1 else ''}"
            cards.append(
                f'<div class="card" data-method="{escape(conf.method)}" data-shots="{shots}">'
                f'<h3>{method_title(conf.method)} <span class="muted">({seeds})</span></h3>'
                f"{matrix_table(conf)}</div>"
            )
        opened = " open" if shots == top else ""
        out.append(
            f"<details{opened}><summary>{shots} shots</summary>"
            f'<div class="grid">{"".join(cards)}</div></details>'
        )
    return "\n".join(out)


def per_class_section(confs: Sequence[Confusion]) -> str:
    if not confs:
        return ""
    out = ['<h2 id="per-class">Per-class accuracy</h2><p class="muted">Mean ± sample std over seeds (%).</p>']
    for shots in sorted({c.shots for c in confs}, reverse=True):
        group = [c for c in confs if c.shots == shots]
        stats = [per_class_accuracy(c) for c in group]
        rows = [
            [f'<td class="l">{escape(name)}</td>']
            + [
                f'<td data-method="{escape(c.method)}">{fmt(m[j], ".1f")} ± {fmt(s[j], ".1f")}</td>'
                for c, (m, s) in zip(group, stats, strict=True)
            ]
            for j, name in enumerate(group[0].classes)
        ]
        head = ['<th class="l">class</th>', *(method_title(c.method) for c in group)]
        body = table(head, rows, "per-class") + changes_tables(group)
        opened = " open" if shots == max(c.shots for c in confs) else ""
        out.append(f'<details{opened} data-shots="{shots}"><summary>{shots} shots</summary>{body}</details>')
    return "\n".join(out)


def _balance_cell(ratio: float | None, predicted: float, true: float) -> str:
    """A predicted / true cell: red below `STARVED_RATIO`, bold above 2."""
    cls = ' class="neg"' if ratio is not None and ratio < STARVED_RATIO else ""
    cls = ' class="best"' if ratio is not None and ratio > 2 else cls
    return f"<td{cls}>{predicted:.1f} / {true:.1f}<small> ×{fmt(ratio)}</small></td>"


def skew_section(skew: Sequence[Mapping[str, Any]]) -> str:
    """Per method and shots: the largest predicted / true ratio and the classes almost never
    predicted (`prediction_skew`: `calm.evaluate.skew`), then per shots the predicted / true
    counts of every class."""
    if not skew:
        return ""
    out = [
        '<h2 id="skew">Prediction skew</h2><p class="muted">Per class: queries predicted as it / queries '
        f"of it (mean over seeds) and their ratio; per seed: the mean over seeds of each seed's largest "
        f"ratio. Almost never predicted: ratio &lt; {STARVED_RATIO:g}.</p>"
    ]
    rows = [
        [f'<td class="l">{method_title(s["method"])}</td>', str(s["shots"])]
        + [f'<td data-method="{escape(s["method"])}" data-shots="{s["shots"]}">{fmt(s["max_ratio"])}</td>']
        + [f'<td class="l">{escape(str(s["max_ratio_class"] or "–"))}</td>', fmt(s["max_ratio_per_seed"])]
        + [fmt(None if s["starved_share"] is None else 100 * s["starved_share"], ".0f") + " %"]
        + [f'<td class="l">{escape(", ".join(map(str, s["starved"])))}</td>']
        for s in skew
    ]
    head = ['<th class="l">method</th>', "shots", "largest ratio", '<th class="l">class</th>', "per seed"]
    out.append(table(head + ["almost never predicted", '<th class="l">classes</th>'], rows, "skew"))
    for shots in sorted({s["shots"] for s in skew}, reverse=True):
        group = [s for s in skew if s["shots"] == shots]
        body = [
            [f'<td class="l">{escape(str(row["class"]))}</td>']
            + [
                _balance_cell(g["classes"][j]["ratio"], g["classes"][j]["predicted"], row["true"])
                for g in group
            ]
            for j, row in enumerate(group[0]["classes"])
        ]
        head = ['<th class="l">class</th>', *(method_title(g["method"]) for g in group)]
        out.append(
            f"<details><summary>{shots} shots: predicted / true</summary>{table(head, body)}</details>"
        )
    return "\n".join(out)


def _sign(value: float) -> str:
    return "pos" if value > 0 else "neg" if value < 0 else ""


def changes_tables(group: Sequence[Confusion]) -> str:
    """Classes the principal method (CALM) gains or loses against the `contrast` methods of
    `calm.methods` (SAV, the linear probe), paired over seeds."""
    by = {c.method: c for c in group}
    main = principal()
    out = []
    for other in (m.name for m in REGISTRY.values() if m.contrast):
        if main.name not in by or other not in by:
            continue
        changes = class_changes(by[main.name], by[other])
        shown = changes if len(changes) <= 2 * 10 else changes[:10] + changes[-10:]
        rows = [
            [f'<td class="l">{escape(c["class"])}</td>']
            + [f'<td class="{_sign(c["diff"])}">{c["diff"]:+.1f}</td>']
            + [f"{c['std']:.1f}", f"{c['better']} / {c['worse']} of {c['n_seeds']}"]
            for c in shown
            if c["diff"] != 0
        ]
        head = ['<th class="l">class</th>', "mean diff", "std", "seeds better / worse"]
        title = f"Classes {method_title(main.name)} gains (+) or loses (−) against {method_title(other)}"
        note = "" if len(shown) == len(changes) else " (the 10 largest gains and losses)"
        out.append(
            f"<h3>{title}{note}</h3>" + (table(head, rows, "changes") if rows else "<p>No difference.</p>")
        )
    return "".join(out)


def _audio_cell(row: int, clip_paths: Sequence[str], run_dir: Path) -> tuple[str, str]:
    """(player HTML, file name) of a store row; the link is relative to the run directory."""
    if not 0 <= row < len(clip_paths):
        return "–", f"row {row}"
    path = Path(clip_paths[row])
    rel = Path(os.path.relpath(path, run_dir)).as_posix()
    player = f'<audio controls preload="none" src="{escape(quote(rel))}"></audio>'
    return player, escape(path.name)


def misclassified_section(
    predictions: Sequence[Mapping[str, Any]],
    clip_paths: Sequence[str],
    run_dir: Path,
    confs: Sequence[Confusion],
) -> str:
    out = ['<h2 id="misclassified">Misclassified test clips</h2>']
    if not confs:
        return out[0] + "<p>This run kept no per-episode predictions.</p>"
    shots = max(c.shots for c in confs)
    out.append(
        f'<p class="muted">{shots} shots, the lowest seed of each method, most confident mistakes first; '
        "players link to the audio files relative to this page.</p>"
    )
    for method in dict.fromkeys(c.method for c in confs if c.shots == shots):
        wrong = misclassified(predictions, method, shots)
        rows = []
        for m in wrong[:MAX_CLIPS]:
            player, name = _audio_cell(m["row"], clip_paths, run_dir)
            pred = "no answer" if m["pred"] is None else escape(m["pred"])
            rows.append(
                [player, f'<td class="l">{name}</td>', f'<td class="l">{escape(m["true"])}</td>']
                + [f'<td class="l">{pred}</td>', fmt(m["p_pred"], ".3f"), fmt(m["p_true"], ".3f")]
            )
        seed = wrong[0]["seed"] if wrong else "–"
        more = f" (the first {MAX_CLIPS} of {len(wrong)})" if len(wrong) > MAX_CLIPS else ""
        head = [
            "listen",
            '<th class="l">clip</th>',
            '<th class="l">true</th>',
            '<th class="l">predicted</th>',
        ]
        body = table(head + ["p(predicted)", "p(true)"], rows, "wrong") if rows else "<p>None.</p>"
        out.append(
            f'<details open data-method="{escape(method)}">'
            f"<summary>{method_title(method)}: {len(wrong)} wrong, "
            f"seed {seed}{more}</summary>{body}</details>"
        )
    return "\n".join(out)
