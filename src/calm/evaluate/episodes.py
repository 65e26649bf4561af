"""Episodes: which clips of a feature store are the support set and which the queries.

Train/test parts: an official split when the `split` column has `test` rows (train = `train` rows,
or every non-test, non-dev row when none is marked `train`); else folds when the `fold` column is
filled (test = `test_fold`, default 5; `"all"` rotates through every fold); else no split, and each
episode's queries are all clips outside its support set.

Episode (part, shots n, seed s): for each class, n support clips drawn from the training part by a
generator seeded with (s, part, class index); a class's draws are a prefix of one seeded
permutation, so the 1-shot support is inside the 5-shot one. Every method of a seed sees the same
support. A class with fewer than n training clips, or a test class with no training clips, is an
error (never dropped from the denominator). A multi-label clip drawn for class c joins the support
as an example of c.

Held-out split (`holdout_split`, `calm evaluate --holdout F`): data without a split or folds can be
given one, a seeded fraction F of each class's clips marked `test` (at least one, never all) and the
rest `train`, so that every method of the run draws its support from the same training clips and is
scored on the same held-out queries, and the training clips outside the support set form an inductive
self-training pool that no query belongs to.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from calm.data.base import LABEL_SEP
from calm.errors import CalmError

Labels = Sequence[str] | np.ndarray  # one label string per clip (`a;b` for multi-label)

__all__ = [
    "Labels",
    "Episode",
    "Part",
    "ProtocolError",
    "episodes",
    "holdout_split",
    "make_parts",
    "row_labels",
    "sample_episode",
    "task_of",
]


class ProtocolError(CalmError, ValueError):
    """An evaluation that cannot be run honestly (e.g. a test class without support clips)."""


# ----------------------------------------------------------------------------- labels and parts


def row_labels(y: Labels) -> list[tuple[str, ...]]:
    """Label strings (`a;b` for multi-label) as tuples."""
    return [tuple(p for p in str(v).split(LABEL_SEP) if p) for v in y]


def task_of(y: Labels) -> str:
    """`multilabel` if any clip has several labels, `spoof` for bonafide/spoof, else `single`;
    ProtocolError when a clip has no label (e.g. a `calm.AudioClassifier` cache, which stores none)."""
    labels = row_labels(y)
    unlabelled = sum(not t for t in labels)
    if unlabelled:
        raise ProtocolError(
            f"{unlabelled} of {len(labels)} clips have no label: few-shot fitting and evaluation need "
            "labelled clips (extract them with `calm extract --data KIND:ROOT`, whose datasets carry labels)"
        )
    if any(len(t) > 1 for t in labels):
        return "multilabel"
    if {t[0] for t in labels} == {"bonafide", "spoof"}:
        return "spoof"
    return "single"


@dataclass(frozen=True)
class Part:
    """One train/test division of the store's rows; `test` None: queries = rows outside the support."""

    name: str
    train: np.ndarray
    test: np.ndarray | None


def _column(meta: pd.DataFrame, name: str) -> pd.Series | None:
    if name not in meta.columns:
        return None
    col = meta[name]
    return None if col.isna().all() else col


def make_parts(meta: pd.DataFrame, test_fold: int | str | None = 5) -> tuple[list[Part], str]:
    """The train/test parts of a store's rows and a one-line description of the rule used."""
    n = len(meta)
    split = _column(meta, "split")
    if split is not None and (split.astype(str).str.lower() == "test").any():
        s = split.astype(str).str.lower().to_numpy()
        test = np.flatnonzero(s == "test")
        train_mask = s == "train"
        if not train_mask.any():
            train_mask = (s != "test") & (s != "dev")
        train = np.flatnonzero(train_mask)
        if len(train) == 0:
            raise ProtocolError("the split column marks no training clips")
        return [Part("official", train, test)], "official split (train -> support, test -> queries)"
    fold = _column(meta, "fold")
    if fold is not None:
        if fold.isna().any():
            raise ProtocolError(f"{int(fold.isna().sum())} clips have no fold while others do")
        folds = fold.astype(int).to_numpy()
        present = sorted(set(folds.tolist()))
        if test_fold in (None, "all"):
            chosen = present
        else:
            try:
                chosen = [int(test_fold)]
            except ValueError:
                raise ProtocolError(f"test fold {test_fold!r} is neither an integer nor 'all'") from None
            if chosen[0] not in present:
                raise ProtocolError(f"test fold {chosen[0]} not among the folds {present}")
        parts = [Part(f"fold{f}", np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in chosen]
        which = "all (rotating)" if len(chosen) > 1 else chosen[0]
        desc = f"folds: support from the other folds, test fold {which}"
        return parts, desc
    return [Part("all", np.arange(n), None)], (
        "no official split: support drawn from all clips, queries = every clip outside the support set"
    )


HOLDOUT_STREAM = 0x484F  # keeps the held-out split's random stream apart from the episodes'


def holdout_split(meta: pd.DataFrame, y: Labels, fraction: float, seed: int = 0) -> pd.DataFrame:
    """A copy of `meta` with a `split` column: per label string (class, or label set for multi-label
    clips), round(fraction * n) clips drawn with `seed` marked `test` (at least 1, at most n - 1; a
    class of one clip stays `train`), the rest `train`. ProtocolError when `meta` already has an
    official split or folds, or for a fraction outside (0, 1)."""
    if not 0.0 < fraction < 1.0:
        raise ProtocolError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    if _column(meta, "fold") is not None or (
        _column(meta, "split") is not None and (meta["split"].astype(str).str.lower() == "test").any()
    ):
        raise ProtocolError("the data already has a split or folds; a held-out split is for data without")
    y = np.asarray(y).astype(str)
    rng = np.random.default_rng([seed, HOLDOUT_STREAM])
    split = np.full(len(y), "train", dtype=object)
    for label in sorted(set(y.tolist())):
        rows = np.flatnonzero(y == label)
        n_test = min(max(round(fraction * len(rows)), 1), len(rows) - 1)
        split[rows[rng.permutation(len(rows))[:n_test]]] = "test"
    out = meta.copy()
    out["split"] = split
    out.attrs.update(meta.attrs)
    out.attrs["holdout"] = {"fraction": fraction, "seed": seed}
    return out


# ----------------------------------------------------------------------------- episodes


@dataclass(frozen=True)
class Episode:
    """One (part, shots, seed) draw: support rows with the class each stands for, and query rows."""

    part: str
    shots: int
    seed: int
    support: np.ndarray  # row indices; a multi-label row appears once per class it was drawn for
    support_y: np.ndarray  # the class each support row stands for
    query: np.ndarray  # row indices
    classes: tuple[str, ...]


def sample_episode(
    labels: Sequence[tuple[str, ...]], part: Part, shots: int, seed: int, classes: Sequence[str] | None = None
) -> Episode:
    """Draw `shots` support clips per class from `part.train` (see the module docstring)."""
    if shots < 1:
        raise ProtocolError(f"shots must be >= 1, got {shots}")
    train_classes = sorted({c for i in part.train for c in labels[i]})
    classes = list(classes) if classes is not None else train_classes
    support: list[int] = []
    support_y: list[str] = []
    part_code = zlib.crc32(part.name.encode())
    test_classes = set() if part.test is None else {c for i in part.test for c in labels[i]}
    no_train = sorted(test_classes - set(train_classes))
    if no_train:
        raise ProtocolError(
            f"test class(es) {no_train} have no support clips in part {part.name} (not in the training part)"
        )
    for ci, c in enumerate(classes):
        candidates = np.array([i for i in part.train if c in labels[i]], dtype=np.int64)
        if len(candidates) < shots:
            raise ProtocolError(
                f"class {c!r} has {len(candidates)} training clip(s) in part {part.name}, "
                f"fewer than {shots} shots"
            )
        rng = np.random.default_rng([seed, part_code, ci])
        chosen = candidates[rng.permutation(len(candidates))[:shots]]
        support.extend(chosen.tolist())
        support_y.extend([c] * shots)
    support_arr = np.array(support, dtype=np.int64)
    if part.test is None:
        query = np.setdiff1d(part.train, support_arr)
    else:
        query = np.asarray(part.test, dtype=np.int64)
    missing = sorted({c for i in query for c in labels[i]} - set(classes))
    if missing:
        raise ProtocolError(
            f"test class(es) {missing} have no support clips in part {part.name} (not in the training part)"
        )
    if len(query) == 0:
        raise ProtocolError(f"part {part.name}, {shots} shots: no query clips left outside the support set")
    return Episode(part.name, shots, seed, support_arr, np.array(support_y), query, tuple(classes))


def episodes(y: Labels, parts: Sequence[Part], shots: Iterable[int], seeds: Iterable[int]) -> list[Episode]:
    """Every (shots, seed, part) episode, in that nesting order, over the classes of all of `y`."""
    labels = row_labels(y)
    classes = sorted({c for t in labels for c in t})
    return [sample_episode(labels, part, n, s, classes) for n in shots for s in seeds for part in parts]


def episode_features(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The features (len(rows), K, d) of some rows of a store's array, as float32."""
    return np.asarray(X[rows], dtype=np.float32)
