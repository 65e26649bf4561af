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
- ``agree``: share of the drawn pool on which SAV and CALM (labelled only) agree;
- ``hcv``: the guard's honest estimate (`calm.selftraining.stopping`): per fold of the support set the
  whole self-training re-run without the fold's clips, which are then scored after every round
  (2 shots or more; ``--honest`` only, it costs about 5 self-training fits).

``--report`` prints, per rule, the mean validation difference against CALM and against today's
self-training (all rounds) per dataset and shots, and how many episodes stopped at round 0.
``--pairs CV_RUN NONE_RUN`` prints the paired test-part table of two `calm evaluate` runs (guard on,
guard off; the guard-off run may leave out 1 shot, where the guard cannot judge and both are equal).

    nice -n 10 python research/selftraining_guard.py --seeds 10 --out runs/st_guard.json \
        --store esc10=/work/research/esc10-features --store fsdd=/work/research/fsdd-features \
        --store speech_commands=/work/research/speech-features --store emodb=/work/research/emodb-features
    python research/selftraining_guard.py --report runs/st_guard.json
    python research/selftraining_guard.py --pairs /tmp/st-runs/emodb-cv /tmp/st-runs/emodb-none
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


def honest_cv(Xs, ys, Xpool, seed: int) -> list[float] | None:
    """`calm.selftraining.stopping.cv_curve` of the default schedule (what ``guard="cv"`` computes)."""
    from calm.selftraining.stopping import cv_curve

    def run(train, rounds):
        _FITTED.clear()
        SelfTraining(recording(), rounds=rounds, random_state=seed, guard=None).fit(
            Xs[train], ys[train], Xpool
        )
        return [f.predict(Xs[~train]) for f in _FITTED]

    return cv_curve(ys, SelfTraining().rounds, run)


def episode(X, y, sup, pool, Xv, yv, shots, seed, honest=False) -> dict:
    Xs, ys = X[sup], y[sup]
    _FITTED.clear()
    t0 = time.perf_counter()
    st = SelfTraining(recording(), random_state=seed, guard=None).fit(Xs, ys, X[pool])
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
    if honest:
        t0 = time.perf_counter()
        rec["hcv"] = honest_cv(Xs, ys, X[pool], seed)
        rec["t_hcv"] = time.perf_counter() - t0
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


def run(name: str, store: str, seeds: list[int], honest: bool) -> list[dict]:
    X, y, meta = load_features(store, mmap=False)
    X, y = np.asarray(X, dtype=np.float32), np.asarray(y).astype(str)
    train, val = split(name, y, meta)
    out = []
    for shots in SHOTS[name]:
        for seed in seeds:
            sup = draw_support(y, train, shots, seed)
            pool = np.setdiff1d(train, sup)
            rec = episode(X, y, sup, pool, X[val], y[val], shots, seed, honest)
            out.append({"dataset": name, "shots": shots, "seed": seed, **rec})
            print(name, shots, seed, [round(v, 3) for v in rec["val"]], flush=True)
    return out


def _stop(rec: dict, ok) -> int:
    """Rounds kept by a per-round rule: up to the round before the first that fails."""
    r = 0
    for i, rd in enumerate(rec["rounds"]):
        if not ok(rec, rd):
            break
        r = i + 1
    return r


def _rev_rule(rec, rd):
    return rd["rev"] >= (rec["cv0"] - 0.05 if rec["cv0"] is not None else 0.5)


def _hcv(rule):
    def choose(rec):
        c = rec.get("hcv")
        return len(rec["val"]) - 1 if c is None else min(rule(c), len(rec["val"]) - 1)

    return choose


RULES = {  # rule -> rounds kept for an episode record
    "none (today: all rounds)": lambda rec: len(rec["val"]) - 1,
    "rev >= cv0 - 0.05 (1 shot: rev >= 0.5)": lambda rec: _stop(rec, _rev_rule),
    "cv with pseudo-labels >= cv0": lambda rec: _stop(
        rec, lambda e, rd: e["cv0"] is None or rd["cv"] >= e["cv0"]
    ),
    "conf >= 0.5": lambda rec: _stop(rec, lambda e, rd: rd["conf"] is not None and rd["conf"] >= 0.5),
    "agree >= 0.5 (all or none)": lambda rec: len(rec["val"]) - 1 if rec["agree"] >= 0.5 else 0,
    "hcv: up to the first round below round 0": _hcv(
        lambda c: next((r - 1 for r in range(1, len(c)) if c[r] < c[0]), len(c) - 1)
    ),
    "hcv: best round (ties: more rounds)": _hcv(lambda c: max(i for i, v in enumerate(c) if v == max(c))),
    "hcv: last round >= round 0": _hcv(lambda c: max(i for i, v in enumerate(c) if v >= c[0])),
    "hcv: all if last >= round 0, else none (chosen)": _hcv(lambda c: len(c) - 1 if c[-1] >= c[0] else 0),
}


def report(rows: list[dict]) -> None:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["shots"]), []).append(r)
    print("| rule | " + " | ".join(f"{d} {s}" for d, s in groups) + " |")
    print("|---|" + "---|" * len(groups))
    for name, rule in RULES.items():
        cells = []
        for recs in groups.values():
            kept = [rule(rec) for rec in recs]
            d0 = np.mean([100 * (rec["val"][k] - rec["val"][0]) for rec, k in zip(recs, kept, strict=True)])
            dst = np.mean([100 * (rec["val"][k] - rec["val"][-1]) for rec, k in zip(recs, kept, strict=True)])
            cells.append(f"{d0:+.1f} / {dst:+.1f} ({sum(k == 0 for k in kept)})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for (d, s), recs in groups.items():
        ratio = [(r["t_st"] + r["t_hcv"]) / r["t_st"] for r in recs if "t_hcv" in r]
        print(d, s, "fit time with the guard / without:", f"{np.mean(ratio):.1f}" if ratio else "-")


def _ci(d: np.ndarray) -> str:
    from scipy import stats

    h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    return f"{d.mean():+.2f} [{d.mean() - h:+.2f}, {d.mean() + h:+.2f}]"


def pairs(cv_dir: str, none_dir: str) -> None:
    """Paired test-part table: CALM+ST - CALM, CALM+ST - CALM+ST (guard off), the same for SAV."""
    cv = json.loads((Path(cv_dir) / "results.json").read_text())["runs"]
    off = json.loads((Path(none_dir) / "results.json").read_text())["runs"]
    acc = {(r["method"], r["shots"], r["seed"]): r for r in cv if r.get("part")}
    acc_off = {(r["method"], r["shots"], r["seed"]): r for r in off if r.get("part")}
    shots, seeds = sorted({k[1] for k in acc}), sorted({k[2] for k in acc})
    for base in ("calm", "sav"):
        st = base + "+st"
        if (base, shots[0], seeds[0]) not in acc:
            continue
        print(f"| shots | {base} | {st} | {st} - {base} | {st} - {st} (guard off) | stopped | time ratio |")
        for s in shots:
            a = np.array([acc[(base, s, e)]["metrics"]["accuracy"] for e in seeds])
            g = [acc[(st, s, e)] for e in seeds]
            b = np.array([r["metrics"]["accuracy"] for r in g])
            same = all(not r["self_training"]["guard"]["estimable"] for r in g)
            o_runs = [acc_off.get((st, s, e)) for e in seeds]
            if all(o is not None for o in o_runs):
                o = np.array([r["metrics"]["accuracy"] for r in o_runs])
                ratio = np.mean([r["seconds"] for r in g]) / np.mean([r["seconds"] for r in o_runs])
            else:
                assert same, f"{st} {s} shots: no guard-off run and the guard could judge"
                o, ratio = b, 1.0
            stopped = sum(r["self_training"]["rounds"] == 0 for r in g)
            print(
                f"| {s} | {a.mean():.2f} | {b.mean():.2f} | {_ci(b - a)} | {_ci(b - o)} "
                f"| {stopped} of {len(g)} | {ratio:.1f} |"
            )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--store", action="append", default=[])
    p.add_argument("--datasets", default="")
    p.add_argument("--out", default="runs/st_guard.json")
    p.add_argument("--honest", action="store_true")
    p.add_argument("--report", nargs="*")
    p.add_argument("--pairs", nargs=2)
    a = p.parse_args()
    if a.report:
        report([r for f in a.report for r in json.loads(Path(f).read_text())])
        return
    if a.pairs:
        pairs(*a.pairs)
        return
    stores = dict(s.split("=", 1) for s in a.store)
    names = a.datasets.split(",") if a.datasets else list(stores)
    rows = []
    for n in names:
        rows += run(n, stores[n], list(range(a.seeds)), a.honest)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
