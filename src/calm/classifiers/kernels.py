"""In-place, chunk-level forms of the head math (paper Eq. 2, 5-6, 13) used inside the fit and
predict loops of the head classifiers.

They give the same numbers as the pure functions of :mod:`calm._heads` while overwriting a chunk
the caller owns, so a chunk's working set is one (K, n, C) tensor. Shapes: chunk ``xb`` (n, K, d),
unit centroids laid out (K, d, C), similarities (K, n, C), class indices ``yb`` (n,).
"""

from __future__ import annotations

import numpy as np
import torch

from calm import _heads as H

__all__ = ["calm_scores", "leave_one_out_", "needs_shift", "similarities", "support_margins", "unit_layout"]


def unit_layout(centroids: torch.Tensor) -> torch.Tensor:
    """Unit-length centroids (C, K, d) laid out (K, d, C) for batched matmuls."""
    return H.l2_normalize(centroids).permute(1, 2, 0).contiguous()


def needs_shift(tau_p: float, n_classes: int, dtype: torch.dtype) -> bool:
    """Whether softmax(s / tau_p) needs the usual max-shift: with |s| <= 1 (cosines),
    exp(s / tau_p) and its sum over classes can neither overflow nor underflow otherwise."""
    return bool(1.0 / tau_p + np.log(n_classes) + 1.0 > np.log(torch.finfo(dtype).max) - 1.0)


def similarities(xb: torch.Tensor, unit: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Eq. 2 for a chunk (n, K, d) against unit centroids (K, d, C), laid out (K, n, C);
    ``inplace`` normalises ``xb`` itself (a chunk the caller owns)."""
    if inplace:
        x = xb.div_(torch.linalg.vector_norm(xb, dim=-1, keepdim=True).clamp_min_(H.EPS))
    else:
        x = H.l2_normalize(xb)
    return torch.matmul(x.transpose(0, 1), unit)


def support_margins(s: torch.Tensor, yb: torch.Tensor, tau_p: float) -> torch.Tensor:
    """Eq. 5-6 on support similarities ``s`` (K, n, C), overwriting them, -> (K, n): the same
    numbers as ``clamped_margins(head_posteriors(s, tau_p), yb)``, as
    p_c - max_{c' != c} p_c' = (e_c - max_{c' != c} e_c') / sum_c' e_c' with e = exp(s / tau_p)."""
    K, n, C = s.shape
    idx = yb.view(1, n, 1).expand(K, n, 1)
    s.mul_(1.0 / tau_p)
    if needs_shift(tau_p, C, s.dtype):
        s.sub_(s.amax(dim=-1, keepdim=True))
    own = s.gather(-1, idx).squeeze(-1).exp_()
    s.exp_()
    total = s.sum(dim=-1)
    rivals = s.scatter_(-1, idx, 0.0).amax(dim=-1)
    return ((own - rivals) / total).clamp_min_(0)


def leave_one_out_(
    s: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor
) -> None:
    """In place on s (K, n, C): s_j(x_i, c_i) becomes the cosine to mu^{-i}_{c_i} =
    (n_c mu_c - h_i) / (n_c - 1) for clips whose class has more than one clip (the scale
    1 / (n_c - 1) does not change a cosine). ``centroids`` (C, K, d), ``counts`` (C,)."""
    K, n, _ = s.shape
    n_c = counts[yb].to(xb.dtype)  # (n,)
    rest = n_c[:, None, None] * centroids[yb].to(xb.dtype) - xb  # (n, K, d)
    loo = (H.l2_normalize(xb) * H.l2_normalize(rest)).sum(dim=-1)  # (n, K)
    idx = yb.view(1, n, 1).expand(K, n, 1)
    own = s.gather(-1, idx).squeeze(-1)  # (K, n)
    s.scatter_(-1, idx, torch.where((n_c > 1)[None, :], loo.T.to(s.dtype), own).unsqueeze(-1))


def calm_scores(xb: torch.Tensor, scaled: torch.Tensor, w_t: torch.Tensor, shift: bool) -> torch.Tensor:
    """Eq. 2, 5 and 13 for one chunk, in place: ``scaled`` = unit centroids / tau_p (K, d, C),
    weights ``w_t`` (K, C), ``shift`` as :func:`needs_shift` says -> scores (n, C)."""
    e = similarities(xb, scaled, inplace=True)  # Eq. 2 over tau_p, (K, n, C)
    if shift:
        e.sub_(e.amax(dim=-1, keepdim=True))
    e.exp_()
    e.div_(e.sum(dim=-1, keepdim=True))  # Eq. 5
    e.mul_(w_t[:, None, :])  # w_c^j p_c^j
    return e.sum(dim=0)  # Eq. 13
