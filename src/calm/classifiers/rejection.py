"""How a fitted classifier rejects, said to users: `reject_info` (JSON-ready, for `/info`,
`AudioClassifier.reject_info` and `calm predict --json`) and `reject_line` (one line for `calm fit`
and `calm predict`). The reject option itself is `calm.classifiers.calibration`'s."""

from __future__ import annotations

from typing import Any

import numpy as np

from calm import _calibration as cal
from calm.methods import UNKNOWN_SCORES

__all__ = ["reject_info", "reject_line"]


def reject_info(clf: Any) -> dict[str, Any] | None:
    """How ``clf`` rejects, JSON-ready (None without ``unknown``): the accept rate asked for, the
    label, the known score (``unknown_score``: its name and description) and its threshold, the
    smallest calibrated top probability accepted ("top-proba" only), and whether anything can be
    rejected (not with one shot per class). ``auto`` answers for the classifier it chose."""
    clf = getattr(clf, "estimator_", clf)
    if getattr(clf, "unknown", None) is None:
        return None
    t = float(clf.reject_threshold_)
    name = getattr(clf, "unknown_score", "top-proba")
    out = {
        "accept_rate": float(clf.unknown),
        "label": clf.unknown_label,
        "score": name,
        "score_description": UNKNOWN_SCORES[name],
        "threshold": t,
        "active": t > cal.ACCEPT_ALL,
    }
    if name == "top-proba":
        out["min_probability"] = float(1.0 / (1.0 + np.exp(-t))) if t > cal.ACCEPT_ALL else 0.0
    return out


def reject_line(clf: Any) -> str | None:
    """:func:`reject_info` as one line for the command line (None without a reject option)."""
    info = reject_info(clf)
    if info is None:
        return None
    if not info["active"]:
        return "reject option: inactive (no class has two support clips to set its threshold from)"
    return (
        f"reject option: accepts about {100 * info['accept_rate']:.0f} % of clips of the known classes; "
        f"score {info['score']} ({info['score_description']}), "
        f"{info['label']!r} below {info['threshold']:.4g}"
    )
