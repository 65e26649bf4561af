"""Prediction skew: per class, how often a method predicts it against how often it is the true class,
and one skew figure per method and shot count (from the per-episode prediction records, through
their confusion matrices, `calm.evaluate.predictions`).

Why: a classifier whose per-class scores live on different scales (CALM with weak heads: each
class's own head weights) lets some classes swallow the predictions while others are almost never
predicted; accuracy alone hides it. Definitions, per (method, shots), with counts averaged over
seeds (parts summed within a seed, as the confusion matrices):

- ``true``: queries whose true class is c; ``predicted``: queries predicted as c (a query with no
  answer counts for no class); ``ratio`` = predicted / true (None for a class never queried).
- ``max_ratio``: the largest ratio over classes (1.0 = no class over-predicted; 3.4 = one class is
  predicted 3.4 times as often as it occurs), with ``max_ratio_class``.
- ``max_ratio_per_seed``: the mean over seeds of each seed's largest ratio (a different class may
  swallow the predictions in each episode, which the mean counts above average away).
- ``starved_share``: the share of queried classes whose ratio is below ``STARVED_RATIO`` (0.25:
  predicted less than a quarter as often as they occur), with the list ``starved``.

`calm evaluate` writes them to results.json (``prediction_skew``), results.md (a table) and
report.html (section "prediction skew").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from calm.evaluate.predictions import Confusion

__all__ = ["STARVED_RATIO", "class_balance", "prediction_skew", "skew_markdown"]

#: a class predicted less than this fraction of its true count is "almost never predicted"
STARVED_RATIO = 0.25


def class_balance(conf: Confusion, digits: int = 4) -> dict[str, Any]:
    """Predicted against true counts per class, and the skew figures, of one (method, shots)."""
    n = len(conf.classes)
    true = conf.counts.sum(1)  # (C,) mean queries per class over seeds
    pred = conf.counts[:, :n].sum(0)  # (C,) mean predictions of each class over seeds
    queried = true > 0
    ratio = np.divide(pred, true, out=np.full(n, np.nan), where=queried)
    rows = [
        {
            "class": name,
            "true": round(float(true[j]), digits),
            "predicted": round(float(pred[j]), digits),
            "ratio": round(float(ratio[j]), digits) if queried[j] else None,
        }
        for j, name in enumerate(conf.classes)
    ]
    top = int(np.nanargmax(ratio)) if queried.any() else None
    seed_true, seed_pred = conf.per_seed.sum(2), conf.per_seed[:, :, :n].sum(1)  # (seeds, C)
    with np.errstate(all="ignore"):
        seed_ratio = np.where(seed_true > 0, seed_pred / np.where(seed_true > 0, seed_true, 1), np.nan)
        per_seed = float(np.nanmean(np.nanmax(seed_ratio, axis=1))) if queried.any() else None
    starved = [conf.classes[j] for j in np.flatnonzero(queried & (ratio < STARVED_RATIO))]
    return {
        "method": conf.method,
        "shots": conf.shots,
        "n_seeds": len(conf.seeds),
        "max_ratio": None if top is None else round(float(ratio[top]), digits),
        "max_ratio_class": None if top is None else conf.classes[top],
        "max_ratio_per_seed": None if per_seed is None else round(per_seed, digits),
        "starved_share": round(len(starved) / int(queried.sum()), digits) if queried.any() else None,
        "starved": starved,
        "classes": rows,
    }


def prediction_skew(confusions: Sequence[Confusion]) -> list[dict[str, Any]]:
    """`class_balance` of every (method, shots), in the confusions' order."""
    return [class_balance(c) for c in confusions]


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def skew_markdown(skew: Sequence[Mapping[str, Any]], titles: Mapping[str, str] | None = None) -> str:
    """results.md's table: per method and shots, the largest predicted / true ratio and its class,
    and the share of classes predicted < `STARVED_RATIO` x their true count."""
    if not skew:
        return ""
    titles = titles or {}
    lines = [
        "## Prediction skew (predicted / true count per class, mean over seeds)",
        "",
        f"Largest ratio over classes (of the mean counts, and mean over seeds of each seed's largest), "
        f"and the classes predicted less than {STARVED_RATIO:g} x as often "
        "as they occur (share of classes). Per-class counts: results.json `prediction_skew`.",
        "",
        "| method | shots | largest ratio (class) | per seed | almost never predicted |",
        "|---|---|---|---|---|",
    ]
    for s in skew:
        title = titles.get(s["method"], s["method"])
        top = _ratio(s["max_ratio"]) + (f" ({s['max_ratio_class']})" if s["max_ratio_class"] else "")
        share = "–" if s["starved_share"] is None else f"{100 * s['starved_share']:.0f} %"
        names = ", ".join(str(c) for c in s["starved"])
        cell = share + (f" ({names})" if names else "")
        per_seed = _ratio(s["max_ratio_per_seed"])
        lines.append(
            f"| {title} | {s['shots']} | {top.replace('|', '/')} | {per_seed} | {cell.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"
