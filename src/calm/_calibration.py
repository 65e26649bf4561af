"""Calibration math of the head classifiers, pure and vectorised: leave-one-out cosines of support
clips, per-head contributions to the class scores, a temperature fitted by leave-one-out negative
log-likelihood, and split-conformal prediction sets from leave-one-out nonconformity scores.

Shapes: n clips, K heads, d head dims, C classes. Every function works in float64 torch tensors
(numpy in, numpy out where noted). Written here rather than taken from MAPIE / crepes: those
wrap a scikit-learn estimator they refit per fold; a head classifier's leave-one-out predictions
are one closed form away (the class centroid without the clip, below), so the conformal step is
a quantile and a comparison, without a dependency.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from calm import _heads as H

__all__ = [
    "ACCEPT_ALL",
    "IGNORED",
    "at_class",
    "TEMPERATURES",
    "calibrated_proba",
    "conformal_threshold",
    "centroid_z",
    "fit_temperature",
    "known_statistics",
    "loo_cosines",
    "loo_head_weights",
    "loo_weighted_scores",
    "nonconformity",
    "posterior_contributions",
    "proba_log_odds",
    "prediction_sets",
    "reject_threshold",
    "score_scales",
    "standardised_sum",
    "top_log_odds",
    "vote_contributions",
]

#: The temperatures searched (log-spaced, 0.02 .. 50, T = 1 included): wide enough for the
#: under-confident CALM scores (T < 1 sharpens) and for over-confident ones (T > 1 softens).
TEMPERATURES = np.exp(np.linspace(math.log(0.02), math.log(50.0), 157))

#: Floor of a score before its logarithm (a float32 score of exactly 0 stays finite).
SCORE_FLOOR = 1e-30


def loo_cosines(
    x: torch.Tensor, y_idx: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines (n, K, C) of support clips ``x`` (n, K, d) to the class centroids (C, K, d): as
    fitted (in-sample), and with the own class's replaced by the cosine to that class's centroid
    without the clip, mu^{-i} = (n_c mu_c - h_i) / (n_c - 1) (the clip scored as if it had not been
    in the support set); ``counts`` (C,) clips per class, each at least 2 for the rows given."""
    unit_x = H.l2_normalize(x)
    cos = torch.einsum("nkd,ckd->nkc", unit_x, H.l2_normalize(centroids))
    n_c = counts[y_idx].to(x.dtype)[:, None, None]  # (n, 1, 1)
    rest = n_c * centroids[y_idx] - x  # (n, K, d): the class sum without the clip
    own = (unit_x * H.l2_normalize(rest)).sum(dim=-1, keepdim=True)  # (n, K, 1)
    return cos, cos.clone().scatter_(-1, y_idx.view(-1, 1, 1).expand(-1, x.shape[1], 1), own)


def loo_weighted_scores(
    post: torch.Tensor,
    margins: torch.Tensor,
    y_idx: torch.Tensor,
    reliability: torch.Tensor,
    weights: torch.Tensor,
    counts: torch.Tensor,
    head_weights: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """CALM's leave-one-out class scores (n, C) of support clips: head posteriors ``post``
    (n, K, C) (against the centroids without the clip) weighted by the weights refitted without
    the clip: its own clamped margins ``margins`` (n, K) taken out of the reliabilities
    (``reliability`` (C, K), Eq. 11: only its class's row changes; (K,), Eq. 7: all rows), the
    top-k heads and their weights chosen again (``head_weights``: rows (n, K) -> (n, K), Eq. 12 /
    8). ``weights`` (C, K) are the fitted ones (the other classes' rows)."""
    w_own = loo_head_weights(margins, y_idx, reliability, counts, head_weights)  # (n, K)
    if reliability.ndim == 1:
        return torch.einsum("nkc,nk->nc", post, w_own)
    scores = torch.einsum("nkc,ck->nc", post, weights)
    own = (post.gather(-1, y_idx.view(-1, 1, 1).expand(-1, post.shape[1], 1))[..., 0] * w_own).sum(dim=1)
    return scores.scatter_(1, y_idx.view(-1, 1), own[:, None])


def loo_head_weights(
    margins: torch.Tensor,
    y_idx: torch.Tensor,
    reliability: torch.Tensor,
    counts: torch.Tensor,
    head_weights: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """CALM's head weights (n, K) of each support clip's own class refitted without the clip (for
    ``reliability`` (K,), Eq. 7, the shared weights): its clamped margins ``margins`` (n, K) taken
    out of the reliabilities, the top-k heads and weights chosen again (``head_weights``)."""
    if reliability.ndim == 1:
        total = counts.sum().to(margins.dtype)
        return head_weights((total * reliability[None] - margins) / (total - 1))
    n_c = counts[y_idx].to(margins.dtype)[:, None]
    return head_weights((n_c * reliability[y_idx] - margins) / (n_c - 1))


def at_class(cos: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    """Cosines (n, K) of ``cos`` (n, K, C) at class ``idx`` (n,) of each row."""
    index = torch.as_tensor(idx).view(-1, 1, 1).expand(-1, cos.shape[1], 1)
    out: np.ndarray = cos.gather(-1, index)[..., 0].numpy()
    return out


def posterior_contributions(cos: torch.Tensor, weights: torch.Tensor, tau_p: float) -> torch.Tensor:
    """CALM's per-head parts (n, K, C) of the class scores: w_c^j p_c^j(x) with the head posterior
    p^j = softmax_c(cos / tau_p) (Eq. 5) and weights (C, K); their sum over heads is Eq. 13 / 9."""
    return torch.softmax(cos / tau_p, dim=-1) * weights.T[None]


def vote_contributions(cos: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """SAV's per-head parts (n, K, C) of the vote counts: 1 where a kept head (``heads`` (k,)
    indices) has class c as its nearest centroid (Eq. 3), else 0; the sum over heads is Eq. 4."""
    n, K, C = cos.shape
    kept = torch.zeros(K, dtype=cos.dtype, device=cos.device)
    kept[heads] = 1.0
    return torch.nn.functional.one_hot(cos.argmax(dim=-1), C).to(cos.dtype) * kept[None, :, None]


def calibrated_proba(log_scores: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log_scores / T) over classes (n, C), float64. A monotone map of each row: the
    argmax (and every tie) of ``log_scores`` is kept."""
    z = np.asarray(log_scores, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def _mean_nll(log_scores: np.ndarray, y_idx: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """Mean negative log-likelihood of the true classes for every temperature (len(temperatures),)."""
    z = log_scores[None] / temperatures[:, None, None]  # (T, n, C)
    zmax = z.max(axis=2, keepdims=True)
    log_norm = zmax[..., 0] + np.log(np.exp(z - zmax).sum(axis=2))  # (T, n)
    own = np.take_along_axis(z, y_idx[None, :, None], axis=2)[..., 0]
    out: np.ndarray = (log_norm - own).mean(axis=1)
    return out


def fit_temperature(
    log_scores: np.ndarray, y_idx: np.ndarray, temperatures: np.ndarray = TEMPERATURES
) -> float:
    """The temperature of ``temperatures`` minimising the mean negative log-likelihood of the
    true classes ``y_idx`` (n,) under softmax(log_scores / T) (``log_scores`` (n, C): leave-one-out
    scores of the support clips); the smallest such T on ties; 1.0 when n is 0."""
    if len(y_idx) == 0:
        return 1.0
    nll = _mean_nll(np.asarray(log_scores, dtype=np.float64), np.asarray(y_idx), temperatures)
    return float(temperatures[int(np.argmin(nll))])


def nonconformity(proba: np.ndarray, y_idx: np.ndarray) -> np.ndarray:
    """Nonconformity 1 - p_y(x) (n,) of clips with true classes ``y_idx`` under ``proba`` (n, C)."""
    own = np.take_along_axis(np.asarray(proba, dtype=np.float64), np.asarray(y_idx)[:, None], axis=1)
    out: np.ndarray = np.clip(1.0 - own[:, 0], 0.0, 1.0)
    return out


def conformal_threshold(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal threshold of nonconformity ``scores`` (m,) at level ``alpha``: the
    ceil((m + 1)(1 - alpha))-th smallest score, or infinity (every class kept) when that rank
    exceeds m (too few calibration clips for this alpha)."""
    m = len(scores)
    rank = math.ceil((m + 1) * (1.0 - alpha) - 1e-9)
    if rank > m or m == 0:
        return math.inf
    return float(np.sort(np.asarray(scores, dtype=np.float64))[max(rank, 1) - 1])


def prediction_sets(proba: np.ndarray, threshold: float) -> np.ndarray:
    """Membership (n, C) bool: the classes c with 1 - p_c(x) <= threshold (not excluded)."""
    out: np.ndarray = (1.0 - np.asarray(proba, dtype=np.float64)) <= threshold + 1e-12
    return out


#: The threshold that rejects nothing (finite, as a model file's tensors must be).
ACCEPT_ALL = -float(np.finfo(np.float64).max)


def top_log_odds(log_scores: np.ndarray, temperature: float) -> np.ndarray:
    """The rejection score (n,): log(p / (1 - p)) of the top calibrated probability p of each row
    of softmax(log_scores / T), computed in log space (a monotone map of p that keeps separating
    clips whose p rounds to 1)."""
    z = np.asarray(log_scores, dtype=np.float64) / temperature
    rows, best = np.arange(len(z)), np.argmax(z, axis=1)
    rest = z - z[rows, best][:, None]
    rest[rows, best] = -np.inf  # the other classes, relative to the top one
    second = rest.max(axis=1)  # finite: two or more classes
    out: np.ndarray = -(second + np.log(np.exp(rest - second[:, None]).sum(axis=1)))
    return out


def proba_log_odds(probabilities: np.ndarray) -> np.ndarray:
    """:func:`top_log_odds` of probability rows (n, C) already computed (exact up to float rounding:
    a top probability that rounds to 1 gives infinity)."""
    p = np.asarray(probabilities, dtype=np.float64)
    top = p.max(axis=1)
    with np.errstate(divide="ignore"):
        out: np.ndarray = np.log(top) - np.log(np.clip(1.0 - top, 0.0, None))
    return out


def reject_threshold(scores: np.ndarray, accept: float) -> float:
    """The threshold on rejection ``scores`` (m,) of known-class clips (leave-one-out
    :func:`top_log_odds` of the support set) that accepts about a fraction ``accept`` of such clips:
    the floor((m + 1)(1 - accept))-th smallest score (a clip scoring below it is rejected; the
    split-conformal rank, so an exchangeable new clip is accepted with probability at least
    ``accept``), or ``ACCEPT_ALL`` (reject nothing) when that rank is 0 or there are no scores."""
    m = len(scores)
    rank = math.floor((m + 1) * (1.0 - accept) + 1e-9)
    if rank < 1 or m == 0:
        return ACCEPT_ALL
    return float(np.sort(np.asarray(scores, dtype=np.float64))[min(rank, m) - 1])


def known_statistics(own: np.ndarray, y_idx: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The support statistics of :func:`centroid_z` from the leave-one-out cosines ``own`` (n, K) of
    support clips to their own class's centroid (classes ``y_idx`` (n,)): per class and head the
    mean cosine (C, K), and per head the pooled within-class standard deviation (K,). A class
    without rows gets the mean over the classes that have some; with no rows at all the means are
    0 and the spreads 1 (the score is then the weighted cosine itself)."""
    own, y_idx = np.asarray(own, dtype=np.float64), np.asarray(y_idx)
    K = own.shape[1]
    counts = np.bincount(y_idx, minlength=n_classes).astype(np.float64)
    if len(y_idx) == 0:
        return np.zeros((n_classes, K)), np.ones(K)
    sums = np.zeros((n_classes, K))
    np.add.at(sums, y_idx, own)
    have = counts > 0
    means = np.empty((n_classes, K))
    means[have] = sums[have] / counts[have, None]
    means[~have] = means[have].mean(axis=0)
    dof = len(y_idx) - int(have.sum())
    resid = own - means[y_idx]
    spread = np.sqrt((resid**2).sum(axis=0) / dof) if dof > 0 else np.ones(K)
    return means, np.maximum(spread, SPREAD_FLOOR)


#: Smallest per-head spread of :func:`known_statistics` (a head whose support cosines all agree).
SPREAD_FLOOR = 1e-6


def centroid_z(
    cos_pred: np.ndarray, means: np.ndarray, spread: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """The "centroid-z" known score (n,): each head's cosine ``cos_pred`` (n, K) to the predicted
    class's centroid, standardised by that class's support mean ``means`` (n, K) (the predicted
    class's rows) and the head's within-class spread ``spread`` (K,); then the mean of two averages
    of those z: weighted by the predicted class's head weights ``weights`` (n, K) (rows summing to
    1 over its kept heads: the heads that tell the known classes apart) and over all heads (a novel
    sound may show in heads kept for none of them). Higher is more like the support clips of the
    class; a clip whose heads all sit at the class's support mean scores 0."""
    z = (np.asarray(cos_pred, dtype=np.float64) - means) / spread
    kept = (np.asarray(weights, dtype=np.float64) * z).sum(axis=1)
    out: np.ndarray = (kept + z.mean(axis=1)) / 2
    return out


#: The scale of a part of :func:`standardised_sum` that counts for nothing (finite, as a model
#: file's tensors must be).
IGNORED = float(np.finfo(np.float64).max)


def score_scales(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The location and scale (P,) of each column of ``parts`` (m, P), scores of the support clips
    (leave-one-out): the mean and the standard deviation (floored at ``SPREAD_FLOOR``). With no
    rows (one clip per class) the parts cannot be put on one scale: the first column counts as it
    is (location 0, scale 1) and the others not at all (scale ``IGNORED``), so "centroid-z+top" is
    centroid-z alone there, as before it (a ranking that needs no scale)."""
    parts = np.asarray(parts, dtype=np.float64)
    if len(parts) == 0:
        return np.zeros(parts.shape[1]), np.r_[1.0, np.full(parts.shape[1] - 1, IGNORED)]
    return parts.mean(axis=0), np.maximum(parts.std(axis=0), SPREAD_FLOOR)


def standardised_sum(parts: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The "centroid-z+top" known score (n,): the sum over the columns of ``parts`` (n, P) (the
    centroid-z score and the top log-odds) of (score - loc) / scale, each score put on the scale of
    the support clips' own (:func:`score_scales`), so that each counts alike."""
    out: np.ndarray = ((np.asarray(parts, dtype=np.float64) - loc) / scale).sum(axis=1)
    return out
