"""CALM and CALM-global, class-conditional sparse attention vectors (paper Sec. 3.2, Eq. 5-13):
heads weighted by their reliability on the support set, scores as weighted head posteriors."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.utils._param_validation import StrOptions

from calm import _calibration as cal
from calm import _heads as H
from calm.classifiers.base import HeadClassifier
from calm.classifiers.calibration import MAX_CALIBRATION_CLIPS, calibration_rows
from calm.classifiers.features import Features
from calm.classifiers.files import register
from calm.classifiers.kernels import LOG2E, calm_scores, needs_shift, support_margin_sums
from calm.classifiers.threads import Workspace, for_each
from calm.errors import ParameterError
from calm.methods import DEFAULTS
from calm.serialization import TensorSpec

__all__ = ["CALM", "LOO_TAU_P"]

#: ``scores="loo"``: the posterior temperatures tried per support set (with ``tau_p`` itself),
#: the reliability poolings tried (shrinkage lam of :func:`calm._heads.shrunk_reliability`: 0 is
#: Eq. 11, inf Eq. 7), the pooling when a class has one clip (lam 1: class and global reliabilities
#: averaged) and the weight of the mean leave-one-out margin next to the leave-one-out accuracy.
#: Chosen on validation episodes inside the training parts (research/tau_p_loo.py, research/README.md).
LOO_TAU_P = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1)
LOO_POOLING = (0.0, math.inf)
ONE_SHOT_POOLING = 1.0
LOO_MARGIN_WEIGHT = 0.1


def loo_criterion(scores: torch.Tensor, y: torch.Tensor) -> float:
    """How well leave-one-out class ``scores`` (n, C) of support clips of classes ``y`` (n,) do:
    their accuracy plus LOO_MARGIN_WEIGHT times the mean margin p_y - max_{c != y} p_c of the
    scores normalised to sum to 1 (a smooth tie-break between equal accuracies). A clip whose own
    class ties with others for the top score counts 1 / (classes tied), so the criterion does not
    depend on the order of the classes (argmax would give the tie to the lowest index)."""
    p = scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    own = p.gather(1, y.view(-1, 1))[:, 0]
    rival = p.scatter(1, y.view(-1, 1), -1.0).amax(dim=1)
    top = scores == scores.amax(dim=1, keepdim=True)
    accuracy = (top.gather(1, y.view(-1, 1))[:, 0] / top.sum(dim=1)).to(p.dtype).mean()
    return round(float(accuracy + LOO_MARGIN_WEIGHT * (own - rival).mean()), 9)


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
        (``round(k * n_heads)``, at least 1) or all. Default 0.25, `calm.methods.DEFAULTS`: the
        value every run in the README and docs/results.md measured, the one `calm fit` and
        `calm evaluate` use (it was 0.4 before; the paper's plateau spans about 20-50 %).
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
    scores : "paper" or "loo"
        ``"paper"``: the paper's equations exactly, with ``tau_p`` and ``weighting`` as given.
        ``"loo"`` (default, `calm.methods.DEFAULTS`; ``weighting="class"`` only; chosen on
        validation episodes, docs/results.md's EmoDB section: better on EmoDB's unseen speakers,
        level elsewhere): per support set, ``tau_p`` (from LOO_TAU_P and ``tau_p`` itself) and
        the reliability pooling (class-conditional, Eq. 11, or global, Eq. 7) are chosen by
        leave-one-out on the support clips (:func:`loo_criterion`; ties: the temperature nearest
        ``tau_p``, then class-conditional); when a class has one clip, no leave-one-out is
        possible: ``tau_p`` as given and each class's reliabilities averaged with the global ones
        (:func:`calm._heads.shrunk_reliability`, lam 1).
        CALM-global (``weighting="global"``) is the paper's either way.
    n_heads, classes, chunk_size, device, calibration, unknown, unknown_score, unknown_label,
    keep_support
        As for :class:`calm.classifiers.SAV`.

    Attributes
    ----------
    classes_ (C,), class_counts_ (C,), centroids_ (C, K, d), reliability_ (C, K) for "class" or
    (K,) for "global", weights_ (C, K) (rows identical for "global"; each row sums to 1 over its
    kept heads and is 0 elsewhere), heads_ (C, k) for "class" or (k,) for "global": kept heads by
    decreasing reliability, tau_p_ (the posterior temperature in use: ``tau_p``, or the one
    ``scores="loo"`` chose), pooling_ (0: class-conditional, inf: global, 1: averaged; not saved),
    k_, n_heads_, head_dim_, metadata_; temperature_, nonconformity_,
    calibrated_, known_mean_, known_spread_, known_loc_, known_scale_, reject_threshold_,
    support_features_, support_labels_ as
    for SAV.

    Examples
    --------
    Features of shape (n_clips, n_heads, head_dim), here made up: two classes, 4 heads of 8 dims
    (from a model: ``X, y, meta = calm.load_features("store/")``).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> centres = rng.normal(size=(2, 4, 8))
    >>> X = np.concatenate([c + 0.3 * rng.normal(size=(6, 4, 8)) for c in centres]).astype(np.float32)
    >>> y = np.array(["dog"] * 6 + ["rain"] * 6)
    >>> from calm import CALM
    >>> clf = CALM(k=2).fit(X, y)
    >>> clf.weights_.shape  # (classes, heads): each class weighs its own 2 most reliable heads
    (2, 4)
    >>> clf.predict(X[[0, 11]]).tolist()
    ['dog', 'rain']
    >>> clf.predict_proba(X[[0]]).round(2).tolist()
    [[1.0, 0.0]]
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **HeadClassifier._parameter_constraints,
        "tau_w": HeadClassifier._parameter_constraints["tau_p"],  # both at least MIN_TEMPERATURE
        "weighting": [StrOptions({"class", "global"})],
        "normalization": [StrOptions({"softmax", "power"})],
        "reliability": [StrOptions({"in-sample", "leave-one-out"})],
        "scores": [StrOptions({"loo", "paper"})],
    }

    def __init__(
        self,
        k: Any = DEFAULTS["k"],
        *,
        tau_p: float = DEFAULTS["tau_p"],
        tau_w: float = DEFAULTS["tau_w"],
        weighting: str = "class",
        normalization: str = DEFAULTS["normalization"],
        reliability: str = DEFAULTS["reliability"],
        scores: str = DEFAULTS["scores"],
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
        self.tau_p = tau_p
        self.tau_w = tau_w
        self.weighting = weighting
        self.normalization = normalization
        self.reliability = reliability
        self.scores = scores
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
        per_class = params.get("weighting") != "global"
        return (
            *super()._state_specs(params),
            TensorSpec("reliability", ("C", "K") if per_class else ("K",), bounds=(0, 1)),
            TensorSpec(
                "weights", ("C", "K"), bounds=(0, 1), rows_sum_to_one=True, same_dtype_as="reliability"
            ),
            TensorSpec("heads", ("C", "k") if per_class else ("k",), "i", index_of="K"),
        ) + ((TensorSpec("tau_p", (1,), bounds=(0, np.inf)),) if cls._chooses(params) else ())

    @staticmethod
    def _chooses(params: dict[str, Any]) -> bool:
        """Whether ``params`` choose tau_p and the pooling per support set (``scores="loo"``)."""
        return params.get("scores", "paper") == "loo" and params.get("weighting") != "global"

    def _fit_heads(
        self,
        feats: Features,
        y_t: torch.Tensor,
        counts: torch.Tensor,
        rows: int,
        centroids: torch.Tensor,
    ) -> None:
        C, K, dtype, dev = len(counts), feats.K, centroids.dtype, centroids.device
        loo = self.reliability == "leave-one-out"
        if loo and bool((counts == 1).any()):
            single = self.classes_[(counts == 1).numpy()][:10].tolist()
            warnings.warn(
                f"leave-one-out reliability: classes with one clip use in-sample margins: {single}",
                UserWarning,
                stacklevel=4,
            )
        self.tau_p_, self.pooling_ = float(self.tau_p), 0.0 if self.weighting == "class" else math.inf
        if self._chooses(self.get_params(deep=False)):
            self.tau_p_, self.pooling_ = self._choose(feats, y_t, counts, centroids)
        views = ((start, xb.to(dev)) for start, xb in feats.views(self._view_rows(feats)))  # checked in fit
        margin_sum = support_margin_sums(
            views, y_t, centroids, self.tau_p_, counts if loo else None
        ).T  # (C, K)
        rc, rg = margin_sum / counts.to(dtype)[:, None], margin_sum.sum(dim=0) / feats.n  # Eq. 11, Eq. 7
        if self.pooling_ == 0.0:
            r = rc
        elif self.weighting == "global":
            r = rg
        else:  # Eq. 11 shrunk towards Eq. 7 (scores="loo")
            r = H.shrunk_reliability(rc, rg, counts, self.pooling_)
        w = self._weights_of(r.cpu())
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ParameterError(f"tau_w={self.tau_w!r} gives non-finite head weights; use a larger tau_w")
        self.reliability_ = r.cpu().numpy()
        self.weights_ = (w.expand(C, K) if w.ndim == 1 else w).contiguous().numpy()
        order = torch.sort(r.cpu(), dim=-1, descending=True, stable=True).indices
        self.heads_ = order[..., : self.k_].numpy()
        self._pooled = (rc.cpu(), rg.cpu())  # for _loo_scores (scores="loo")

    def _weights_of(self, r: torch.Tensor) -> torch.Tensor:
        """Head weights (..., K) of reliabilities ``r`` (..., K) (Eq. 12 / 8,
        :func:`calm._heads.head_weights` at ``k_``, ``tau_w`` and ``normalization``)."""
        return H.head_weights(r, self.k_, self.tau_w, self.normalization)

    def _tau(self) -> float:
        """The posterior temperature in use: the chosen one (``scores="loo"``) or ``tau_p``."""
        return float(self.tau_p_) if self._chooses(self.__dict__) else self.tau_p

    def _choose(
        self, feats: Features, y_t: torch.Tensor, counts: torch.Tensor, centroids: torch.Tensor
    ) -> tuple[float, float]:
        """``scores="loo"``: the (tau_p, pooling) of LOO_TAU_P x LOO_POOLING whose leave-one-out
        scores of the support clips (at most MAX_CALIBRATION_CLIPS of them, round-robin over the
        classes) are best by :func:`loo_criterion`; (tau_p, ONE_SHOT_POOLING) when a class has
        fewer than two of those clips."""
        y_all = y_t.cpu().numpy()
        keep = calibration_rows(np.ones(len(y_all), dtype=bool), y_all, MAX_CALIBRATION_CLIPS)
        y = torch.from_numpy(y_all[keep])
        sub = torch.bincount(y, minlength=len(counts))
        if bool((sub < 2).any()):
            return float(self.tau_p), ONE_SHOT_POOLING
        cents, parts = centroids.cpu(), []
        for start, xb in feats.chunks(self._view_rows(feats), torch.float64):
            rows = torch.from_numpy(keep[start : start + len(xb)])
            if bool(rows.any()):
                parts.append(
                    cal.loo_cosines(
                        xb[rows], torch.from_numpy(y_all[start : start + len(xb)])[rows], cents, counts.cpu()
                    )
                )
        cos_in, cos_loo = (torch.cat([p[i] for p in parts]) for i in (0, 1))
        grid = sorted(set(LOO_TAU_P) | {float(self.tau_p)}, key=lambda t: (abs(math.log(t / self.tau_p)), -t))
        best, choice = -math.inf, (float(self.tau_p), 0.0)
        for tau in grid:  # preferred first: the strictly better replaces it
            post, m = self._loo_margins(cos_in, cos_loo, y, tau)
            rc, rg = H.class_reliability(m, y, len(sub)), H.global_reliability(m)
            for lam in LOO_POOLING:
                w = self._weights_of(H.loo_reliabilities(m, y, rc, rg, sub, lam))
                value = loo_criterion(torch.einsum("nkc,nck->nc", post, w), y)  # Eq. 13 per left-out clip
                if value > best:
                    best, choice = value, (float(tau), lam)
        return choice

    def _prepare(self, unit: torch.Tensor) -> None:
        used = np.flatnonzero((self.weights_ > 0).any(axis=0))
        # with most heads in use, reading all of them (zero weights elsewhere) beats a gather
        self._used = None if len(used) > 0.75 * self.n_heads_ else used
        w = torch.from_numpy(self.weights_)
        if self._used is not None:
            index = torch.from_numpy(self._used)
            w, unit = w[:, index], unit[index]
        dev = self._device()
        self._unit_used = unit.contiguous().to(dev)  # (K_used, d, C)
        self._w_used = w.T.to(unit.dtype).contiguous().to(dev)  # (K_used, C), in the query dtype
        # the unit centroids times log2(e) / tau_p: the matmul gives Eq. 5's exponent in base 2
        self._scaled = (self._tau(), self._unit_used * (LOG2E / self._tau()))

    def class_scores(self, X: Any) -> np.ndarray:
        """Raw scores (n, C) of Eq. 13 (Eq. 9 for ``weighting="global"``)."""
        feats = self._query(X)
        dtype = self._dtype()
        C = len(self.classes_)
        out = np.empty((feats.n, C), dtype=np.float64 if dtype == torch.float64 else np.float32)
        tau_p, scaled = self._scaled
        dev, w_t = self._device(), self._w_used
        if tau_p != self._tau() or scaled.device != dev:  # set_params since fit: keep the fitted tensors
            scaled, w_t = (self._unit_used * (LOG2E / self._tau())).to(dev), w_t.to(dev)
        shift = needs_shift(self._tau(), C, dtype)
        heads = None if self._used is None else torch.from_numpy(self._used).to(dev)

        def chunk(view: tuple[int, torch.Tensor], ws: Workspace) -> None:
            start, xb = view
            what = f"{feats.name} (rows {start}..{start + len(xb) - 1})"
            scores = calm_scores(xb.to(dev), scaled, w_t, shift, heads=heads, ws=ws, what=what)
            out[start : start + len(xb)] = scores.cpu().numpy()

        for_each(feats.views(self._view_rows(feats)), chunk, dev)  # chunks in parallel threads on CPU
        return out

    def _log_scores(self, scores: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.log(np.maximum(np.asarray(scores, dtype=np.float64), cal.SCORE_FLOOR))
        return out

    def _contributions(self, cos: torch.Tensor) -> torch.Tensor:
        return cal.posterior_contributions(
            cos, torch.from_numpy(np.asarray(self.weights_, np.float64)), self._tau()
        )

    def _loo_margins(
        self, cos_in: torch.Tensor, cos_loo: torch.Tensor, y: torch.Tensor, tau: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head posteriors (n, K, C) of support clips left out (against the centroids without
        them, Eq. 5 at ``tau``, default the temperature in use) and their clamped margins (n, K)
        as the fit saw them (Eq. 6: leave-one-out or in-sample, as ``reliability`` says)."""
        tau = self._tau() if tau is None else tau
        post = H.head_posteriors(cos_loo, tau)
        fitted = post if self.reliability == "leave-one-out" else H.head_posteriors(cos_in, tau)
        return post, H.clamped_margins(fitted, y)

    def _pooled_loo_weights(self, margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``scores="loo"``: every class's head weights (n, C, K) refitted without each left-out
        clip, with the chosen pooling (:func:`calm._heads.loo_reliabilities`)."""
        rc, rg = self._pooled
        counts = torch.from_numpy(np.asarray(self.class_counts_))
        r = H.loo_reliabilities(margins, y, rc, rg, counts, self.pooling_)
        return self._weights_of(r)

    def _loo_scores(self, cos_in: torch.Tensor, cos_loo: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The clip's own margins taken out of the reliabilities, heads and weights chosen again
        (:func:`calm._calibration.loo_weighted_scores`): in-sample head selection would make the
        left-out scores over-confident."""
        post, margins = self._loo_margins(cos_in, cos_loo, y)
        if self._chooses(self.__dict__):  # the chosen pooling, refitted without each clip
            return torch.einsum("nkc,nck->nc", post, self._pooled_loo_weights(margins, y))
        return cal.loo_weighted_scores(
            post,
            margins,
            y,
            torch.from_numpy(np.asarray(self.reliability_, np.float64)),
            torch.from_numpy(np.asarray(self.weights_, np.float64)),
            torch.from_numpy(np.asarray(self.class_counts_)),
            self._weights_of,
        )

    def _head_weights(self) -> np.ndarray:
        return np.asarray(self.weights_)

    def _loo_weights(
        self, cos_in: torch.Tensor, cos_loo: torch.Tensor, y: torch.Tensor, pred: np.ndarray
    ) -> np.ndarray:
        """Head weights (n, K) of class ``pred`` for support clips of classes ``y`` left out, refitted
        as the fit chose them: ``scores="loo"``, every class with the chosen tau_p and pooling
        (:meth:`_pooled_loo_weights`); otherwise (:func:`calm._calibration.loo_head_weights`) its own
        class (every class for ``weighting="global"``), the fitted ones for the other classes."""
        _, margins = self._loo_margins(cos_in, cos_loo, y)
        if self._chooses(self.__dict__):
            weights: np.ndarray = self._pooled_loo_weights(margins, y)[
                torch.arange(len(y)), torch.as_tensor(pred)
            ].numpy()
            return weights
        w_own = cal.loo_head_weights(
            margins,
            y,
            torch.from_numpy(np.asarray(self.reliability_, np.float64)),
            torch.from_numpy(np.asarray(self.class_counts_)),
            self._weights_of,
        ).numpy()
        own = (pred == y.numpy()) | (self.weighting == "global")
        return np.where(own[:, None], w_own, np.asarray(self.weights_)[pred])

    def _proba(self, s: np.ndarray) -> np.ndarray:
        """Scores normalised to sum to 1 over classes (uncalibrated)."""
        total = s.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            proba: np.ndarray = np.where(total > 0, s / total, 1.0 / s.shape[1])
        return proba
