"""Which pool clips self-training picks on FSDD's validation split: how typical they are of their class
and how many come from speakers the support set already holds (docs/results.md "Self-training,
schedule revised", section 3). Validation split and support draws as in selftraining_schedule.py.

    nice -n 10 python research/selftraining_nearness.py --store runs/fsdd-auto/features   # ~1 min

Per shots, mean over seeds 100-119: the similarity percentile of the pseudo-labelled clips (mean over
heads of the cosine to the labelled clips' mean of the clip's TRUE class, ranked within that class's
pool clips; 50 = a random clip) and the share of them whose (digit, speaker) pair is in the support
set, for the old schedule (3 rounds, weight 1, whole pool) and the default; "pool" = that share over
the whole pool.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from selftraining_schedule import CALM_PARAMS, draw_support, validation_split

from calm import CALM, load_features
from calm.selftraining import SelfTraining, class_similarity


def percentiles(near: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Each row's rank of ``near`` within its class, as a fraction in (0, 1)."""
    out = np.zeros(len(near))
    for c in np.unique(cls):
        rows = np.flatnonzero(cls == c)
        out[rows] = (np.argsort(np.argsort(near[rows])) + 0.5) / len(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="runs/fsdd-auto/features")
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    X, y, meta = load_features(args.store, mmap=False)
    y, X = np.asarray(y).astype(str), np.asarray(X, dtype=np.float32)
    speaker = meta["speaker"].astype(str).to_numpy()
    train, _ = validation_split("fsdd", y, meta)
    classes = np.unique(y)
    print(
        "| shots | old: percentile | old: same speaker | default: percentile | default: same speaker | pool |"
    )
    print("|---|---|---|---|---|---|")
    for shots in (1, 5, 10):
        got: dict[str, list[float]] = {"old": [], "old_spk": [], "new": [], "new_spk": [], "pool": []}
        for seed in range(100, 100 + args.seeds):
            sup = draw_support(y, train, shots, seed)
            pool = np.setdiff1d(train, sup)
            true = np.searchsorted(classes, y[pool])
            near = class_similarity(X[pool], X[sup], np.searchsorted(classes, y[sup]), true, len(classes))
            pct = percentiles(near, true)
            known = {(y[i], speaker[i]) for i in sup}
            same = np.array([(y[i], speaker[i]) in known for i in pool])
            got["pool"].append(same.mean())
            old = SelfTraining(CALM(**CALM_PARAMS), rounds=3, labelled_weight=1, pool_per_class=None)
            for name, st in (("old", old), ("new", SelfTraining(CALM(**CALM_PARAMS), random_state=seed))):
                st.fit(X[sup], y[sup], X[pool])
                got[name].append(pct[st.pseudo_index_].mean())
                got[name + "_spk"].append(same[st.pseudo_index_].mean())
        m = {k: 100 * float(np.mean(v)) for k, v in got.items()}
        print(
            f"| {shots} | {m['old']:.1f} | {m['old_spk']:.1f} % | {m['new']:.1f} | {m['new_spk']:.1f} % "
            f"| {m['pool']:.1f} % |"
        )


if __name__ == "__main__":
    main()
