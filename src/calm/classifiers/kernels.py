"""In-place, chunk-level forms of the head math (paper Eq. 2, 5-6, 13) used inside the fit and
predict loops of the head classifiers.

They give the same numbers as the pure functions of :mod:`calm._heads` while overwriting a chunk
the caller owns, so a chunk's working set is one (K, n, C) tensor. Shapes: chunk ``xb`` (n, K, d),
unit centroids laid out (K, d, C), similarities (K, n, C), class indices ``yb`` (n,).

CALM's passes (:func:`calm_scores` for queries, :func:`support_margin_sums` for the float64 support
side) read row chunks as views of the caller's features (e.g. a float16 memory map) and work on
blocks of heads: runs of heads are converted and normalised at once into a reused buffer
(:class:`Workspace`: no large allocation per block), then each cache-sized block gets one batched
matmul of many rows per head, exp in place and its reductions (queries: the per-head normaliser
and the weighted sum over heads as one baddbmm; support: the clamped margins summed per class),
so the (K, n, C) posteriors never reach main memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from calm import _heads as H
from calm.classifiers.threads import Workspace, imap
from calm.errors import FeatureError

__all__ = [
    "BLOCK_BYTES",
    "LOG2E",
    "SUPPORT_BLOCK_BYTES",
    "SUPPORT_READ_BYTES",
    "calm_scores",
    "check_finite",
    "chunk_blocks",
    "head_block",
    "needs_shift",
    "normalize_",
    "support_margin_sums",
    "support_margins",
    "support_votes",
    "unit_layout",
]

#: log2(e): exp(s / tau_p) is computed as exp2(s * LOG2E / tau_p) on both sides, the factor folded
#: into the centroids (so the matmul yields the exponent): torch's exp2 takes under half of exp's
#: time in float64 and under a third in float32 on cache-resident blocks, and rounds as well (float32,
#: 1e7 arguments in [-50, 50]: at most 0.84 ulp against exp's 0.56, mean 0.26 ulp for both).
LOG2E = 1.0 / math.log(2.0)
#: Target size of one head block's similarities in :func:`calm_scores` (fits in L2/L3 caches).
BLOCK_BYTES = 4 * 2**20
#: Target size of the features converted at once in :func:`calm_scores` (long runs of each row).
READ_BYTES = 8 * 2**20
#: The same as BLOCK_BYTES and READ_BYTES for :func:`support_margin_sums` (float64; larger blocks
#: than the query path's, as fewer parallel regions per tile fare better when threads are preempted).
SUPPORT_BLOCK_BYTES = 8 * 2**20
SUPPORT_READ_BYTES = 16 * 2**20


def unit_layout(centroids: torch.Tensor) -> torch.Tensor:
    """Unit-length centroids (C, K, d) laid out (K, d, C) for batched matmuls."""
    return H.l2_normalize(centroids).permute(1, 2, 0).contiguous()


def needs_shift(tau_p: float, n_classes: int, dtype: torch.dtype) -> bool:
    """Whether softmax(s / tau_p) needs the usual max-shift: with |s| <= 1 (cosines),
    exp(s / tau_p) and its sum over classes can neither overflow nor underflow otherwise."""
    return bool(1.0 / tau_p + np.log(n_classes) + 1.0 > np.log(torch.finfo(dtype).max) - 1.0)


def normalize_(x: torch.Tensor, what: str | None = None) -> torch.Tensor:
    """``x`` divided in place by its L2 norm along the last axis, for any scale (as
    :func:`calm._heads.l2_normalize`: rescaled by the largest magnitude first only when a norm
    would overflow or underflow); with ``what``, a ValueError naming it if ``x`` holds NaN or
    infinite values (seen in the norms: no extra pass over ``x``)."""
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    if not H.norms_in_range(norms):  # in range implies finite
        x.div_(x.abs().amax(dim=-1, keepdim=True).clamp_min_(torch.finfo(x.dtype).tiny))
        norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # NaN where x held NaN or inf
        if what is not None:
            check_finite(norms, what)
    return x.div_(norms.clamp_min_(H.EPS))


def support_margins(
    s: torch.Tensor, yb: torch.Tensor, tau_p: float, scaled: bool = False, shift: bool | None = None
) -> torch.Tensor:
    """Eq. 5-6 on support similarities ``s`` (K, n, C) (already times LOG2E / tau_p if
    ``scaled``; ``shift``: :func:`needs_shift`, computed if None), overwriting them, -> (K, n):
    the same numbers as ``clamped_margins(head_posteriors(s, tau_p), yb)``, as
    p_c - max_{c' != c} p_c' = (e_c - max_{c' != c} e_c') / sum_c' e_c' with e = exp(s / tau_p)."""
    K, n, C = s.shape
    idx = yb.view(1, n, 1).expand(K, n, 1)
    if not scaled:
        s.mul_(LOG2E / tau_p)
    if needs_shift(tau_p, C, s.dtype) if shift is None else shift:
        s.sub_(s.amax(dim=-1, keepdim=True))
    own = s.gather(-1, idx).squeeze(-1).exp2_()
    s.exp2_()
    total = s.sum(dim=-1)
    rivals = s.scatter_(-1, idx, 0.0).amax(dim=-1)
    return ((own - rivals) / total).clamp_min_(0)


def head_block(n: int, C: int, itemsize: int, block_bytes: int | None = None) -> int:
    """Heads per block so that a block's (heads, n, C) similarities take about ``block_bytes``
    (default :data:`BLOCK_BYTES`)."""
    return max(1, (BLOCK_BYTES if block_bytes is None else block_bytes) // max(1, n * C * itemsize))


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` itself; ValueError naming ``what`` if it holds NaN or infinite values."""
    if not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):  # NaN propagates
        raise FeatureError(f"{what} contains NaN or infinite values")
    return x


def calm_scores(
    xb: torch.Tensor,
    scaled: torch.Tensor,
    w_t: torch.Tensor,
    shift: bool,
    heads: torch.Tensor | None = None,
    ws: Workspace | None = None,
    what: str = "X",
) -> torch.Tensor:
    """Eq. 2, 5 and 13 for one chunk: ``scaled`` = unit centroids * LOG2E / tau_p (K, d, C), weights
    ``w_t`` (K, C), ``shift`` as :func:`needs_shift` says -> scores (n, C). ``xb`` (n, K_all, d),
    in any dtype and on any device (e.g. a view of a float16 memory map), is read, never written;
    ``heads`` (K,) selects the heads ``scaled`` describes (None: all). Heads are processed in
    cache-sized blocks, each converted to ``scaled``'s dtype into ``ws``'s buffers as it is laid
    out head-major and checked for NaN / infinite values (ValueError naming ``what``)."""
    n = xb.shape[0]
    K, d, C = scaled.shape
    dtype, dev = scaled.dtype, scaled.device
    ws = ws if ws is not None else Workspace(dev)
    out = torch.zeros((n, 1, C), dtype=dtype, device=dev)
    step = head_block(n, C, scaled.element_size())
    read = step * max(1, READ_BYTES // (n * d * scaled.element_size() * step))
    for r0 in range(0, K, read):  # long runs of each row are read, converted and normalised at once
        r1 = min(r0 + read, K)
        src = xb[:, r0:r1] if heads is None else xb[:, heads[r0:r1]]
        xr = normalize_(ws.get("x", (r1 - r0, n, d), dtype).copy_(src.transpose(0, 1)), what)
        for h0 in range(r0, r1, step):
            h1 = min(h0 + step, r1)
            x = xr[h0 - r0 : h1 - r0]
            e = torch.matmul(x, scaled[h0:h1], out=ws.get("e", (h1 - h0, n, C), dtype))  # Eq. 2, base 2
            if shift:
                e.sub_(e.amax(dim=-1, keepdim=True))
            e.exp2_()
            r = e.sum(dim=-1, keepdim=True).reciprocal_()  # 1 / Eq. 5's normaliser, (k, n, 1)
            e.mul_(w_t[h0:h1, None, :])  # w_c^j exp(s_c^j / tau_p), as exp2 above
            out.baddbmm_(r.permute(1, 2, 0), e.transpose(0, 1))  # Eq. 13: sum_j w_c^j p_c^j
    return out.squeeze(1)


def chunk_blocks(
    view: tuple[int, torch.Tensor],
    y_t: torch.Tensor,
    unit: torch.Tensor,
    ws: Workspace,
    raw: Callable[[torch.Tensor, torch.Tensor, int, int], Any] | None = None,
) -> Iterator[tuple[torch.Tensor, int, int, torch.Tensor, Any]]:
    """The support side's blocked similarities (Eq. 2) in ``unit``'s dtype for one row chunk
    ``view`` = (start, rows (n, K, d)) in any dtype: for every cache-sized block of heads h0:h1,
    (yb, h0, h1, s, extra) with s (h1 - h0, n, C) = normalised rows x ``unit`` (C, K, d, e.g. unit
    centroids, possibly scaled), computed into ``ws``'s buffers (valid until the next block), yb
    the chunk's class indices from ``y_t``. Runs of heads are read and converted at once; ``raw``,
    if given, is called on each run before normalisation as raw(x (r1 - r0, n, d), yb, r0, r1),
    and its result is ``extra`` for the run's blocks."""
    C, K, d = unit.shape
    dtype, itemsize = unit.dtype, unit.element_size()
    start, xb = view
    n = xb.shape[0]
    yb = y_t[start : start + n]
    step = head_block(n, C, itemsize, SUPPORT_BLOCK_BYTES)
    read = step * max(1, SUPPORT_READ_BYTES // (n * d * itemsize * step))
    for r0 in range(0, K, read):
        r1 = min(r0 + read, K)
        xr = ws.get("x", (r1 - r0, n, d), dtype).copy_(xb[:, r0:r1].transpose(0, 1))
        extra = None if raw is None else raw(xr, yb, r0, r1)
        normalize_(xr)
        for h0 in range(r0, r1, step):
            h1 = min(h0 + step, r1)
            u = unit[:, h0:h1].permute(1, 2, 0)  # (k, d, C), a strided view
            s = torch.matmul(xr[h0 - r0 : h1 - r0], u, out=ws.get("s", (h1 - h0, n, C), dtype))
            yield yb, h0, h1, s, extra


def support_margin_sums(
    views: Iterator[tuple[int, torch.Tensor]],
    y_t: torch.Tensor,
    centroids: torch.Tensor,
    tau_p: float,
    loo_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 2, 5 and 6 over the support set in float64: per head and class, the sum of the clamped
    margins of that class's clips -> (K, C). ``views`` yields (start, rows (n, K, d)) in any dtype,
    ``y_t`` (N,) class indices, ``centroids`` (C, K, d) float64 (overwritten by the scaled unit
    centroids unless ``loo_counts`` is given). With ``loo_counts`` (the (C,)
    clips per class), a clip's own-class similarity is its cosine to the centroid of the other
    clips of its class (``reliability="leave-one-out"``; in-sample for classes of one clip).
    Blocked as :func:`chunk_blocks` says; row chunks run in parallel threads on a CPU
    (:func:`calm.classifiers.threads.imap`), each summing into its own (K, C) part, and the parts
    are added in the chunks' order, so the sums do not depend on the thread count."""
    C, K, d = centroids.shape
    shift = needs_shift(tau_p, C, centroids.dtype)
    sums = torch.zeros((K, C), dtype=centroids.dtype, device=centroids.device)
    # unit centroids times log2(e) / tau_p (Eq. 2, 5), (C, K, d): strided views in the matmuls
    scaled = normalize_(centroids if loo_counts is None else centroids.clone()).mul_(LOG2E / tau_p)

    def loo(x: torch.Tensor, yb: torch.Tensor, r0: int, r1: int) -> Any:
        return None if loo_counts is None else (r0, _loo_cosines(x, yb, centroids[:, r0:r1], loo_counts))

    def chunk(view: tuple[int, torch.Tensor], ws: Workspace) -> torch.Tensor:
        part = torch.zeros_like(sums)
        for yb, h0, h1, s, extra in chunk_blocks(view, y_t, scaled, ws, loo):
            if extra is not None:  # the own-class entries, leave-one-out
                r0, (cos, alone) = extra
                idx = yb.view(1, -1, 1).expand(h1 - h0, -1, 1)
                own = torch.where(alone, s.gather(-1, idx), cos[h0 - r0 : h1 - r0] * (LOG2E / tau_p))
                s.scatter_(-1, idx, own)
            m = support_margins(s, yb, tau_p, scaled=True, shift=shift)  # Eq. 5-6, (k, n)
            part[h0:h1].index_add_(1, yb, m)
        return part

    for part in imap(views, chunk, centroids.device):
        sums += part
    return sums


def support_votes(
    views: Iterator[tuple[int, torch.Tensor]],
    y_t: torch.Tensor,
    centroids: torch.Tensor,
    tau_p: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SAV's support side (Eq. 2-3, and Eq. 5-6 with ``tau_p``): per head, how many support clips
    its nearest centroid classifies right (K,) int64, and with ``tau_p`` the sum of their clamped
    margins (K,) (else None). ``centroids`` (C, K, d) float64 is read; blocked as
    :func:`chunk_blocks` says, row chunks in parallel as :func:`support_margin_sums`."""
    C, K, _ = centroids.shape
    unit = normalize_(centroids.clone())
    shift = None if tau_p is None else needs_shift(tau_p, C, centroids.dtype)
    correct = torch.zeros(K, dtype=torch.int64, device=centroids.device)
    margins = torch.zeros(K, dtype=centroids.dtype, device=centroids.device)

    def chunk(view: tuple[int, torch.Tensor], ws: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
        hits, part = torch.zeros_like(correct), torch.zeros_like(margins)
        for yb, h0, h1, s, _ in chunk_blocks(view, y_t, unit, ws):
            hits[h0:h1] = (s.argmax(dim=-1) == yb[None, :]).sum(dim=1)  # Eq. 3 on the support set
            if tau_p is not None:
                part[h0:h1] = support_margins(s, yb, tau_p, shift=shift).sum(dim=1)  # Eq. 5-6
        return hits, part

    for hits, part in imap(views, chunk, centroids.device):
        correct += hits
        margins += part
    return correct, None if tau_p is None else margins


def _loo_cosines(
    x: torch.Tensor, yb: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a block ``x`` (k, n, d) of raw features and ``centroids`` (C, k, d) of the same heads:
    the cosines (k, n, 1) of every clip to its class centroid without it,
    mu^{-i} = (n_c mu_c - h_i) / (n_c - 1), and the mask (1, n, 1) of clips alone in their class."""
    n_c = counts[yb].to(x.dtype)  # (n,)
    rest = n_c[None, :, None] * centroids[yb].transpose(0, 1) - x  # (k, n, d)
    loo = (H.l2_normalize(x) * H.l2_normalize(rest)).sum(dim=-1, keepdim=True)
    return loo, (n_c <= 1).view(1, -1, 1)
