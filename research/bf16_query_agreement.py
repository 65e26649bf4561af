"""Check (not a test): would a bf16 matmul on CALM's query path change predictions?

torch's CPU matmul of bf16 tensors returns bf16 (there is no float32-output bf16 matmul on CPU), so
the similarities themselves are rounded to 8 significant bits before exp(s / tau_p). This script
fits CALM (float32 query path, the default) on random 5-shot episodes of real feature stores and
counts the queries whose prediction changes when the query similarities come from
  bf16:  the plain bf16 matmul of the unit features and unit centroids, or
  bf16c: the float32 product with the mean unit centroid of each head plus the bf16 matmul of the
         centroids' (smaller) deviations from it, which keeps more of the similarities' bits.
The acceptance bar for a bf16 query path (issue 11) is at most 0.1 % of predictions changed on each
of the three shared datasets.

    python research/bf16_query_agreement.py runs/esc10-auto/features runs/speech-auto/features \
        runs/fsdd-auto/features
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import calm
from calm import _heads as H
from calm.store.reader import load_features


def scores(clf: calm.CALM, Xq: np.ndarray, mode: str) -> torch.Tensor:
    """Eq. 13 scores (n, C) with the similarities computed in float32, bf16 or bf16c."""
    unit = H.l2_normalize(torch.from_numpy(clf.centroids_).float()).permute(1, 2, 0)  # (K, d, C)
    w = torch.from_numpy(clf.weights_).float().T  # (K, C)
    x = H.l2_normalize(torch.from_numpy(np.asarray(Xq, dtype=np.float32))).transpose(0, 1)  # (K, n, d)
    if mode == "f32":
        s = torch.matmul(x, unit)
    elif mode == "bf16":
        s = torch.matmul(x.bfloat16(), unit.bfloat16()).float()
    else:
        mean = unit.mean(dim=-1, keepdim=True)  # (K, d, 1)
        s = torch.matmul(x, mean) + torch.matmul(x.bfloat16(), (unit - mean).bfloat16()).float()
    return (torch.softmax(s / clf.tau_p, dim=-1) * w[:, None, :]).sum(dim=0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=5)
    args = ap.parse_args(argv)
    for store in args.stores:
        X, y, meta = load_features(store, mmap=False)
        classes = np.unique(y)
        changed, n = {"bf16": 0, "bf16c": 0}, 0
        for seed in range(args.episodes):
            rng = np.random.default_rng(seed)
            sup = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: args.shots] for c in classes])
            q = np.setdiff1d(np.arange(len(y)), sup)
            clf = calm.CALM(k=0.4).fit(X[sup], y[sup])  # k of the README's figures (CALM()'s default then)
            ref = clf.predict(X[q])
            same = clf.classes_[scores(clf, X[q], "f32").argmax(dim=1).numpy()] == ref
            assert same.mean() > 0.999, "the float32 re-computation should match predict"
            for mode in changed:
                changed[mode] += int(
                    (clf.classes_[scores(clf, X[q], mode).argmax(dim=1).numpy()] != ref).sum()
                )
            n += len(q)
        shown = ", ".join(f"{m}: {c} changed ({100 * c / n:.3f} %)" for m, c in changed.items())
        print(
            f"{store}: {X.shape} stored {meta.attrs['dtype']}, {n} queries over {args.episodes} "
            f"episodes; {shown}"
        )


if __name__ == "__main__":
    main()
