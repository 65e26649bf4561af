"""Per-class head maps: which heads SAV, CALM-global and CALM keep for each class, how often over the
seeds and with what weight; results.json's `analyses.head_maps` and report.html's layers x heads
heat maps.

`run_protocol(keep_heads=...)` keeps each fitted classifier's head weights (C, K) (CALM: w_c^j; SAV:
1 / k for a kept head, 0 otherwise; `HeadWeighted`); `head_maps` folds those of one (method, shots)
over its fits into, per class and head kept at least once:

    {"method": "calm", "shots": 10, "n_fits": 10, "classes": [...],
     "heads": [3, 17, ...],           # indices into results.json's `analyses.head_names`
     "kept": [[0.9, 0.1, ...], ...],   # (C, len(heads)): share of fits keeping the head for the class
     "weight": [[0.081, ...], ...]}    # (C, len(heads)): mean weight over the fits (0 where dropped)

rounded to 3 significant digits (about float16) so that results.json stays small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from calm.evaluate.reliability import figure_html

__all__ = [
    "MAX_MAP_CLASSES",
    "HeadWeighted",
    "head_map_analyses",
    "head_map_figure",
    "head_map_section",
    "head_maps",
    "head_weights",
]

#: short row labels of the heads' sources (`calm.models.base.HeadName.source`)
SOURCES = {"encoder": "enc", "decoder_self": "self", "decoder_cross": "cross", "decoder": "dec"}
#: classes drawn per method in report.html (the rest are in results.json)
MAX_MAP_CLASSES = 30


class HeadWeighted(Protocol):
    """A fitted head classifier (`calm.classifiers.HeadClassifier`): its classes and head weights."""

    classes_: Any

    def _head_weights(self) -> np.ndarray: ...


def head_weights(clf: Any, classes: Sequence[str]) -> np.ndarray | None:
    """The weight (C, K) of each head in each class's score, rows in `classes` order (zeros for a
    class the fit has not seen), or None for a classifier without head weights."""
    if not callable(getattr(clf, "_head_weights", None)):
        return None
    fitted: HeadWeighted = clf
    w = np.asarray(fitted._head_weights(), dtype=np.float64)
    rows = {str(c): i for i, c in enumerate(fitted.classes_)}
    out = np.zeros((len(classes), w.shape[1]))
    for i, c in enumerate(classes):
        if c in rows:
            out[i] = w[rows[c]]
    return out


def _r(a: np.ndarray) -> list:
    return [[float(f"{x:.3g}") for x in row] for row in a]


def head_maps(weights: Mapping[tuple[str, int], Sequence[np.ndarray]], classes: Sequence[str]) -> list[dict]:
    """One map per (method, shots) of `ProtocolResult.head_weights` (schema in the module docstring)."""
    out = []
    for (method, shots), fits in weights.items():
        stack = np.stack(fits)  # (n_fits, C, K)
        kept = (stack > 0).mean(axis=0)
        heads = np.flatnonzero(kept.any(axis=0))
        out.append(
            {
                "method": method,
                "shots": int(shots),
                "n_fits": len(fits),
                "classes": list(classes),
                "heads": heads.tolist(),
                "kept": _r(kept[:, heads]),
                "weight": _r(stack.mean(axis=0)[:, heads]),
            }
        )
    return out


def head_map_analyses(
    weights: Mapping[tuple[str, int], Sequence[np.ndarray]], classes: Sequence[str], head_names: Sequence[Any]
) -> dict[str, Any]:
    """results.json's `analyses` entries: `head_maps` and the `head_names` ([layer, head, source]
    per head) their indices point into; {} when no fit kept its head weights."""
    if not weights:
        return {}
    return {"head_maps": head_maps(weights, classes), "head_names": [list(h) for h in head_names]}


def _grid(entry: Mapping[str, Any], head_names: Sequence[Sequence[Any]], n_heads: int) -> tuple:
    """(rows: the (source, layer) of each grid row, per class the (rows, heads) mean-weight grid)."""
    names = (
        [tuple(h) for h in head_names] if len(head_names) == n_heads else [(0, j, "") for j in range(n_heads)]
    )
    rows = sorted({(str(n[2]) if len(n) > 2 else "", int(n[0])) for n in names})
    where = {r: i for i, r in enumerate(rows)}
    n_cols = 1 + max(int(n[1]) for n in names)
    grids = np.zeros((len(entry["classes"]), len(rows), n_cols))
    for col, j in enumerate(entry["heads"]):
        n = names[j]
        r = where[(str(n[2]) if len(n) > 2 else "", int(n[0]))]
        grids[:, r, int(n[1])] = np.asarray(entry["weight"])[:, col]
    return rows, grids


def head_map_figure(
    entry: Mapping[str, Any], head_names: Sequence[Sequence[Any]], n_heads: int, title: str
) -> Any:
    """A matplotlib `Figure`: per class (up to `MAX_MAP_CLASSES`) a layers x heads heat map of the
    head's mean weight over the fits (0: never kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, grids = _grid(entry, head_names, n_heads)
    classes = list(entry["classes"])[:MAX_MAP_CLASSES]
    cols = min(5, len(classes))
    n_rows = -(-len(classes) // cols)
    fig, axes = plt.subplots(
        n_rows, cols, figsize=(2.6 * cols, 0.5 + (0.6 + 0.16 * len(rows)) * n_rows), squeeze=False
    )
    top = float(grids.max()) or 1.0
    for k, ax in enumerate(axes.ravel()):
        if k >= len(classes):
            ax.axis("off")
            continue
        image = ax.imshow(grids[k], cmap="Blues", vmin=0, vmax=top, aspect="auto", interpolation="nearest")
        ax.set_title(str(classes[k])[:24], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if k % cols == 0:  # the first column names the rows
            ax.set_yticks(range(len(rows)), [f"{SOURCES.get(s, s[:5])} {n}" for s, n in rows], fontsize=5)
    fig.suptitle(f"{title}, {entry['shots']}-shot: mean head weight over {entry['n_fits']} fits", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="weight")
    return fig


def head_map_section(results: Mapping[str, Any], titles: Mapping[str, str]) -> str:
    """report.html's head-map section ("" when results.json has no head maps)."""
    analyses = results.get("analyses") or {}
    maps = analyses.get("head_maps") or []
    if not maps:
        return ""
    names = analyses.get("head_names") or []
    n_heads = int(results.get("config", {}).get("n_heads") or 1 + max(j for m in maps for j in m["heads"]))
    out = [
        '<h2 id="head-maps">Head maps</h2><p class="muted">Per class, the heads each method kept '
        "(rows: layers, columns: heads in the layer) and their mean weight over the seeds' fits "
        "at the largest shot count; results.json <code>analyses.head_maps</code> has how often "
        "each was kept.</p>"
    ]
    for entry in maps:
        title = titles.get(entry["method"], entry["method"])
        caption = f"{title}, {entry['shots']}-shot head map"
        out.append(figure_html(head_map_figure(entry, names, n_heads, title), caption))
    return "\n".join(out)
