"""Per-episode test predictions, and what they add up to: confusion matrices and per-class accuracy.

`calm evaluate` keeps them beside results.json, in RUN_DIR/predictions.jsonl (a side file: they grow
as queries x episodes, which would swamp results.json), one prediction record per line and per
(method, shots, seed, part) -- the keys of the run record it belongs to:

    {"method": "calm", "shots": 5, "seed": 0, "part": "fold5",
     "classes": ["dog", "rain", ...],     # the episode's classes; the indices below point into it
     "query":  [12, 40, ...],             # store rows (load_features order) of the query clips
     "y_true": [0, 3, ...],               # true class index of each query
     "y_pred": [0, 1, ...],               # predicted class index, -1 = no answer (always wrong)
     "p_pred": [0.91, 0.40, ...],         # probability the method gave its prediction (None: none)
     "p_true": [0.91, 0.22, ...]}         # probability it gave the true class (None: none)

Full score matrices are not kept (they grow as queries x classes x episodes); refit from the store
with the run's recorded parameters to get them. Single-label tasks only: multi-label runs keep none.

Aggregation: a seed's confusion matrix sums its parts (rotating folds); matrices and per-class
accuracies are then averaged over seeds, with the sample standard deviation over seeds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Confusion",
    "confusion_counts",
    "confusions",
    "per_class_accuracy",
    "class_changes",
    "misclassified",
    "episode_record",
    "write_predictions",
    "read_predictions",
    "PREDICTIONS_FILE",
]

PREDICTIONS_FILE = "predictions.jsonl"  # in every run directory, one record per line


@dataclass(frozen=True)
class Confusion:
    """Mean confusion counts over seeds: rows true class, columns predicted class (+ "no answer")."""

    method: str
    shots: int
    classes: list[str]
    counts: np.ndarray  # (C, C + 1) mean over seeds; last column: queries with no answer
    per_seed: np.ndarray  # (n_seeds, C, C + 1)
    seeds: list[int]

    @property
    def row_percent(self) -> np.ndarray:
        """(C, C + 1) counts as percentages of each true class's queries (0 for an empty row)."""
        totals = self.counts.sum(1, keepdims=True)
        return np.divide(100 * self.counts, totals, out=np.zeros_like(self.counts), where=totals > 0)

    @property
    def has_no_answer(self) -> bool:
        return bool(self.counts[:, -1].any())


def confusion_counts(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(C, C + 1) integer counts; a prediction of -1 (no answer) falls in the last column."""
    out = np.zeros((n_classes, n_classes + 1), dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    np.add.at(out, (np.asarray(y_true, dtype=np.int64), np.where(pred < 0, n_classes, pred)), 1)
    return out


def _grouped(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], dict[int, list]]:
    groups: dict[tuple[str, int], dict[int, list]] = {}
    for r in records:
        groups.setdefault((r["method"], int(r["shots"])), {}).setdefault(int(r["seed"]), []).append(r)
    return groups


def confusions(records: Sequence[Mapping[str, Any]]) -> list[Confusion]:
    """One `Confusion` per (method, shots) in record order: parts summed per seed, mean over seeds."""
    out = []
    for (method, shots), by_seed in _grouped(records).items():
        classes = list(next(iter(by_seed.values()))[0]["classes"])
        per_seed = []
        for recs in by_seed.values():
            if any(list(r["classes"]) != classes for r in recs):
                raise ValueError(f"{method} {shots}-shot: episodes with different class lists")
            per_seed.append(sum(confusion_counts(r["y_true"], r["y_pred"], len(classes)) for r in recs))
        stack = np.stack(per_seed).astype(np.float64)
        out.append(Confusion(method, shots, classes, stack.mean(0), stack, sorted(by_seed)))
    return out


def per_class_accuracy(confusion: Confusion) -> tuple[np.ndarray, np.ndarray]:
    """Per-class accuracy (%) over seeds: (mean (C,), sample std (C,)); NaN for a class never queried."""
    c = len(confusion.classes)
    rows = confusion.per_seed.sum(2)  # (n_seeds, C)
    right = confusion.per_seed[:, np.arange(c), np.arange(c)]
    acc = np.divide(100 * right, rows, out=np.full(rows.shape, np.nan), where=rows > 0)
    with np.errstate(invalid="ignore"):
        std = np.nanstd(acc, axis=0, ddof=1) if len(acc) > 1 else np.zeros(c)
        return np.nanmean(acc, axis=0), np.nan_to_num(std)


def class_changes(a: Confusion, b: Confusion) -> list[dict[str, Any]]:
    """Per class, accuracy of `a` minus that of `b` (same shots): mean paired difference over the seeds
    both have, its sample std, and in how many seeds `a` was better / worse; sorted by the mean."""
    if a.classes != b.classes:
        raise ValueError("class_changes needs the same classes")
    seeds = [s for s in a.seeds if s in b.seeds]
    if not seeds:
        return []
    c = len(a.classes)

    def acc(conf: Confusion) -> np.ndarray:
        idx = [conf.seeds.index(s) for s in seeds]
        m = conf.per_seed[idx]
        rows = m.sum(2)
        return np.divide(
            100 * m[:, np.arange(c), np.arange(c)], rows, out=np.zeros(rows.shape), where=rows > 0
        )

    d = acc(a) - acc(b)  # (seeds, C)
    out = [
        {
            "class": a.classes[j],
            "diff": float(d[:, j].mean()),
            "std": float(d[:, j].std(ddof=1)) if len(seeds) > 1 else 0.0,
            "better": int((d[:, j] > 0).sum()),
            "worse": int((d[:, j] < 0).sum()),
            "n_seeds": len(seeds),
        }
        for j in range(c)
    ]
    return sorted(out, key=lambda r: -r["diff"])


def misclassified(
    records: Sequence[Mapping[str, Any]], method: str, shots: int, seed: int | None = None
) -> list[dict[str, Any]]:
    """The wrong queries of one seed (default: the lowest) of a method at `shots`, every part:
    store row, true and predicted class names, and the two probabilities; most confident first."""
    recs = [r for r in records if r["method"] == method and int(r["shots"]) == shots]
    if not recs:
        return []
    seed = min(int(r["seed"]) for r in recs) if seed is None else seed
    out = []
    for r in (r for r in recs if int(r["seed"]) == seed):
        for i, (t, p) in enumerate(zip(r["y_true"], r["y_pred"], strict=True)):
            if t != p:
                out.append(
                    {
                        "row": int(r["query"][i]),
                        "part": r["part"],
                        "seed": seed,
                        "true": r["classes"][t],
                        "pred": r["classes"][p] if p >= 0 else None,
                        "p_pred": r["p_pred"][i],
                        "p_true": r["p_true"][i],
                    }
                )
    return sorted(out, key=lambda m: -(m["p_pred"] or 0.0))


def episode_record(
    key: Mapping[str, Any],
    classes: Sequence[str],
    query: Sequence[int] | np.ndarray,
    truth: Sequence[str],
    y_pred: Sequence[str | None],
    scores: np.ndarray | None,
    digits: int = 4,
) -> dict[str, Any]:
    """The prediction record of one episode and method (schema in the module docstring).

    key: method, shots, seed, part; truth / y_pred: class names (None = no answer); scores: (n, C)
    probabilities in `classes` order (-inf or NaN for a class that cannot be predicted), or None.
    """
    index = {c: i for i, c in enumerate(classes)}
    y_true = [index[t] for t in truth]
    pred = [-1 if p is None or p not in index else index[p] for p in y_pred]

    def prob(row: int, col: int) -> float | None:
        if scores is None or col < 0 or not np.isfinite(scores[row, col]):
            return None
        return round(float(scores[row, col]), digits)

    return {
        **{k: key[k] for k in ("method", "shots", "seed", "part")},
        "classes": [str(c) for c in classes],
        "query": [int(q) for q in query],
        "y_true": y_true,
        "y_pred": pred,
        "p_pred": [prob(i, p) for i, p in enumerate(pred)],
        "p_true": [prob(i, t) for i, t in enumerate(y_true)],
    }


def write_predictions(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write the records as JSON lines (one per run, compact), atomically; returns the path."""
    from calm._files import atomic_write_text

    path = Path(path)
    text = "".join(json.dumps(dict(r), separators=(",", ":"), allow_nan=False) + "\n" for r in records)
    atomic_write_text(path, text)
    path.chmod(0o644)  # beside results.json, readable like it (the atomic write leaves 0600)
    return path


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The records of a predictions.jsonl file; a bad line is a ValueError naming file and line."""
    out = []
    for line, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if text.strip():
            try:
                out.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line}: not a JSON prediction record ({exc.msg})") from None
    return out
