"""Statistics over run records: per (method, shots, metric) mean and sample std over seeds, paired
per-seed differences between methods with 95 % intervals, and the pseudo-label summary.

A seed's value is its mean over parts when folds rotate. Every method of a seed saw the same support
sets, so the per-seed differences are paired; the interval is Student's t at 95 %.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from calm.evaluate.estimators import PL_BASES

__all__ = ["paired_differences", "pseudo_label_summary", "summarise"]


def _seed_values(runs: Sequence[dict], method: str, shots: int, metric: str) -> dict[int, float]:
    """Each seed's value of a metric (mean over the parts of that seed)."""
    per: dict[int, list[float]] = {}
    for r in runs:
        if r["method"] == method and r["shots"] == shots and metric in r["metrics"]:
            per.setdefault(r["seed"], []).append(r["metrics"][metric])
    return {s: float(np.mean(v)) for s, v in sorted(per.items())}


def _metrics_of(runs: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(m for r in runs for m in r["metrics"]))


def _keys(runs: Sequence[dict]) -> tuple[list[str], list[int]]:
    return list(dict.fromkeys(r["method"] for r in runs)), sorted({r["shots"] for r in runs})


def summarise(runs: Sequence[dict]) -> list[dict]:
    """Mean and sample std over seeds for every (method, shots, metric)."""
    methods, shots = _keys(runs)
    out = []
    for m, n, metric in itertools.product(methods, shots, _metrics_of(runs)):
        values = np.array(list(_seed_values(runs, m, n, metric).values()))
        if len(values) == 0:
            continue
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(
            {
                "method": m,
                "shots": n,
                "metric": metric,
                "mean": float(values.mean()),
                "std": std,
                "n_seeds": len(values),
            }
        )
    return out


def paired_differences(runs: Sequence[dict]) -> list[dict]:
    """For every pair of methods (in run order), shots and metric: mean per-seed a - b, 95 % t interval."""
    from scipy import stats

    methods, shots = _keys(runs)
    out = []
    for (a, b), n, metric in itertools.product(itertools.combinations(methods, 2), shots, _metrics_of(runs)):
        va, vb = _seed_values(runs, a, n, metric), _seed_values(runs, b, n, metric)
        common = sorted(set(va) & set(vb))
        if not common:
            continue
        d = np.array([va[s] - vb[s] for s in common])
        mean = float(d.mean())
        if len(d) > 1:
            half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
            low: float | None = mean - half
            high: float | None = mean + half
        else:
            low = high = None
        out.append(
            {
                "a": a,
                "b": b,
                "shots": n,
                "metric": metric,
                "mean_diff": mean,
                "ci95_low": low,
                "ci95_high": high,
                "n_seeds": len(d),
            }
        )
    return out


def pseudo_label_summary(runs: Sequence[dict]) -> list[dict]:
    """Per shots, over the episodes of the pseudo-label methods: mean pool size, mean clips kept,
    mean accuracy (%) of the kept pseudo-labels (episodes that kept nothing left out of that mean,
    None when none kept anything), and how many episodes left a class without any kept clip."""
    per: dict[int, dict[tuple, dict]] = {}
    for r in runs:
        if r["method"] in PL_BASES:
            per.setdefault(r["shots"], {})[(r["seed"], r["part"])] = r["pseudo_labels"]
    out = []
    for shots, reps in sorted(per.items()):
        acc = [v["label_accuracy_kept"] for v in reps.values() if v["kept"] > 0]
        out.append(
            {
                "shots": shots,
                "episodes": len(reps),
                "pool": float(np.mean([v["pool"] for v in reps.values()])),
                "kept": float(np.mean([v["kept"] for v in reps.values()])),
                "label_accuracy_kept": float(np.mean(acc)) if acc else None,
                "episodes_missing_classes": sum(bool(v["missing_classes"]) for v in reps.values()),
            }
        )
    return out
