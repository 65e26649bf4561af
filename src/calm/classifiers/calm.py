"""CALM and CALM-global, class-conditional sparse attention vectors (paper Sec. 3.2, Eq. 5-13):
heads weighted by their reliability on the support set, scores as weighted head posteriors."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.utils._param_validation import StrOptions

from calm import _heads as H
from calm.classifiers.base import HeadClassifier, register
from calm.classifiers.features import Features
from calm.classifiers.kernels import calm_scores, leave_one_out_, needs_shift, similarities, support_margins
from calm.serialization import TensorSpec

__all__ = ["CALM"]


@register
class CALM(HeadClassifier):
    """Class-conditional sparse attention vectors (paper Sec. 3.2, Eq. 5-13).

    Every head turns its cosine similarities into a posterior over classes (Eq. 5, ``tau_p``); a
    head's reliability is its mean clamped margin on the support set (Eq. 6), per class (Eq. 11,
    ``weighting="class"``, the paper's CALM) or over all clips (Eq. 7, ``weighting="global"``,
    CALM-global). The k most reliable heads (per class, or shared) get weights softmax(r / tau_w)
    (Eq. 12 / 8), all others 0, and the score of class c is the weighted sum of the head
    posteriors p_c^j (Eq. 13 / 9).

    Parameters
    ----------
    k : int, float in (0, 1] or None
        Heads kept (per class for ``weighting="class"``): a count, a fraction of all heads
        (``round(k * n_heads)``, at least 1) or all. Default 0.4 (the paper: accuracy peaks with
        about 30-50 % of heads kept).
    tau_p, tau_w : float
        Posterior and weight temperatures (paper defaults 0.03 and 0.5).
    weighting : "class" or "global"
        Class-conditional reliabilities and head sets (CALM) or one shared set (CALM-global).
    normalization : "softmax" or "power"
        Weights softmax(r / tau_w) over the kept heads (paper Eq. 8 / 12), or r^(1 / tau_w) divided
        by its sum (the authors' released code; uniform when every kept r is 0).
    reliability : "in-sample" or "leave-one-out"
        Margins of support clips against centroids that include them (paper), or against their own
        class centroid without that clip, mu^{-i} = (n_c mu_c - h_i) / (n_c - 1); classes with one
        clip fall back to in-sample with a warning.
    n_heads, classes, chunk_size : as for :class:`calm.classifiers.SAV`.

    Attributes
    ----------
    classes_ (C,), class_counts_ (C,), centroids_ (C, K, d), reliability_ (C, K) for "class" or
    (K,) for "global", weights_ (C, K) (rows identical for "global"; each row sums to 1 over its
    kept heads and is 0 elsewhere), heads_ (C, k) for "class" or (k,) for "global": kept heads by
    decreasing reliability, k_, n_heads_, head_dim_, metadata_.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **HeadClassifier._parameter_constraints,
        "tau_w": HeadClassifier._parameter_constraints["tau_p"],
        "weighting": [StrOptions({"class", "global"})],
        "normalization": [StrOptions({"softmax", "power"})],
        "reliability": [StrOptions({"in-sample", "leave-one-out"})],
    }

    def __init__(
        self,
        k: Any = 0.4,
        *,
        tau_p: float = 0.03,
        tau_w: float = 0.5,
        weighting: str = "class",
        normalization: str = "softmax",
        reliability: str = "in-sample",
        n_heads: int | None = None,
        classes: Any = None,
        chunk_size: int | None = None,
    ):
        self.k = k
        self.tau_p = tau_p
        self.tau_w = tau_w
        self.weighting = weighting
        self.normalization = normalization
        self.reliability = reliability
        self.n_heads = n_heads
        self.classes = classes
        self.chunk_size = chunk_size

    @classmethod
    def _state_specs(cls, params: dict[str, Any]) -> tuple[TensorSpec, ...]:
        per_class = params.get("weighting") != "global"
        return (
            *super()._state_specs(params),
            TensorSpec("reliability", ("C", "K") if per_class else ("K",)),
            TensorSpec("weights", ("C", "K")),
            TensorSpec("heads", ("C", "k") if per_class else ("k",), "i", index_of="K"),
        )

    def _fit_heads(
        self,
        feats: Features,
        y_t: torch.Tensor,
        counts: torch.Tensor,
        rows: int,
        dtype: torch.dtype,
        unit: torch.Tensor,
    ) -> None:
        C, K = len(counts), feats.K
        loo = self.reliability == "leave-one-out"
        if loo and bool((counts == 1).any()):
            single = self.classes_[(counts == 1).numpy()][:10].tolist()
            warnings.warn(
                f"leave-one-out reliability: classes with one clip use in-sample margins: {single}",
                UserWarning,
                stacklevel=4,
            )
        centroids = torch.from_numpy(self.centroids_)
        margin_sum = torch.zeros((C, K), dtype=dtype)
        for start, xb in feats.chunks(rows, dtype, check=False):  # checked by the centroid pass
            yb = y_t[start : start + len(xb)]
            s = similarities(xb, unit, inplace=not loo)  # Eq. 2, (K, n, C)
            if loo:
                leave_one_out_(s, xb, yb, centroids, counts)
            m = support_margins(s, yb, self.tau_p)  # Eq. 5-6, (K, n)
            margin_sum.index_add_(0, yb, m.T)
        if self.weighting == "class":
            r = margin_sum / counts.to(dtype)[:, None]  # Eq. 11
        else:
            r = margin_sum.sum(dim=0) / feats.n  # Eq. 7
        w = H.head_weights(r, self.k_, self.tau_w, self.normalization)  # Eq. 12 / 8
        self.reliability_ = r.numpy()
        self.weights_ = (w.expand(C, K) if w.ndim == 1 else w).contiguous().numpy()
        self.heads_ = torch.sort(r, dim=-1, descending=True, stable=True).indices[..., : self.k_].numpy()

    def _prepare(self, unit: torch.Tensor) -> None:
        used = np.flatnonzero((self.weights_ > 0).any(axis=0))
        # with most heads in use, reading all of them (zero weights elsewhere) beats a gather
        self._used = None if len(used) > 0.75 * self.n_heads_ else used
        w = torch.from_numpy(self.weights_)
        if self._used is not None:
            index = torch.from_numpy(self._used)
            w, unit = w[:, index], unit[index]
        self._unit_used = unit.contiguous()  # (K_used, d, C)
        self._w_used = w.T.contiguous()  # (K_used, C)
        self._scaled = (self.tau_p, self._unit_used / self.tau_p)  # the unit centroids over tau_p (Eq. 5)

    def decision_function(self, X: Any) -> np.ndarray:
        """Raw scores (n, C) of Eq. 13 (Eq. 9 for ``weighting="global"``)."""
        feats = self._query(X)
        dtype = self._dtype()
        C = len(self.classes_)
        out = np.empty((feats.n, C), dtype=np.float64 if dtype == torch.float64 else np.float32)
        tau_p, scaled = self._scaled
        if tau_p != self.tau_p:  # changed by set_params since fit: scale here, keep the fitted tensors
            scaled = self._unit_used / self.tau_p
        shift = needs_shift(self.tau_p, C, dtype)
        for start, xb in feats.chunks(self._rows(len(self._w_used)), dtype, heads=self._used):
            out[start : start + len(xb)] = calm_scores(xb, scaled, self._w_used, shift).numpy()
        return out

    def predict_proba(self, X: Any) -> np.ndarray:
        """Scores normalised to sum to 1 over classes."""
        s = self.decision_function(X)
        total = s.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            proba: np.ndarray = np.where(total > 0, s / total, 1.0 / s.shape[1])
        return proba
