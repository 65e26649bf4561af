"""Which estimate, from the support set alone, says whether a self-training round helps? (issue 24)

Never touches a test clip. Validation splits inside the training parts (the test part is dropped):
ESC-10 fold 4, FSDD takes 5-9 and 2 of each speech word's training clips as validation queries (as
research/selftraining_schedule.py), EmoDB the training speakers 10 and 13 as validation queries
(support + pool from speakers 09, 12, 15, 16). For each (dataset, shots, seed) `SelfTraining` with
its default schedule around the default CALM (`calm.methods`) runs with the guard off; after every
round r it records the validation accuracy and the candidate estimates:

- ``rev``: reverse validation: the base method fitted on the round's pseudo-labelled clips ALONE,
  scored on the labelled support clips (works at 1 shot);
- ``cv`` / ``cv0``: leave-one-shot-out accuracy of the support clips (fold j leaves out the j-th clip
  of every class, at most 5 folds; 2 shots or more) with / without the pseudo-labelled clips;
- ``conf``: the mean top ``predict_proba`` of the clips picked in the round (by the estimator that
  picked them);
- ``agree``: share of the drawn pool on which SAV and CALM (labelled only) agree.

    nice -n 10 python research/selftraining_guard.py --seeds 10 --out runs/st_guard.json \
        --store esc10=/work/research/esc10-features --store fsdd=/work/research/fsdd-features \
        --store speech_commands=/work/research/speech-features --store emodb=/work/research/emodb-features
    python research/selftraining_guard.py --report runs/st_guard.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from selftraining_schedule import draw_support, validation_split  # noqa: E402

from calm import load_features  # noqa: E402
from calm import methods as registry  # noqa: E402
from calm.selftraining import SelfTraining  # noqa: E402

SHOTS = {"esc10": (1, 5, 10), "fsdd": (1, 5, 10), "speech_commands": (1, 3), "emodb": (1, 5, 10)}
EMODB_VALIDATION = ("10", "13")
_FITTED: list = []


def base(name: str = "calm"):
    return registry.build(name, registry.info(name).defaults())


def recording(name: str = "calm"):
    cls = type(base(name))

    class Recording(cls):  # type: ignore[misc, valid-type]
        def fit(self, X, y):
            super().fit(X, y)
            _FITTED.append(self)
            return self

    Recording.__name__ = cls.__name__
    return Recording(**base(name).get_params())


def split(name: str, y: np.ndarray, meta) -> tuple[np.ndarray, np.ndarray]:
    if name != "emodb":
        return validation_split(name, y, meta)
    train = meta["split"].astype(str).to_numpy() == "train"
    val = meta["speaker"].astype(str).isin(EMODB_VALIDATION).to_numpy()
    return np.flatnonzero(train & ~val), np.flatnonzero(train & val)


def fold_acc(Xs, ys, shots: int, Xp=None, yp=None) -> float | None:
    """Leave-one-shot-out accuracy of the support clips (labelled clips weighted as `SelfTraining`)."""
    if shots < 2:
        return None
    classes = np.unique(ys)
    pos = np.zeros(len(ys), dtype=np.int64)
    for c in classes:
        pos[ys == c] = np.arange(np.sum(ys == c))
    hits = []
    for j in range(min(shots, 5)):
        out = pos == j
        rep = shots - 1
        Xt = [np.repeat(Xs[~out], rep, axis=0)] + ([Xp] if Xp is not None and len(Xp) else [])
        yt = [np.repeat(ys[~out], rep)] + ([yp] if yp is not None and len(yp) else [])
        est = base().fit(np.concatenate(Xt), np.concatenate(yt))
        hits.append(est.predict(Xs[out]) == ys[out])
    return float(np.mean(np.concatenate(hits)))


def episode(X, y, sup, pool, Xv, yv, shots, seed) -> dict:
    Xs, ys = X[sup], y[sup]
    _FITTED.clear()
    t0 = time.perf_counter()
    st = SelfTraining(recording(), random_state=seed).fit(Xs, ys, X[pool])
    t_st = time.perf_counter() - t0
    fitted = list(_FITTED)
    drawn = pool[st.pool_index_]
    pidx, plab, pround = pool[st.pseudo_index_], st.pseudo_labels_.astype(str), st.pseudo_round_
    t0 = time.perf_counter()
    base().fit(Xs, ys)
    t_base = time.perf_counter() - t0
    sav = base("sav").fit(Xs, ys).predict(X[drawn])
    rec = {
        "val": [float(np.mean(f.predict(Xv) == yv)) for f in fitted],
        "cv0": fold_acc(Xs, ys, shots),
        "agree": float(np.mean(sav == fitted[0].predict(X[drawn]))),
        "t_st": t_st,
        "t_base": t_base,
        "rounds": [],
    }
    for r in range(1, len(fitted)):
        inset = pround <= r
        new = pround == r
        t0 = time.perf_counter()
        rev_est = base().fit(X[pidx[inset]], plab[inset])
        rev = float(np.mean(rev_est.predict(Xs) == ys))
        t_rev = time.perf_counter() - t0
        t0 = time.perf_counter()
        cv = fold_acc(Xs, ys, shots, X[pidx[inset]], plab[inset])
        t_cv = time.perf_counter() - t0
        proba = fitted[r - 1].predict_proba(X[pidx[new]]) if new.any() else np.zeros((0, 1))
        rec["rounds"].append(
            {
                "rev": rev,
                "cv": cv,
                "conf": float(proba.max(axis=1).mean()) if len(proba) else None,
                "pseudo_acc": float(np.mean(plab[inset] == y[pidx[inset]])),
                "t_rev": t_rev,
                "t_cv": t_cv,
            }
        )
    return rec


def run(name: str, store: str, seeds: list[int]) -> list[dict]:
    X, y, meta = load_features(store, mmap=False)
    X, y = np.asarray(X, dtype=np.float32), np.asarray(y).astype(str)
    train, val = split(name, y, meta)
    out = []
    for shots in SHOTS[name]:
        for seed in seeds:
            sup = draw_support(y, train, shots, seed)
            pool = np.setdiff1d(train, sup)
            rec = episode(X, y, sup, pool, X[val], y[val], shots, seed)
            out.append({"dataset": name, "shots": shots, "seed": seed, **rec})
            print(name, shots, seed, [round(v, 3) for v in rec["val"]], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--store", action="append", default=[])
    p.add_argument("--datasets", default="")
    p.add_argument("--out", default="runs/st_guard.json")
    p.add_argument("--report", nargs="*")
    a = p.parse_args()
    if a.report:
        return
    stores = dict(s.split("=", 1) for s in a.store)
    names = a.datasets.split(",") if a.datasets else list(stores)
    rows = []
    for n in names:
        rows += run(n, stores[n], list(range(a.seeds)))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
