"""Why a fitted head classifier (SAV, CALM, CALM-global, the linear probe) gave a clip its label:
per class, its score, its calibrated probability and the heads that carried the score (layer,
head, source as the model names them, weight, cosine similarity to the class centroid,
contribution)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from calm import _heads as H
from calm.classifiers.calibration import Calibratable, float64_chunks, proba

__all__ = ["explain", "head_labels"]


def head_labels(clf: Calibratable) -> list[dict[str, Any]]:
    """Each head's description: its index, and layer / head / source when ``metadata_`` carries
    ``head_names`` of the right length."""
    names: Sequence[Any] = clf.metadata_.get("head_names") or []
    if len(names) != clf.n_heads_:
        return [{"head": j} for j in range(clf.n_heads_)]
    out = []
    for j, name in enumerate(names):
        layer, head, source = (list(name) + [None, None, None])[:3]
        out.append({"head": j, "layer": layer, "index": head, "source": source})
    return out


def explain(clf: Calibratable, X: Any, top: int) -> list[dict[str, Any]]:
    """Per clip a JSON-ready dict: ``prediction``, ``scores`` and ``probabilities`` by class, and
    ``heads`` by class: up to ``top`` heads that carried the class's score, largest part first,
    each with its description (:func:`head_labels`), ``weight`` (CALM: w_c^j; SAV: 1 / k for a
    kept head; the linear probe: 1 / K), ``similarity`` (cosine to the class centroid) and
    ``contribution`` (its part of the score: w_c^j p_c^j(x) for CALM, 1 for a SAV vote, for the
    linear probe the head's sum of coef * standardised feature, whose sum plus the intercept is the
    score); heads contributing 0 or less are left out."""
    feats = clf._query(X)
    centroids, chunks = float64_chunks(clf, feats)
    unit = H.l2_normalize(centroids)
    labels, weights = head_labels(clf), clf._head_weights()
    classes = [c.item() if hasattr(c, "item") else c for c in clf.classes_]
    all_scores = clf.class_scores(X)  # those predict reads: the same prediction
    out: list[dict[str, Any]] = []
    for start, xb in chunks:
        cos = torch.einsum("nkd,ckd->nkc", H.l2_normalize(xb), unit)
        parts = clf._head_parts(xb, cos)
        scores = all_scores[start : start + len(xb)]
        probs = proba(clf, scores)
        for i in range(len(xb)):
            heads = {}
            for c, name in enumerate(classes):
                order = torch.argsort(parts[i, :, c], descending=True, stable=True)[:top]
                heads[str(name)] = [
                    {
                        **labels[int(j)],
                        "weight": float(weights[c, j]),
                        "similarity": float(cos[i, j, c]),
                        "contribution": float(parts[i, j, c]),
                    }
                    for j in order.tolist()
                    if float(parts[i, j, c]) > 0
                ]
            out.append(
                {
                    "prediction": classes[int(np.argmax(scores[i]))],
                    "scores": {str(c): float(s) for c, s in zip(classes, scores[i], strict=True)},
                    "probabilities": {str(c): float(p) for c, p in zip(classes, probs[i], strict=True)},
                    "heads": heads,
                }
            )
    return out
