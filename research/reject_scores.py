"""Which known-vs-unknown score should the reject option (`unknown=`) use? Candidate scores from
the support set only, on VALIDATION open-set episodes inside the training folds (never the test fold).

Episodes (`--folds`, default 1-4 of ESC-10; fold 5 is never read): per seed s the query fold is
1 + s % 4 and the support set is `shots` clips of each known class drawn from the other three
folds. Two scenarios per episode, as `calm evaluate --open-set 3` and `--unknowns-features` build
them: "held-out": 3 classes drawn per seed (`calm.evaluate.openset.held_out_classes`) are left out
of the support set, their query-fold clips are the unknowns; "speech": every class known, the
clips of `--unknowns` (speech_commands_mini, same extraction key) are the unknowns.

Every score is higher for "known"; each is computed for the queries and, leave-one-out, for the
support clips (the clip's own class centroid / support clip / class statistics without it), from
which `calm._calibration.reject_threshold` sets the threshold accepting `--accept` of known clips:

- `top_proba`: log-odds of the calibrated top probability (today's `unknown=` score, the baseline);
- `energy`: T logsumexp(log class scores / T) (T the calibration temperature);
- `sim_kept`: weighted cosine to the predicted class's centroid over that class's kept heads;
- `sim_all`: mean cosine to the predicted class's centroid over all heads;
- `z_kept`, `z_all`: each head's cosine to the predicted class's centroid standardised by the
  class's support mean and the pooled within-class spread of that head (leave-one-out cosines),
  weighted over the kept heads / averaged over all heads;
- `zfrac_all`: the share of heads whose z is above -2 (inside the class's support spread);
- `z_mix`: the mean of `z_kept` and `z_all`;
- `nearest_kept`, `nearest_all`: per head the largest cosine to a support clip of the predicted
  class, weighted over kept heads / averaged over all;
- `knn1`, `knn3`: cosine (mean over all heads) to the nearest / mean of 3 nearest support clips of
  any class;
- `maha_all`, `rmaha_all`: minus the summed per-head Mahalanobis distance (unit head features,
  Ledoit-Wolf shrunk shared within-class covariance per head) to the nearest class mean, and the
  relative version (minus the distance to the all-support mean under its own shrunk covariance);
- `rank_<a>+top`: the mean of the support-side ranks (empirical CDF of the support scores) of `a`
  and `top_proba`; `rmin_<a>+top`: the smaller of the two ranks.

Prints per scenario, method and shots: AUROC (%) and FAR@95 with the support-side threshold (%),
means over seeds, and for AUROC the paired difference to `top_proba` with its 95 % t interval;
`--json` writes every per-seed figure.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import torch
from scipy import stats
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from calm import _calibration as cal
from calm import _heads as H
from calm.classifiers import CALM, SAV, HeadClassifier
from calm.evaluate.openset import held_out_classes
from calm.store import load_features

METHODS: dict[str, Callable[[], HeadClassifier]] = {
    "sav": SAV,
    "calm-global": lambda: CALM(weighting="global"),
    "calm": CALM,
}


def _unit(x: np.ndarray) -> torch.Tensor:
    return H.l2_normalize(torch.as_tensor(np.asarray(x, dtype=np.float64)))


class Side:
    """One side's quantities: cosines to centroids (n, K, C), predicted class (n,), log scores."""

    def __init__(self, cos: torch.Tensor, log_scores: np.ndarray):
        self.cos, self.log_scores = cos, log_scores
        self.pred = np.argmax(log_scores, axis=1)

    def at_pred(self) -> np.ndarray:
        """Cosines (n, K) to the predicted class's centroid."""
        p = torch.as_tensor(self.pred).view(-1, 1, 1).expand(-1, self.cos.shape[1], 1)
        out: np.ndarray = self.cos.gather(-1, p)[..., 0].numpy()
        return out


def _mahalanobis(u: torch.Tensor, means: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """Per-head squared distances (n, K, M) of unit features u (n, K, d) to means (M, K, d)."""
    diff = u[:, None] - means[None]  # (n, M, K, d)
    return torch.einsum("nmkd,kde,nmke->nkm", diff, prec, diff)


def _precisions(r: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrunk precision (K, d, d) of residuals r (n, K, d), one per head."""
    return torch.stack(
        [
            torch.as_tensor(LedoitWolf(assume_centered=True).fit(r[:, j].numpy()).precision_)
            for j in range(r.shape[1])
        ]
    )


def all_scores(clf: HeadClassifier, Xs: np.ndarray, y_idx: np.ndarray, Xq: np.ndarray) -> tuple[dict, dict]:
    """(support leave-one-out scores, query scores), each name -> (n,)."""
    us, uq = _unit(Xs), _unit(Xq)
    C = len(clf.classes_)
    cent = torch.as_tensor(np.asarray(clf.centroids_, np.float64))
    counts = torch.as_tensor(np.asarray(clf.class_counts_))
    y = torch.as_tensor(y_idx)
    T = getattr(clf, "temperature_", 1.0)
    W = np.asarray(clf._head_weights(), np.float64)  # (C, K)
    cos_in, cos_loo = cal.loo_cosines(torch.as_tensor(np.asarray(Xs, np.float64)), y, cent, counts)
    sup = Side(cos_loo, clf._log_scores(clf._loo_scores(cos_in, cos_loo, y).numpy()))
    qry = Side(torch.einsum("nkd,ckd->nkc", uq, H.l2_normalize(cent)), clf._log_scores(clf.class_scores(Xq)))
    # per (class, head): support mean of own-class LOO cosines; pooled within-class spread per head
    own = cos_loo.gather(-1, y.view(-1, 1, 1).expand(-1, cos_loo.shape[1], 1))[..., 0].numpy()  # (n, K)
    n_c = np.asarray(clf.class_counts_, np.float64)
    m_cj = np.stack([own[y_idx == c].mean(0) for c in range(C)])  # (C, K)
    resid = own - m_cj[y_idx]
    dof = max(len(y_idx) - C, 1)
    s_j = np.sqrt((resid**2).sum(0) / dof) + 1e-6  # (K,)
    # support-support per-head cosines (n, n, K)
    ss = torch.einsum("nkd,mkd->nmk", us, us).numpy()
    qs = torch.einsum("nkd,mkd->nmk", uq, us).numpy()
    # Mahalanobis: per-head shared within-class covariance of unit features, shrunk
    ucent = torch.stack([us[y == c].mean(0) for c in range(C)])  # (C, K, d)
    prec = _precisions(us - ucent[y])
    gmean = us.mean(0, keepdim=True)
    gprec = _precisions(us - gmean)

    def side_scores(side: Side, u: torch.Tensor, sims: np.ndarray, loo: bool) -> dict[str, np.ndarray]:
        c = side.pred
        at = side.at_pred()  # (n, K)
        n = len(c)
        out: dict[str, np.ndarray] = {}
        out["top_proba"] = cal.top_log_odds(side.log_scores, T)
        z = side.log_scores / T
        zmax = z.max(1)
        out["energy"] = T * (zmax + np.log(np.exp(z - zmax[:, None]).sum(1)))
        out["sim_kept"] = (W[c] * at).sum(1)
        out["sim_all"] = at.mean(1)
        m = m_cj[c].copy()
        if loo:  # the clip's own class mean without it (where it is the predicted class)
            same = c == y_idx
            nc = n_c[c[same]][:, None]
            m[same] = np.where(nc > 1, (nc * m_cj[c[same]] - own[same]) / np.maximum(nc - 1, 1), m[same])
        zz = (at - m) / s_j
        out["z_kept"] = (W[c] * zz).sum(1)
        out["z_all"] = zz.mean(1)
        out["zfrac_all"] = (zz > -2).mean(1)
        out["z_mix"] = (out["z_kept"] + out["z_all"]) / 2
        s = sims.copy()  # (n, m_support, K)
        if loo:
            s[np.arange(n), np.arange(n)] = -np.inf
        cls_mask = y_idx[None, :] == c[:, None]  # (n, m)
        s_cls = np.where(cls_mask[..., None], s, -np.inf).max(1)  # (n, K)
        s_cls = np.where(np.isfinite(s_cls), s_cls, -1.0)
        out["nearest_kept"] = (W[c] * s_cls).sum(1)
        out["nearest_all"] = s_cls.mean(1)
        mean_s = np.where(np.isfinite(s), s, -np.inf).mean(2) if loo else s.mean(2)  # (n, m)
        srt = -np.sort(-mean_s, axis=1)
        out["knn1"] = srt[:, 0]
        out["knn3"] = srt[:, :3].mean(1)
        means = ucent.clone().expand(n, -1, -1, -1).clone() if loo else None
        if loo:  # class mean without the clip, for its own class
            nc_t = counts[y].to(torch.float64)[:, None, None]
            rest = (nc_t * ucent[y] - u) / (nc_t - 1).clamp(min=1)
            means[torch.arange(n), y] = torch.where(nc_t > 1, rest, ucent[y])
            diff = u[:, None] - means
            d = torch.einsum("nmkd,kde,nmke->nkm", diff, prec, diff)
        else:
            d = _mahalanobis(u, ucent, prec)
        dsum = d.sum(1).numpy()  # (n, C)
        out["maha_all"] = -dsum.min(1)
        d0 = _mahalanobis(u, gmean, gprec)[..., 0].sum(1).numpy()
        out["rmaha_all"] = -(dsum.min(1) - d0)
        return out

    s_sup = side_scores(sup, us, ss, True)
    s_qry = side_scores(qry, uq, qs, False)
    for a in ("sim_kept", "z_kept", "z_all", "nearest_all", "knn1", "maha_all"):
        ref_a, ref_t = np.sort(s_sup[a]), np.sort(s_sup["top_proba"])

        def rank(v: np.ndarray, ref: np.ndarray) -> np.ndarray:
            return np.searchsorted(ref, v, side="right") / max(len(ref), 1)

        s_sup[f"rank_{a}+top"] = (rank(s_sup[a], ref_a) + rank(s_sup["top_proba"], ref_t)) / 2
        s_qry[f"rank_{a}+top"] = (rank(s_qry[a], ref_a) + rank(s_qry["top_proba"], ref_t)) / 2
        if a in ("z_kept", "z_all"):  # known only where both are typical of the support set
            s_sup[f"rmin_{a}+top"] = np.minimum(rank(s_sup[a], ref_a), rank(s_sup["top_proba"], ref_t))
            s_qry[f"rmin_{a}+top"] = np.minimum(rank(s_qry[a], ref_a), rank(s_qry["top_proba"], ref_t))
    return s_sup, s_qry


def validation_data(args: argparse.Namespace):
    """The store's clips of folds 1..``args.folds`` only (X, y, fold), the unknown clips U of
    ``args.unknowns`` (None without), the classes, and the scenarios {name: classes held out}."""
    X, y, meta = load_features(args.store)
    fold = meta["fold"].astype(int).to_numpy()
    y = np.asarray(y).astype(str)
    keep = fold <= args.folds
    X, y, fold = np.asarray(X[np.flatnonzero(keep)], np.float32), y[keep], fold[keep]
    U = None
    if args.unknowns:
        U = np.asarray(load_features(args.unknowns, key=meta.attrs.get("digest"))[0][:], np.float32)
    all_classes = sorted(set(y))
    scenarios = {"held-out": args.held_out} | ({"speech": 0} if U is not None else {})
    return X, y, fold, U, all_classes, scenarios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--unknowns", help="a store of out-of-domain clips (same extraction key)")
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--held-out", type=int, default=3)
    ap.add_argument("--accept", type=float, default=0.95)
    ap.add_argument("--folds", type=int, default=4, help="only folds 1..F are read (never the test fold)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    X, y, fold, U, all_classes, scenarios = validation_data(args)
    records = []
    for scen, n_held in scenarios.items():
        for shots in [int(s) for s in args.shots.split(",")]:
            for name in args.methods.split(","):
                for seed in range(args.seeds):
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
                        auc = 100 * roc_auc_score(pos, v)
                        far = acc = None
                        if shots > 1:
                            thr = cal.reject_threshold(s_sup[s], args.accept)
                            far, acc = 100 * np.mean(v[n_k:] >= thr), 100 * np.mean(v[:n_k] >= thr)
                        rec["scores"][s] = {"auroc": auc, "far95": far, "accept_known": acc}
                    records.append(rec)
                report(records, scen, shots, name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f)


def report(records: list[dict], scen: str, shots: int, method: str) -> None:
    rs = [r for r in records if (r["scenario"], r["shots"], r["method"]) == (scen, shots, method)]
    base = np.array([r["scores"]["top_proba"]["auroc"] for r in rs])
    print(f"\n== {scen} {method} {shots}-shot ({len(rs)} seeds)")
    for s in rs[0]["scores"]:
        a = np.array([r["scores"][s]["auroc"] for r in rs])
        d = a - base
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.nan
        far = [r["scores"][s]["far95"] for r in rs if r["scores"][s]["far95"] is not None]
        acc = [r["scores"][s]["accept_known"] for r in rs if r["scores"][s]["accept_known"] is not None]
        tail = f"FAR@95 {np.mean(far):5.1f} acc.known {np.mean(acc):5.1f}" if far else ""
        print(
            f"  {s:22s} AUROC {a.mean():5.1f}  diff {d.mean():+5.1f} "
            f"[{d.mean() - half:+5.1f}, {d.mean() + half:+5.1f}]  {tail}"
        )


if __name__ == "__main__":
    main()
