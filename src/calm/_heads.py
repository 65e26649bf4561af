"""Pure, vectorised head math of SAV and CALM (METHOD.md; paper Eq. 1-13).

These small functions are the building blocks of :class:`calm.classifiers.SAV` and
:class:`calm.classifiers.CALM`, and are public for analyses (figures, evaluation) that need head
posteriors, margins, reliabilities or weights on their own. They take torch tensors or NumPy arrays
and return torch tensors; nothing here loops over heads, samples or classes in Python.

Shapes (n samples, K heads, d head dimension, C classes):

- features ``X``: (n, K, d); class centroids: (C, K, d)
- similarities / posteriors: (n, K, C)
- margins: (n, K); reliability and weights: (C, K) class-conditional, (K,) global
- ``y_idx``: (n,) integer class indices into ``classes_``

Precision: features of any floating dtype (float16 and bfloat16 included) are promoted to at least
float32 before any sum (:func:`compute_dtype`); float64 input stays float64.

Tie rules: :func:`head_predictions` and every arg-max over classes pick the lower class index;
:func:`top_k_mask` keeps the lower head index among equal reliabilities.
"""

from __future__ import annotations

import numbers
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import torch

from calm.errors import ParameterError

__all__ = [
    "EPS",
    "ArrayLike",
    "as_tensor",
    "compute_dtype",
    "l2_normalize",
    "norms_in_range",
    "class_centroids",
    "cosine_similarities",
    "head_predictions",
    "head_posteriors",
    "clamped_margins",
    "global_reliability",
    "class_reliability",
    "shrunk_reliability",
    "loo_reliabilities",
    "resolve_k",
    "top_k_mask",
    "head_weights",
    "weighted_scores",
    "vote_counts",
    "rank_heads",
]

#: What the functions take: a torch tensor, a NumPy array or anything `np.asarray` accepts.
ArrayLike: TypeAlias = torch.Tensor | npt.ArrayLike

#: Norms are clamped to at least EPS, so a zero feature vector has cosine 0 with every centroid.
#: Vectors are first scaled by their largest magnitude when their norm would overflow or lose
#: precision (see :func:`l2_normalize`), so only exact zeros meet the clamp.
EPS = 1e-12


def compute_dtype(dtype: torch.dtype | np.dtype) -> torch.dtype:
    """The accumulation dtype for features of ``dtype``: float64 stays, everything else is float32."""
    if isinstance(dtype, torch.dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32
    return torch.float64 if np.dtype(dtype) == np.float64 else torch.float32


def as_tensor(x: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` (NumPy, torch, nested lists) as a CPU torch tensor, without a copy where possible."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        a = np.asarray(x)
        if a.dtype.kind not in "fiub":
            raise ValueError(f"expected a numeric array, got dtype {a.dtype}")
        if a.dtype.kind == "f" and a.dtype not in (np.float16, np.float32, np.float64):
            a = a.astype(np.float32)
        t = torch.from_numpy(np.ascontiguousarray(a))
    if t.device.type != "cpu":
        t = t.cpu()
    return t if dtype is None else t.to(dtype)


def _float(x: ArrayLike) -> torch.Tensor:
    t = as_tensor(x)
    return t.to(compute_dtype(t.dtype)) if t.is_floating_point() else t.to(torch.float32)


def norms_in_range(norms: torch.Tensor) -> bool:
    """Whether vector norms computed directly are accurate and unaffected by the EPS clamp: finite
    (no square overflowed), above EPS and not so small that the squares of a vector's entries could
    underflow (``norms`` of zero vectors count as small)."""
    info = torch.finfo(norms.dtype)
    low = max(EPS, float(np.sqrt(info.tiny) / info.eps) * 64.0)
    if norms.numel() == 0:
        return True
    lo, hi = torch.aminmax(norms)
    return float(lo) > low and float(hi) < float("inf")  # NaN fails both


def l2_normalize(x: ArrayLike, dim: int = -1) -> torch.Tensor:
    """``x / ||x||_2`` along ``dim`` (the normalisation inside Eq. 2) for features of any scale:
    when a norm would overflow or underflow, vectors are first divided by their largest
    magnitude; zero vectors stay zero (norms clamped to EPS)."""
    t = _float(x)
    norms: torch.Tensor = torch.linalg.vector_norm(t, dim=dim, keepdim=True)
    if not norms_in_range(norms):
        t = t / t.abs().amax(dim=dim, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)
        norms = torch.linalg.vector_norm(t, dim=dim, keepdim=True)
    out: torch.Tensor = t / norms.clamp_min(EPS)
    return out


def class_centroids(X: ArrayLike, y_idx: ArrayLike, n_classes: int) -> torch.Tensor:
    """Eq. 1: mu_c^j, the mean feature of each class's clips, per head -> (C, K, d).

    Raises ValueError when a class has no clip.
    """
    X = _float(X)
    y = as_tensor(y_idx, torch.int64)
    counts = torch.bincount(y, minlength=n_classes)
    if len(counts) > n_classes or (counts == 0).any():
        raise ValueError("every class needs at least one clip and y_idx must lie in [0, n_classes)")
    sums = torch.zeros((n_classes, *X.shape[1:]), dtype=X.dtype).index_add_(0, y, X)
    return sums / counts.to(X.dtype).view(-1, *([1] * (X.ndim - 1)))


def cosine_similarities(X: ArrayLike, centroids: ArrayLike, *, normalized: bool = False) -> torch.Tensor:
    """Eq. 2: s_j(x, c) = cos(h_j(x), mu_c^j) for features (n, K, d) -> (n, K, C).

    With ``normalized=True`` the centroids are taken as already unit-length and laid out (K, d, C)
    (the layout the classifiers cache); the result is then a (n, K, C) view of a (K, n, C) tensor.
    """
    x = l2_normalize(X)
    m = _float(centroids) if normalized else l2_normalize(centroids).permute(1, 2, 0)
    # one (n, d) @ (d, C) product per head, batched over heads
    return torch.matmul(x.transpose(0, 1), m.to(x.dtype)).transpose(0, 1)


def head_predictions(similarities: ArrayLike) -> torch.Tensor:
    """Eq. 3: each head's nearest-centroid class, (n, K, C) -> (n, K); ties go to the lower class."""
    return torch.argmax(as_tensor(similarities), dim=-1)


def head_posteriors(similarities: ArrayLike, tau_p: float) -> torch.Tensor:
    """Eq. 5: p_c^j(x) = softmax over classes of s_j(x, c) / tau_p, (n, K, C) -> (n, K, C)."""
    if not tau_p > 0:
        raise ParameterError(f"tau_p must be > 0, got {tau_p!r}")
    return torch.softmax(_float(similarities) / tau_p, dim=-1)


def clamped_margins(posteriors: ArrayLike, y_idx: ArrayLike) -> torch.Tensor:
    """Eq. 6: m^j(x, c) = max(0, p_c^j(x) - max_{c' != c} p_{c'}^j(x)) at the true class, -> (n, K)."""
    p = _float(posteriors)
    n, K, _ = p.shape
    idx = as_tensor(y_idx, torch.int64).view(n, 1, 1).expand(n, K, 1)
    own = p.gather(-1, idx).squeeze(-1)
    rivals = p.scatter(-1, idx, float("-inf")).amax(dim=-1)
    return (own - rivals).clamp_min(0)


def global_reliability(margins: ArrayLike) -> torch.Tensor:
    """Eq. 7: r^j, the mean clamped margin over all support clips, (n, K) -> (K,)."""
    return _float(margins).mean(dim=0)


def class_reliability(margins: ArrayLike, y_idx: ArrayLike, n_classes: int) -> torch.Tensor:
    """Eq. 11: r_c^j, the mean clamped margin over class c's support clips, (n, K) -> (C, K)."""
    m = _float(margins)
    y = as_tensor(y_idx, torch.int64)
    counts = torch.bincount(y, minlength=n_classes).to(m.dtype)
    if (counts == 0).any():
        raise ValueError("every class needs at least one clip")
    return torch.zeros((n_classes, m.shape[1]), dtype=m.dtype).index_add_(0, y, m) / counts[:, None]


def shrunk_reliability(
    class_r: ArrayLike, global_r: ArrayLike, counts: ArrayLike, lam: float
) -> torch.Tensor:
    """Class reliabilities shrunk towards the global one: (n_c r_c + lam r) / (n_c + lam).

    ``class_r`` (..., C, K) (Eq. 11), ``global_r`` (..., K) (Eq. 7), ``counts`` (..., C) clips per
    class -> (..., C, K). ``lam = 0`` gives Eq. 11, ``lam = inf`` Eq. 7 for every class, ``lam = 1``
    with one clip a class the mean of the two.
    """
    rc, rg = _float(class_r), _float(global_r)
    if lam == float("inf"):
        return rg.unsqueeze(-2).expand(rc.shape)
    n_c = as_tensor(counts, rc.dtype).unsqueeze(-1)
    return (n_c * rc + lam * rg.unsqueeze(-2)) / (n_c + lam)


def loo_reliabilities(
    margins: ArrayLike,
    y_idx: ArrayLike,
    class_r: ArrayLike,
    global_r: ArrayLike,
    counts: ArrayLike,
    lam: float,
) -> torch.Tensor:
    """:func:`shrunk_reliability` refitted without each of some support clips in turn.

    ``margins`` (n, K) (Eq. 6) and classes ``y_idx`` (n,) of the clips left out; ``class_r``
    (C, K) and ``global_r`` (K,), the fitted Eq. 11 / Eq. 7 means over all ``counts`` (C,)
    support clips (each class at least 2) -> (n, C, K): row i with clip i's margins taken out of
    its class's mean and out of the global mean.
    """
    m = _float(margins)
    y = as_tensor(y_idx, torch.int64)
    cnt = as_tensor(counts, torch.int64)
    rc, rg = _float(class_r).to(m.dtype), _float(global_r).to(m.dtype)
    n, C, total = m.shape[0], len(cnt), float(cnt.sum())
    rows = torch.arange(n)
    n_own = cnt[y].to(m.dtype)[:, None]  # (n, 1)
    rc_loo = rc[None].expand(n, C, -1).clone()
    rc_loo[rows, y] = (n_own * rc[y] - m) / (n_own - 1)  # Eq. 11 without clip i
    n_loo = cnt[None].expand(n, C).clone()
    n_loo[rows, y] -= 1
    rg_loo = (total * rg[None] - m) / (total - 1)  # Eq. 7 without clip i, (n, K)
    return shrunk_reliability(rc_loo, rg_loo, n_loo, lam)


def resolve_k(k: float | None, n_heads: int) -> int:
    """The number of heads kept: an int as is, a float in (0, 1] as round(k * n_heads) (at least 1,
    halves rounded up), None as all heads. Raises ValueError for anything else or k > n_heads."""
    if k is None:
        return int(n_heads)
    if isinstance(k, bool | np.bool_):
        raise ParameterError(f"k must be an int, a float in (0, 1] or None, got {k!r}")
    if isinstance(k, numbers.Integral):
        if not 1 <= int(k) <= n_heads:
            raise ParameterError(f"k={int(k)} heads is outside [1, n_heads={n_heads}]")
        return int(k)
    if isinstance(k, numbers.Real):
        if not 0.0 < float(k) <= 1.0:
            raise ParameterError(f"a float k is a fraction of heads and must lie in (0, 1], got {k!r}")
        return int(min(n_heads, max(1, np.floor(float(k) * n_heads + 0.5))))
    raise ParameterError(f"k must be an int, a float in (0, 1] or None, got {k!r}")


def top_k_mask(reliability: ArrayLike, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries along the last axis; ties keep the lower head index."""
    r = _float(reliability)
    if not 1 <= k <= r.shape[-1]:
        raise ParameterError(f"k={k} is outside [1, {r.shape[-1]}]")
    order = torch.sort(r, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros(r.shape, dtype=torch.bool).scatter_(-1, order, True)


def head_weights(
    reliability: ArrayLike, k: int, tau_w: float, normalization: str = "softmax"
) -> torch.Tensor:
    """Eq. 8 (global, (K,)) and Eq. 12 (class-conditional, (C, K)): top-k heads by reliability,
    weighted by softmax(r / tau_w) over the kept heads and 0 elsewhere.

    ``normalization="power"`` is the authors' released code instead: r^(1 / tau_w) divided by its
    sum over the kept heads (uniform over the kept heads when all of them have r = 0).
    """
    if not tau_w > 0:
        raise ParameterError(f"tau_w must be > 0, got {tau_w!r}")
    r = _float(reliability)
    mask = top_k_mask(r, k)
    if normalization == "softmax":
        return torch.softmax((r / tau_w).masked_fill(~mask, float("-inf")), dim=-1)
    if normalization == "power":
        v = torch.where(mask, r.clamp_min(0) ** (1.0 / tau_w), torch.zeros((), dtype=r.dtype))
        total = v.sum(dim=-1, keepdim=True)
        return torch.where(total > 0, v / total.clamp_min(torch.finfo(r.dtype).tiny), mask.to(r.dtype) / k)
    raise ParameterError(f"normalization must be 'softmax' or 'power', got {normalization!r}")


def weighted_scores(posteriors: ArrayLike, weights: ArrayLike) -> torch.Tensor:
    """Eq. 9 / 13: score_c(x) = sum_j w_c^j p_c^j(x); weights (K,) or (C, K) -> (n, C)."""
    p = _float(posteriors)
    w = as_tensor(weights, p.dtype)
    if w.ndim == 1:
        return torch.einsum("nkc,k->nc", p, w)
    return torch.einsum("nkc,ck->nc", p, w)


def vote_counts(head_preds: ArrayLike, n_classes: int) -> torch.Tensor:
    """Eq. 4: votes per class from the predictions of the kept heads, (n, k) -> (n, C) int64."""
    preds = as_tensor(head_preds, torch.int64)
    votes = torch.zeros((preds.shape[0], n_classes), dtype=torch.int64)
    return votes.scatter_add_(1, preds, torch.ones_like(preds))


def rank_heads(correct: ArrayLike, margins: ArrayLike | None = None) -> torch.Tensor:
    """SAV head order: by support accuracy (``correct`` counts, (K,)) descending; equal accuracies
    by ``margins`` (mean clamped margin, Eq. 6-7) descending when given; then by lower head index."""
    c = as_tensor(correct).cpu().numpy().astype(np.float64)
    keys: list[npt.NDArray[Any]] = [np.arange(len(c))]  # np.lexsort: the last key is the primary one
    if margins is not None:
        keys.append(-as_tensor(margins).cpu().numpy().astype(np.float64))
    keys.append(-c)
    return torch.from_numpy(np.lexsort(keys))
