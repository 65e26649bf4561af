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
    selects_heads: bool

    def _head_weights(self) -> np.ndarray: ...


def head_weights(clf: Any, classes: Sequence[str]) -> np.ndarray | None:
    """The weight (C, K) of each head in each class's score, rows in `classes` order (zeros for a
    class the fit has not seen), or None for a classifier without head weights or one that keeps
    every head alike (``selects_heads`` False, `calm.classifiers.HeadClassifier.selects_heads`: the
    linear probe, nothing to map)."""
    if not callable(getattr(clf, "_head_weights", None)) or not getattr(clf, "selects_heads", True):
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
    row_of = [(str(n[2]) if len(n) > 2 else "", int(n[0])) for n in names]  # (source, layer)
    rows = sorted(set(row_of))
    where = {r: i for i, r in enumerate(rows)}
    n_cols = 1 + max(int(n[1]) for n in names)
    weight = np.asarray(entry["weight"])
    grids = np.zeros((len(entry["classes"]), len(rows), n_cols))
    for col, j in enumerate(entry["heads"]):
        grids[:, where[row_of[j]], int(names[j][1])] = weight[:, col]
    return rows, grids


#: classes side by side in one row of a method's mosaic
MOSAIC_COLUMNS = 10


def _mosaic(grids: np.ndarray, columns: int) -> np.ndarray:
    """Per-class (rows, heads) grids tiled `columns` to a row, one NaN row / column between them."""
    n, r, h = grids.shape
    n_rows = -(-n // columns)
    out = np.full((n_rows * (r + 1), min(n, columns) * (h + 1)), np.nan)
    for k in range(n):
        i, j = divmod(k, columns)
        out[i * (r + 1) : i * (r + 1) + r, j * (h + 1) : j * (h + 1) + h] = grids[k]
    return out


def head_map_figure(
    maps: Sequence[Mapping[str, Any]],
    head_names: Sequence[Sequence[Any]],
    n_heads: int,
    titles: Mapping[str, str],
) -> Any:
    """A matplotlib `Figure`, one panel per method: per class (up to `MAX_MAP_CLASSES`, tiled
    `MOSAIC_COLUMNS` to a row) a layers x heads heat map of each head's mean weight over the fits
    (white: never kept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = []
    for entry in maps:
        rows, grids = _grid(entry, head_names, n_heads)
        classes = list(entry["classes"])[:MAX_MAP_CLASSES]
        tiles.append((entry, rows, classes, _mosaic(grids[: len(classes)], MOSAIC_COLUMNS)))
    height = sum(0.5 + 0.13 * t[3].shape[0] for t in tiles)
    width = max(6.0, min(16.0, 1.0 + 0.15 * max(t[3].shape[1] for t in tiles)))
    ratios = [t[3].shape[0] for t in tiles]
    fig, axes = plt.subplots(
        len(tiles), 1, figsize=(width, height), squeeze=False, height_ratios=ratios, layout="constrained"
    )
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="white", under="white")
    for ax, (entry, rows, classes, mosaic) in zip(axes[:, 0], tiles, strict=True):
        top = float(np.nanmax(mosaic)) or 1.0
        image = ax.imshow(mosaic, cmap=cmap, vmin=1e-9, vmax=top, interpolation="nearest")
        r, h = len(rows), mosaic.shape[1] // min(len(classes), MOSAIC_COLUMNS) - 1
        for k, name in enumerate(classes):
            i, j = divmod(k, MOSAIC_COLUMNS)
            ax.text(j * (h + 1) + h / 2 - 0.5, i * (r + 1) - 0.7, str(name)[:16], ha="center", fontsize=6)
        ax.set_xticks([])
        ax.set_yticks(range(r), [f"{SOURCES.get(s, s[:5])} {n}" for s, n in rows], fontsize=4)
        title = titles.get(entry["method"], entry["method"])
        ax.set_title(f"{title}, {entry['shots']}-shot, {entry['n_fits']} fits", fontsize=8, pad=11)
        fig.colorbar(image, ax=ax, shrink=0.8, pad=0.01).ax.tick_params(labelsize=5)
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
        f"each was kept (the first {MAX_MAP_CLASSES} classes are drawn).</p>"
    ]
    caption = "Mean weight of each head per class over the seeds' fits (white: never kept)"
    return "".join(out) + figure_html(head_map_figure(maps, names, n_heads, titles), caption)
