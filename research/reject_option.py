"""The reject option (`unknown=`) on a validation split: which rejection score tells clips of the
known classes from clips of classes held out of the support set.

Folds up to `--validation` F only (default 4: folds 1-3 support, fold 4 queries; never the test
fold 5). Per seed, `--held-out` classes (default 3) are drawn and left out of the support set; the
support set is `shots` clips of each other class from folds below F; queries are every fold-F clip
(known classes, and the held-out ones as "unknown"). Scores, each thresholded at the conformal rank
of the support clips' leave-one-out scores for `--accept` (`calm._calibration.reject_threshold`):

- `top-p`: the log-odds of the calibrated top probability (what `unknown=` uses);
- `similarity`: max over classes c of sum_j w_c^j cos(h_j(x), mu_c^j), the class's head-weighted
  cosine to its centroid (leave-one-out: the clip's own class centroid without it).

Prints per method, shots and score: AUROC known vs unknown (threshold-free), the accept rate of
known-class queries, the reject rate of unknown ones and the accuracy of accepted known queries,
means over seeds.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from calm import _calibration as cal
from calm import _heads as H
from calm.classifiers import CALM, SAV, HeadClassifier, calibration
from calm.store import load_features


def similarity(clf: HeadClassifier, cos: torch.Tensor) -> np.ndarray:
    """max_c sum_j w_c^j cos[:, j, c] of cosines (n, K, C)."""
    w = torch.as_tensor(clf._head_weights(), dtype=cos.dtype)  # (C, K)
    out: np.ndarray = torch.einsum("nkc,ck->nc", cos, w).max(dim=1).values.numpy()
    return out


def scores(clf: HeadClassifier, X: np.ndarray, y_idx: np.ndarray | None) -> dict[str, np.ndarray]:
    """Both rejection scores of clips X; leave-one-out ones for support clips (y_idx given)."""
    x = torch.as_tensor(np.asarray(X, dtype=np.float64))
    centroids = torch.as_tensor(np.asarray(clf.centroids_, dtype=np.float64))
    if y_idx is None:
        cos = torch.einsum("nkd,ckd->nkc", H.l2_normalize(x), H.l2_normalize(centroids))
        top = calibration.known_scores(clf, X)  # unknown_score="top-proba"
        return {"top-p": top, "similarity": similarity(clf, cos)}
    counts = torch.as_tensor(np.asarray(clf.class_counts_))
    y = torch.as_tensor(y_idx)
    cos_in, cos_loo = cal.loo_cosines(x, y, centroids, counts)
    log_scores = clf._log_scores(clf._loo_scores(cos_in, cos_loo, y).numpy())
    return {"top-p": cal.top_log_odds(log_scores, clf.temperature_), "similarity": similarity(clf, cos_loo)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--shots", default="5,10")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--held-out", type=int, default=3)
    ap.add_argument("--accept", type=float, default=0.9)
    ap.add_argument("--validation", type=int, default=4, help="query fold; only folds <= it are read")
    args = ap.parse_args()
    torch.set_num_threads(1)
    X, y, meta = load_features(args.store)
    fold = meta["fold"].astype(int).to_numpy()
    y = np.asarray(y)
    keep = fold <= args.validation
    classes = np.unique(y[keep])
    methods = {"sav": SAV(), "calm-global": CALM(weighting="global"), "calm": CALM()}
    for shots in [int(s) for s in args.shots.split(",")]:
        for name, est in methods.items():
            rows: dict[str, list[list[float]]] = {"top-p": [], "similarity": []}
            for seed in range(args.seeds):
                rng = np.random.default_rng(seed)
                unknown = rng.choice(classes, args.held_out, replace=False)
                support = np.concatenate(
                    [
                        rng.choice(np.flatnonzero(keep & (fold < args.validation) & (y == c)), shots, False)
                        for c in classes
                        if c not in unknown
                    ]
                )
                query = np.flatnonzero(fold == args.validation)
                is_unknown = np.isin(y[query], unknown)
                Xs = np.asarray(X[support], dtype=np.float32)
                clf = est.set_params(unknown=args.accept, unknown_score="top-proba").fit(Xs, y[support])
                loo = scores(clf, Xs, np.searchsorted(clf.classes_, y[support]))
                Xq = np.asarray(X[query], dtype=np.float32)
                q = scores(clf, Xq, None)
                right = clf.classes_[clf.class_scores(Xq).argmax(1)] == y[query]
                known = ~is_unknown
                for s in rows:
                    accepted = q[s] >= cal.reject_threshold(loo[s], args.accept)
                    if s == "top-p":  # the option itself rejects exactly these
                        assert np.array_equal(clf.predict(Xq) != "unknown", accepted)
                    rows[s].append(
                        [
                            roc_auc_score(known, q[s]),
                            accepted[known].mean(),
                            1 - accepted[is_unknown].mean(),
                            right[known & accepted].mean(),
                        ]
                    )
            for s, vals in rows.items():
                auc, acc_rate, rej_rate, acc = np.mean(vals, axis=0)
                print(
                    f"{name:12s} {shots:3d} shots {s:10s} AUROC {auc:.3f}  known accepted {acc_rate:.3f}  "
                    f"unknown rejected {rej_rate:.3f}  accuracy of accepted {acc:.3f}"
                )


if __name__ == "__main__":
    main()
