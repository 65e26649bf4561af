"""Can a known-vs-unknown score beat "centroid-z" on held-out classes of the same corpus? Variants
of the per-head z-score on VALIDATION open-set episodes inside the training folds (never the test
fold), the same episodes as research/reject_scores.py (its docstring; same seeds, support draws
and held-out classes).

Every score is higher for "known", computed from the support set alone for the queries and,
leave-one-out, for the support clips (the threshold accepting ``--accept`` of them,
`calm._calibration.reject_threshold`). The classifier (its prediction and calibrated top
probability) is unchanged; CALM's head weights are the fitted ones for the queries and refitted
without the clip for the support clips (as shipped). Candidates:

- `top`: log-odds of the calibrated top probability (baseline);
- `z_mix`: the shipped "centroid-z" (per-head cosine to the predicted class's centroid, minus
  the class's mean of its support clips' leave-one-out cosines, over the head's pooled
  within-class spread; mean of the kept-heads-weighted and the all-heads average);
- `zc_mix`: the same on centred features: the support set's per-head mean feature (class-balanced:
  the mean of the class centroids; without the clip for a left-out support clip) subtracted from
  the clip and the centroids before the cosines;
- `zs_mix`, `zcs_mix`: the class's own spread per head shrunk towards the head's pooled spread
  (pooled variance weighted as ``NU`` clips), plain / centred;
- `zc_q20`: centred, the mean of the kept-heads average and the 20 % quantile over all heads;
- `zc_rival`: centred z-mix of the predicted class minus the largest z-mix of another class;
- `zcap0_mix`, `zcap1_mix`: `z_mix` with each head's z capped at 0 / 1 (a clip very typical in some
  heads cannot make up for atypical others);
- `zf`: z weighted per head by how far the class's members' mean cosine to its centroid sits above
  the other classes' clips' (over the head's spread; a per-head Fisher ratio); `zf_mix`, `zf_kept`:
  its mean with the all-heads / kept-heads average;
- `z_kept75`: 3/4 of the kept-heads average plus 1/4 of the all-heads one;
- `z_best`: the largest z-mix over all classes (each with its own weights), not the predicted one;
- `dm_mix`: per head a diagonal Mahalanobis distance of the unit head features to the predicted
  class's mean (pooled within-class variance per dimension, shrunk half-way to the head's mean
  variance), z-scored per class and head like `z_mix` (minus, so higher is known);
- `dmc_mix`: the same on centred features;
- `sum_<a>+top`: support-standardised sum of `a` and `top` ((v - mean) / std of the support
  clips' leave-one-out values); `rmin_<a>+top`: the smaller of the support-side ranks.

Prints per scenario and shots: AUROC and FAR@95 (support threshold), accepted known share; paired
AUROC differences against `top` and against `z_mix` with 95 % t intervals. ``--json`` keeps every
per-seed figure. Chosen on seeds 0-19, confirmed on seeds 20-39 (``--seed-start 20``):
`sum_z_mix+top` became ``unknown_score="centroid-z+top"`` (research/README.md).

    nice -n 10 python research/reject_scores_z.py STORE --unknowns UNKNOWN_STORE --seeds 20 \\
        --shots 5,10 --methods calm --json runs/reject-z.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from reject_scores import METHODS, validation_data
from scipy import stats
from sklearn.metrics import roc_auc_score

from calm import _calibration as cal
from calm.evaluate.openset import held_out_classes

#: Weight (in clips) of the pooled per-head variance in the shrunk class variance.
NU = 5.0


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (_unit(a) * _unit(b)).sum(-1)


class Geometry:
    """Per-head cosines of support (leave-one-out) and query clips to every class centroid, raw or
    centred: ``sup`` (n, K, C) with the own class's centroid (and the centring mean) without the
    clip, ``qry`` (m, K, C), and ``own`` (n, K) the support clips' leave-one-out cosine to their own
    class."""

    def __init__(self, Xs: np.ndarray, y: np.ndarray, Xq: np.ndarray, C: int, centred: bool):
        n = len(y)
        counts = np.bincount(y, minlength=C).astype(np.float64)
        cent = np.stack([Xs[y == c].mean(0) for c in range(C)])  # (C, K, d)
        g = cent.mean(0) if centred else np.zeros_like(cent[0])  # (K, d)
        self.qry = np.einsum("mkd,ckd->mkc", _unit(Xq - g), _unit(cent - g))
        # leave-one-out: the own class's centroid without the clip, and the centring mean with it
        own_cent = (counts[y][:, None, None] * cent[y] - Xs) / np.maximum(counts[y] - 1, 1)[:, None, None]
        cents = np.broadcast_to(cent, (n,) + cent.shape).copy()  # (n, C, K, d)
        cents[np.arange(n), y] = own_cent
        gi = cents.mean(1) if centred else np.zeros_like(Xs)  # (n, K, d)
        self.sup = np.einsum("nkd,nckd->nkc", _unit(Xs - gi), _unit(cents - gi[:, None]))
        self.own = np.take_along_axis(self.sup, y[:, None, None].repeat(self.sup.shape[1], 1), 2)[..., 0]


def _class_stats(own: np.ndarray, y: np.ndarray, C: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class means (C, K), pooled spread (K,) and the class's own variance (C, K) of ``own``."""
    means = np.stack([own[y == c].mean(0) for c in range(C)])
    resid = own - means[y]
    pooled = (resid**2).sum(0) / max(len(y) - C, 1)
    var_c = np.stack([(resid[y == c] ** 2).sum(0) / max((y == c).sum() - 1, 1) for c in range(C)])
    return means, np.sqrt(pooled) + 1e-6, var_c


def _z_all_classes(
    cos: np.ndarray, means: np.ndarray, spread: np.ndarray, own: np.ndarray | None, y: np.ndarray | None
) -> np.ndarray:
    """z (n, K, C) of cosines (n, K, C) to each class; spread (K,) or (C, K); for support rows the
    own class's mean without the clip."""
    m = np.broadcast_to(means.T[None], cos.shape).copy()  # (n, K, C)
    if own is not None and y is not None:
        n_c = np.bincount(y, minlength=means.shape[0]).astype(np.float64)[y][:, None]
        m[np.arange(len(y)), :, y] = (n_c * means[y] - own) / np.maximum(n_c - 1, 1)
    s = spread[None, :, None] if spread.ndim == 1 else spread.T[None]
    return (cos - m) / s


def _mix(z_pred: np.ndarray, w_pred: np.ndarray) -> np.ndarray:
    return ((w_pred * z_pred).sum(1) + z_pred.mean(1)) / 2


def _diag_maha(
    Xs: np.ndarray, y: np.ndarray, Xq: np.ndarray, C: int, centred: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-head diagonal Mahalanobis distances (support LOO (n, K, C), queries (m, K, C)) of unit
    head features (centred first when asked) to the class means, and the support's own (n, K)."""
    n = len(y)
    if centred:
        cent = np.stack([Xs[y == c].mean(0) for c in range(C)])
        g = cent.mean(0)
        Xs, Xq = Xs - g, Xq - g  # LOO of the centring mean ignored here (a small effect)
    us, uq = _unit(Xs), _unit(Xq)
    counts = np.bincount(y, minlength=C).astype(np.float64)
    mu = np.stack([us[y == c].mean(0) for c in range(C)])  # (C, K, d)
    resid = us - mu[y]
    var = (resid**2).sum(0) / max(n - C, 1)  # (K, d)
    var = 0.5 * var + 0.5 * var.mean(-1, keepdims=True)
    dq = (((uq[:, None] - mu[None]) ** 2) / var[None, None]).sum(-1).transpose(0, 2, 1)  # (m, K, C)
    mus = np.broadcast_to(mu, (n,) + mu.shape).copy()
    mus[np.arange(n), y] = (counts[y][:, None, None] * mu[y] - us) / np.maximum(counts[y] - 1, 1)[
        :, None, None
    ]
    ds = (((us[:, None] - mus) ** 2) / var[None, None]).sum(-1).transpose(0, 2, 1)
    own = np.take_along_axis(ds, y[:, None, None].repeat(ds.shape[1], 1), 2)[..., 0]
    return ds, dq, own


def _fisher_weights(
    cos: np.ndarray, y: np.ndarray, means: np.ndarray, pooled: np.ndarray, C: int
) -> np.ndarray:
    """Per class and head (C, K): how far the class's members' mean cosine to its centroid sits above
    the other classes' clips' mean cosine to it, in the head's spread (clipped at 0), rows summing
    to 1: heads in which non-members of the class look unlike it."""
    other = np.stack([cos[y != c, :, c].mean(0) for c in range(C)])  # (C, K)
    a = np.maximum(means - other, 0.0) / pooled[None]
    return a / np.maximum(a.sum(1, keepdims=True), 1e-12)


def _at(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, idx[:, None, None].repeat(a.shape[1], 1), 2)[..., 0]


def all_scores(clf, Xs: np.ndarray, y: np.ndarray, Xq: np.ndarray) -> tuple[dict, dict]:
    """(support leave-one-out scores, query scores), name -> (n,)."""
    C = len(clf.classes_)
    Xs64, Xq64 = np.asarray(Xs, np.float64), np.asarray(Xq, np.float64)
    W = np.asarray(clf._head_weights(), np.float64)
    T = clf.temperature_
    counts = torch.as_tensor(np.asarray(clf.class_counts_))
    cent = torch.as_tensor(np.asarray(clf.centroids_, np.float64))
    yt = torch.as_tensor(y)
    cos_in, cos_loo = cal.loo_cosines(torch.as_tensor(Xs64), yt, cent, counts)
    log_s = clf._log_scores(clf._loo_scores(cos_in, cos_loo, yt).numpy())
    log_q = clf._log_scores(clf.class_scores(Xq))
    ps, pq = log_s.argmax(1), log_q.argmax(1)
    w_s = np.asarray(clf._loo_weights(cos_in, cos_loo, yt, ps)) if hasattr(clf, "_loo_weights") else W[ps]
    w_q = W[pq]
    sup: dict[str, np.ndarray] = {"top": cal.top_log_odds(log_s, T)}
    qry: dict[str, np.ndarray] = {"top": cal.top_log_odds(log_q, T)}
    for tag, centred in (("z", False), ("zc", True)):
        g = Geometry(Xs64, y, Xq64, C, centred)
        means, pooled, var_c = _class_stats(g.own, y, C)
        zs = _z_all_classes(g.sup, means, pooled, g.own, y)
        zq = _z_all_classes(g.qry, means, pooled, None, None)
        sup[f"{tag}_mix"], qry[f"{tag}_mix"] = _mix(_at(zs, ps), w_s), _mix(_at(zq, pq), w_q)
        shr = np.sqrt(
            ((np.bincount(y, minlength=C)[:, None] - 1) * var_c + NU * pooled**2)
            / (np.bincount(y, minlength=C)[:, None] - 1 + NU)
        )
        zs2 = _z_all_classes(g.sup, means, shr, g.own, y)
        zq2 = _z_all_classes(g.qry, means, shr, None, None)
        name = "zs_mix" if tag == "z" else "zcs_mix"
        sup[name], qry[name] = _mix(_at(zs2, ps), w_s), _mix(_at(zq2, pq), w_q)
        if centred:
            for side, z, p, w in ((sup, zs, ps, w_s), (qry, zq, pq, w_q)):
                zp = _at(z, p)
                side["zc_q20"] = ((w * zp).sum(1) + np.quantile(zp, 0.2, axis=1)) / 2
                all_mix = (np.einsum("nkc,ck->nc", z, W) + z.mean(1)) / 2  # each class's own weights
                all_mix[np.arange(len(p)), p] = -np.inf
                side["zc_rival"] = side["zc_mix"] - all_mix.max(1)
    g = Geometry(Xs64, y, Xq64, C, False)
    means, pooled, _ = _class_stats(g.own, y, C)
    zs = _z_all_classes(g.sup, means, pooled, g.own, y)
    zq = _z_all_classes(g.qry, means, pooled, None, None)
    fisher = _fisher_weights(g.sup, y, means, pooled, C)  # (C, K)
    for side, z, p, w in ((sup, zs, ps, w_s), (qry, zq, pq, w_q)):
        zp = _at(z, p)
        for cap in (0.0, 1.0):
            side[f"zcap{cap:g}_mix"] = _mix(np.minimum(zp, cap), w)
        side["zf"] = (fisher[p] * zp).sum(1)
        side["zf_mix"] = (side["zf"] + zp.mean(1)) / 2
        side["zf_kept"] = (side["zf"] + (w * zp).sum(1)) / 2
        side["z_kept75"] = 0.75 * (w * zp).sum(1) + 0.25 * zp.mean(1)
        every = (np.einsum("nkc,ck->nc", z, W) + z.mean(1)) / 2  # each class with its own weights
        every[np.arange(len(p)), p] = _mix(zp, w)  # the predicted class with the clip's weights
        side["z_best"] = every.max(1)
    for tag, centred in (("dm", False), ("dmc", True)):
        ds, dq, own = _diag_maha(Xs64, y, Xq64, C, centred)
        means, pooled, _ = _class_stats(own, y, C)
        zs = -_z_all_classes(ds, means, pooled, own, y)
        zq = -_z_all_classes(dq, means, pooled, None, None)
        sup[f"{tag}_mix"], qry[f"{tag}_mix"] = _mix(_at(zs, ps), w_s), _mix(_at(zq, pq), w_q)
    for a in ("z_mix", "zc_mix", "zf_mix", "zcap0_mix"):
        mu_a, sd_a = sup[a].mean(), sup[a].std() + 1e-12
        mu_t, sd_t = sup["top"].mean(), sup["top"].std() + 1e-12
        ra, rt = np.sort(sup[a]), np.sort(sup["top"])
        for side in (sup, qry):
            side[f"sum_{a}+top"] = (side[a] - mu_a) / sd_a + (side["top"] - mu_t) / sd_t
            side[f"rmin_{a}+top"] = np.minimum(
                np.searchsorted(ra, side[a], "right") / len(ra),
                np.searchsorted(rt, side["top"], "right") / len(rt),
            )
    return sup, qry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--unknowns")
    ap.add_argument("--shots", default="5,10")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--seed-start", type=int, default=0, help="seeds seed-start .. seed-start + seeds - 1")
    ap.add_argument("--held-out", type=int, default=3)
    ap.add_argument("--accept", type=float, default=0.95)
    ap.add_argument("--folds", type=int, default=4, help="only folds 1..F are read (never the test fold)")
    ap.add_argument("--methods", default="calm")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    X, y, fold, U, all_classes, scenarios = validation_data(args)
    records = []
    for scen, n_held in scenarios.items():
        for shots in [int(s) for s in args.shots.split(",")]:
            for name in args.methods.split(","):
                for seed in range(args.seed_start, args.seed_start + args.seeds):
                    qfold = 1 + seed % args.folds
                    held = held_out_classes(all_classes, n_held, seed)
                    known = [c for c in all_classes if c not in held]
                    rng = np.random.default_rng([seed, shots])
                    sup = np.concatenate(
                        [rng.choice(np.flatnonzero((fold != qfold) & (y == c)), shots, False) for c in known]
                    )
                    q = np.flatnonzero(fold == qfold)
                    qk, qu = q[np.isin(y[q], known)], q[~np.isin(y[q], known)]
                    Xq = np.concatenate([X[qk], X[qu]] + ([U] if scen == "speech" else []))
                    n_k = len(qk)
                    clf = METHODS[name]().fit(X[sup], y[sup])
                    s_sup, s_qry = all_scores(clf, X[sup], np.searchsorted(clf.classes_, y[sup]), Xq)
                    pos = np.r_[np.ones(n_k), np.zeros(len(Xq) - n_k)]
                    rec = {"scenario": scen, "shots": shots, "method": name, "seed": seed, "scores": {}}
                    for s, v in s_qry.items():
                        thr = cal.reject_threshold(s_sup[s], args.accept)
                        rec["scores"][s] = {
                            "auroc": 100 * roc_auc_score(pos, v),
                            "far95": 100 * float(np.mean(v[n_k:] >= thr)),
                            "accept_known": 100 * float(np.mean(v[:n_k] >= thr)),
                        }
                    records.append(rec)
                report(records, scen, shots, name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f)


def _interval(d: np.ndarray) -> str:
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+5.1f} [{d.mean() - half:+5.1f}, {d.mean() + half:+5.1f}]"


def report(records: list[dict], scen: str, shots: int, method: str) -> None:
    rs = [r for r in records if (r["scenario"], r["shots"], r["method"]) == (scen, shots, method)]
    top = np.array([r["scores"]["top"]["auroc"] for r in rs])
    zmix = np.array([r["scores"]["z_mix"]["auroc"] for r in rs])
    print(f"\n== {scen} {method} {shots}-shot ({len(rs)} seeds)", flush=True)
    for s in rs[0]["scores"]:
        a = np.array([r["scores"][s]["auroc"] for r in rs])
        far = np.mean([r["scores"][s]["far95"] for r in rs])
        acc = np.mean([r["scores"][s]["accept_known"] for r in rs])
        print(
            f"  {s:20s} AUROC {a.mean():5.1f}  vs top {_interval(a - top)}  vs z_mix {_interval(a - zmix)}"
            f"  FAR@95 {far:5.1f} acc.known {acc:5.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
