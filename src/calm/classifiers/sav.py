"""SAV, sparse attention vectors (Mitra et al.; paper Sec. 3.1, Eq. 1-4): the k heads whose
nearest-centroid prediction is most accurate on the support set vote with equal weights."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.utils._param_validation import StrOptions

from calm import _calibration as cal
from calm import _heads as H
from calm.classifiers.base import HeadClassifier
from calm.classifiers.features import Features
from calm.classifiers.files import register
from calm.classifiers.kernels import normalize_, support_votes
from calm.methods import DEFAULTS
from calm.serialization import TensorSpec

__all__ = ["SAV"]


@register
class SAV(HeadClassifier):
    """Sparse attention vectors (Mitra et al.; paper Sec. 3.1, Eq. 1-4).

    Each head predicts its nearest centroid by cosine similarity (Eq. 2-3); heads are ranked by that
    prediction's accuracy on the support set and the top k vote with equal weights (Eq. 4).

    Parameters
    ----------
    k : int, float in (0, 1] or None
        Heads kept: a count, a fraction of all heads (``round(k * n_heads)``, at least 1), or all.
        Default 0.25, `calm.methods.DEFAULTS` (as CALM's; the value the README's tables measured;
        it was 20 heads before).
    tie_break : "index" or "margin"
        Order of heads with equal support accuracy: the lower head index first (``"index"``), or
        the larger mean clamped margin (Eq. 5-7 with ``tau_p``) first, then the lower index
        (``"margin"``; avoids keeping merely the first heads when many heads score 100 %, as with
        one shot per class).
    tau_p : float
        Posterior temperature of the margins used by ``tie_break="margin"``.
    n_heads : int or None
        Split 2-D (n, n_heads * head_dim) input into this many heads (the scikit-learn adapter).
    classes : sequence or None
        Fixed class order (every class needs a clip); None: the sorted labels of y.
    chunk_size : int or None
        Rows per chunk; None picks ~512 MiB working sets.
    device : str or torch.device
        Where the chunks are computed (``"cpu"``, ``"cuda"``, ...); features are read on the CPU
        and each chunk is moved there. Not saved: a loaded classifier runs on ``"cpu"``.
    calibration : "loo-temperature" or None
        ``predict_proba`` calibrated by a temperature fitted on leave-one-out scores of the
        support clips (:mod:`calm.classifiers.calibration`; the argmax, ``predict`` and
        ``decision_function`` are unchanged; needs two clips in some class), or None: the
        uncalibrated probabilities. Default `calm.methods.DEFAULTS`.
    unknown : float in (0, 1) or None
        Reject option: ``predict`` returns ``unknown_label`` for a clip whose known score
        (``unknown_score``, :meth:`known_score`) is below ``reject_threshold_``, set from the
        support set's leave-one-out known scores so that about this fraction of clips of the known
        classes is accepted (e.g. 0.95). Needs calibration; with one shot per class nothing is
        rejected (a warning). None (default, the paper's protocol): every clip gets a class.
    unknown_score : "centroid-z+top", "centroid-z" or "top-proba"
        The known score of the reject option and of :meth:`known_score` (`calm.methods.UNKNOWN_SCORES`):
        "centroid-z+top" (default, `calm.methods.DEFAULTS`, chosen by validation:
        research/reject_scores_z.py), the sum of "centroid-z" and "top-proba", each standardised by
        the mean and spread of the support clips' leave-one-out scores; "centroid-z", each head's
        cosine to the predicted class's centroid standardised by the class's support mean and the
        head's within-class spread, averaged over the class's kept heads (weighted) and over all
        heads, the mean of the two; "top-proba", the calibrated top probability (as log-odds).
    unknown_label : str or int
        The label of a rejected clip; default ``"unknown"``.
    keep_support : bool
        Keep the support features and labels (``support_features_``, ``support_labels_``; saved in
        the file) so that ``partial_fit`` can add clips or classes later; default False
        (:mod:`calm.classifiers.support`).

    Attributes
    ----------
    classes_ (C,), class_counts_ (C,), centroids_ (C, K, d), head_scores_ (K,) support accuracy of
    each head, heads_ (k,) kept heads in rank order, head_margins_ (K,) (``tie_break="margin"``
    only), k_, n_heads_, head_dim_, metadata_; with calibration: temperature_, nonconformity_
    (leave-one-out 1 - p_y of the support clips), calibrated_ (False with one clip per class);
    with unknown_score "centroid-z" or "centroid-z+top" (and calibration): known_mean_ (C, K),
    known_spread_ (K,); with "centroid-z+top" also known_loc_ (2,), known_scale_ (2,);
    with unknown: reject_threshold_; with keep_support: support_features_ (n, K, d),
    support_labels_ (n,) (indices into classes_).

    Examples
    --------
    Features of shape (n_clips, n_heads, head_dim), here made up: two classes, 4 heads of 8 dims
    (from a model: ``X, y, meta = calm.load_features("store/")``).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> centres = rng.normal(size=(2, 4, 8))
    >>> X = np.concatenate([c + 0.3 * rng.normal(size=(6, 4, 8)) for c in centres]).astype(np.float32)
    >>> y = np.array(["dog"] * 6 + ["rain"] * 6)
    >>> from calm import SAV
    >>> clf = SAV(k=2).fit(X, y)
    >>> clf.heads_.tolist()  # the 2 heads whose nearest centroid is most often right
    [0, 1]
    >>> clf.predict(X[[0, 11]]).tolist()
    ['dog', 'rain']
    >>> clf.save("dogs_vs_rain.safetensors")  # doctest: +SKIP
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **HeadClassifier._parameter_constraints,
        "tie_break": [StrOptions({"index", "margin"})],
    }

    def __init__(
        self,
        k: Any = DEFAULTS["k"],
        *,
        tie_break: str = DEFAULTS["tie_break"],
        tau_p: float = DEFAULTS["tau_p"],
        n_heads: int | None = None,
        classes: Any = None,
        chunk_size: int | None = None,
        device: Any = "cpu",
        calibration: str | None = DEFAULTS["calibration"],
        unknown: float | None = DEFAULTS["unknown"],
        unknown_score: str = DEFAULTS["unknown_score"],
        unknown_label: Any = DEFAULTS["unknown_label"],
        keep_support: bool = DEFAULTS["keep_support"],
    ):
        self.k = k
        self.tie_break = tie_break
        self.tau_p = tau_p
        self.n_heads = n_heads
        self.classes = classes
        self.chunk_size = chunk_size
        self.device = device
        self.calibration = calibration
        self.unknown = unknown
        self.unknown_score = unknown_score
        self.unknown_label = unknown_label
        self.keep_support = keep_support

    @classmethod
    def _state_specs(cls, params: dict[str, Any]) -> tuple[TensorSpec, ...]:
        specs = (
            *super()._state_specs(params),
            TensorSpec("head_scores", ("K",), bounds=(0, 1)),
            TensorSpec("heads", ("k",), "i", index_of="K"),
        )
        if params.get("tie_break") == "margin":
            specs += (TensorSpec("head_margins", ("K",), bounds=(0, 1)),)
        return specs

    def _fit_heads(
        self,
        feats: Features,
        y_t: torch.Tensor,
        counts: torch.Tensor,
        rows: int,
        centroids: torch.Tensor,
    ) -> None:
        dev = centroids.device
        views = ((start, xb.to(dev)) for start, xb in feats.views(self._view_rows(feats)))  # checked in fit
        tau_p = self.tau_p if self.tie_break == "margin" else None
        correct, margin_sum = support_votes(views, y_t, centroids, tau_p)  # Eq. 2-3 (and 5-6)
        correct = correct.cpu()
        self.head_scores_ = (correct.to(torch.float64) / feats.n).numpy()
        margins = None
        if margin_sum is not None:
            self.head_margins_ = (margin_sum / feats.n).cpu().numpy()  # Eq. 7
            margins = self.head_margins_
        else:
            self.__dict__.pop("head_margins_", None)  # from an earlier fit
        self.heads_ = H.rank_heads(correct, margins)[: self.k_].numpy()

    def _prepare(self, unit: torch.Tensor) -> None:
        # each kept head is read once, in increasing index order (cheap strided reads of memory maps)
        heads, inverse = np.unique(self.heads_, return_inverse=True)
        self._read_heads = heads
        self._read_order = torch.from_numpy(inverse.reshape(-1))
        self._unit_kept = unit[torch.from_numpy(self.heads_)].contiguous().to(self._device())  # (k, d, C)

    def class_scores(self, X: Any) -> np.ndarray:
        """Vote counts (n, C) of the kept heads (Eq. 4), int64."""
        feats = self._query(X)
        C = len(self.classes_)
        out = np.empty((feats.n, C), dtype=np.int64)
        dev, unit = self._device(), self._unit_kept
        unit = unit if unit.device == dev else unit.to(dev)  # device changed by set_params since fit
        for start, xb in feats.chunks(
            self._rows(len(self._read_heads)), self._dtype(), heads=self._read_heads
        ):
            x = normalize_(xb[:, self._read_order].to(dev))  # Eq. 2
            best = torch.matmul(x.transpose(0, 1), unit).argmax(dim=-1).T  # Eq. 3, (n, k)
            out[start : start + len(xb)] = H.vote_counts(best.cpu(), C).numpy()  # Eq. 4
        return out

    def _proba(self, scores: np.ndarray) -> np.ndarray:
        """Vote shares (n, C): vote counts divided by k (uncalibrated)."""
        out: np.ndarray = scores / float(self.k_)
        return out

    def _log_scores(self, scores: np.ndarray) -> np.ndarray:
        """log(votes + 1/2): finite for classes no head votes for."""
        out: np.ndarray = np.log(np.asarray(scores, dtype=np.float64) + 0.5)
        return out

    def _contributions(self, cos: torch.Tensor) -> torch.Tensor:
        return cal.vote_contributions(cos, torch.from_numpy(np.asarray(self.heads_)))

    def _head_weights(self) -> np.ndarray:
        w = np.zeros((len(self.classes_), self.n_heads_))
        w[:, self.heads_] = 1.0 / self.k_
        return w
