"""Calibration and conformal sets of SAV / CALM-global / CALM on a feature store, on the episodes of
`calm evaluate` (support from the training folds, queries from the test fold).

Prints per method and shots: accuracy, ECE (15 bins; mean over episodes and pooled over every
query of every seed), mean top probability, and the coverage, mean size and share of empty sets of
`predict_set(alpha)`. `--validation F` keeps only the folds below or at F and tests on fold F (a
validation split inside the training part, e.g. 4: folds 1-3 support, fold 4 queries): the choice
of calibration variant was made there, never on the test fold. `--variant fixed-weights` scores
the left-out clips with the fitted head weights (CALM's in-sample selection kept) instead of
weights refitted without the clip.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from calm.classifiers import CALM, SAV, HeadClassifier
from calm.evaluate.episodes import episode_features, episodes, make_parts
from calm.evaluate.metrics import expected_calibration_error
from calm.store import load_features


def _fixed_weights(self: CALM, cos_in: torch.Tensor, cos_loo: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return HeadClassifier._loo_scores(self, cos_in, cos_loo, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--validation", type=int, default=None, help="test on this fold, keep folds <= it")
    ap.add_argument("--variant", choices=["loo-weights", "fixed-weights"], default="loo-weights")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.variant == "fixed-weights":
        CALM._loo_scores = _fixed_weights  # type: ignore[method-assign]
    X, y, meta = load_features(args.store)
    rows = np.arange(len(y))
    test_fold = 5
    if args.validation is not None:
        rows = np.flatnonzero(meta["fold"].astype(int).to_numpy() <= args.validation)
        test_fold = args.validation
    X_rows, y_rows = np.asarray(X[rows], dtype=np.float32), np.asarray(y)[rows]
    parts, _ = make_parts(meta.iloc[rows].reset_index(drop=True), test_fold)
    methods = {"sav": SAV(), "calm-global": CALM(weighting="global"), "calm": CALM()}
    out = []
    for shots in [int(s) for s in args.shots.split(",")]:
        for name, est in methods.items():
            eces, conf, hits, cover, sizes = [], [], [], [], []
            for ep in episodes(y_rows, parts, [shots], range(args.seeds)):
                clf = est.fit(episode_features(X_rows, ep.support), ep.support_y)
                Xq, yq = episode_features(X_rows, ep.query), y_rows[ep.query]
                p = clf.predict_proba(Xq)
                right = clf.classes_[p.argmax(axis=1)] == yq
                eces.append(expected_calibration_error(p.max(axis=1), right))
                conf.append(p.max(axis=1))
                hits.append(right)
                sets = clf.predict_set(Xq, alpha=args.alpha)
                cover += [t in s for t, s in zip(yq, sets, strict=True)]
                sizes += [len(s) for s in sets]
            c, h, n = np.concatenate(conf), np.concatenate(hits), np.array(sizes)
            row = {
                "method": name,
                "shots": shots,
                "accuracy": float(h.mean()),
                "ece_episode": float(np.mean(eces)),
                "ece_pooled": expected_calibration_error(c, h),
                "confidence": float(c.mean()),
                "coverage": float(np.mean(cover)),
                "set_size": float(n.mean()),
                "empty": float((n == 0).mean()),
            }
            out.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
