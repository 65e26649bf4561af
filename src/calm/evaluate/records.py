"""The record of one run (one method on one episode) and its JSON form in results.json."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Run", "order_runs"]


def _jsonable_params(params: Mapping[str, Any]) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}


@dataclass
class Run:
    """One method on one episode.

    Attributes:
        method: the method's name (`sav`, `calm`, `zero-shot`, `calm+pl`, ...).
        shots, seed, part: the episode.
        metrics: metric name -> value in %.
        params: the hyper-parameters fitted with (`{}` when nothing was fitted).
        tuning: how they were chosen (`tuned`, and `reason` or the cross-validation report).
        n_support: support clips fitted on (pseudo-label methods: the kept pool clips).
        n_query: query clips scored.
        seconds: fit + scoring time; None for zero-shot (the answers are computed for all episodes).
        n_unparsed: zero-shot only: answers that named no class.
        pseudo_labels: pseudo-label methods only: the pool's report (`pseudo_label_report`).
        warnings: pseudo-label methods only: what the episode could not do (classes never kept).
    """

    method: str
    shots: int
    seed: int
    part: str
    metrics: dict[str, float]
    params: dict[str, Any]
    tuning: dict[str, Any]
    n_support: int
    n_query: int
    seconds: float | None = None
    n_unparsed: int | None = None
    pseudo_labels: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The run as it appears in results.json's `runs` (keys only where the run has them)."""
        out: dict[str, Any] = {
            "method": self.method,
            "shots": self.shots,
            "seed": self.seed,
            "part": self.part,
            "metrics": self.metrics,
            "params": _jsonable_params(self.params),
            "tuning": self.tuning,
            "n_support": self.n_support,
            "n_query": self.n_query,
        }
        if self.n_unparsed is not None:
            out["n_unparsed"] = self.n_unparsed
        if self.pseudo_labels is not None:
            out["pseudo_labels"] = self.pseudo_labels
            out["warnings"] = self.warnings
        if self.seconds is not None:
            out["seconds"] = self.seconds
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Run:
        """The record of one entry of results.json's `runs` (the inverse of `to_dict`)."""
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})


def order_runs(runs: Sequence[dict], methods: Sequence[str]) -> list[dict]:
    """Runs sorted (stably) by the position of their method in `methods` (the table's column order)."""
    rank = {m: i for i, m in enumerate(methods)}
    return sorted(runs, key=lambda r: rank.get(r["method"], len(rank)))
