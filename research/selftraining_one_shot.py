"""Can self-training be made safe at 1 shot (and at 5) on EmoDB? (issue 24, the guard's open rows)

Never touches a test clip: the validation splits of research/selftraining_guard.py (ESC-10 fold 4,
FSDD takes 5-9, 2 of each speech word's training clips, EmoDB the training speakers 10 and 13 as
queries; support and pool from the rest of each training part). For each (dataset, shots, seed) it
records, around the default CALM (`calm.methods`):

- ``val``: validation accuracy after 0..5 rounds of the default schedule with the guard off;
- ``pseudo_acc``: share of the pseudo-labels right after each round (hidden labels; never a rule);
- support-free estimates computed before any round, on the drawn pool (``pool_per_class`` * C clips,
  `SelfTraining._draw`): ``skew`` (most predicted class's count over the mean count), ``entropy``
  (entropy of the predicted class counts / log C), ``starved`` (share of classes predicted fewer
  than ``per_round`` times), ``top_proba`` (mean calibrated top probability over the pool),
  ``pick_proba`` (the same over round 1's picks), ``agree2`` / ``agree3`` (share of the pool on which
  SAV and CALM / SAV, CALM and CALM-global agree), ``agree_picks`` / ``agree_global_picks`` /
  ``agree_probe_picks`` (SAV / CALM-global / the linear probe agrees with CALM on round 1's picks),
  ``agree_on_sav_picks`` (CALM agrees with SAV on the picks SAV's own margins would make),
  ``picks_share`` (round 1's picks over the drawn pool), ``loco_*`` (`loco`: leave-one-class-out,
  how often a held-out class's labelled clip would be picked by another class); and, from the
  hidden labels as a diagnostic only, ``calm_picks_right`` / ``sav_picks_right`` (share of round 1's
  picks right when CALM's / SAV's margins rank them);
- ``variants``: validation accuracy of pick rules with the guard off: ``agree2`` / ``agree3`` (only
  pool clips on which the labelled-only SAV and CALM (and CALM-global) agree may be picked),
  ``per_round=2``, ``labelled_weight=5``, ``picks by sav`` / ``picks by min-rank`` (`Picker`: CALM
  fitted every round, the picks ranked by SAV's margins, or among the clips where SAV and CALM agree
  by the smaller of their two margins' rank shares);
- ``hcv`` (2 shots or more): the guard's honest cross-validated accuracy after 0..5 rounds
  (`calm.selftraining.stopping.cv_curve`, what ``guard="cv"`` computes) and ``n_held`` (held-out
  clips), for stricter acceptance rules.

``--only estimates`` / ``--only pickers`` record only those (fast); ``--report`` merges files by
episode and prints per dataset and shots the estimates' per-episode distributions, the pick-rule
variants, and the mean validation difference (against CALM and against the unguarded schedule) of
each stopping / acceptance rule.

    S="--store esc10=/work/research/esc10-features --store fsdd=/work/research/fsdd-features \
       --store speech_commands=/work/research/speech-features --store emodb=/work/research/emodb-features"
    nice -n 10 python research/selftraining_one_shot.py --seeds 10 --shots 1,5 $S --out runs/st_one_shot.json
    python research/selftraining_one_shot.py --report runs/st_one_shot.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from selftraining_guard import _FITTED, base, honest_cv, recording, split  # noqa: E402
from selftraining_schedule import draw_support  # noqa: E402
from sklearn.base import BaseEstimator  # noqa: E402

from calm import load_features  # noqa: E402
from calm.selftraining import SelfTraining, balanced_picks, confidence_scores  # noqa: E402


class Filtered(SelfTraining):
    """SelfTraining whose picks are restricted to the drawn pool rows in ``mask`` (research only)."""

    mask: np.ndarray | None = None

    def _picks(self, X_lab, y_lab, X_pool, pred, conf, quota, eligible, pseudo, p_cls):
        if self.mask is not None and len(self.mask) == len(pred):
            eligible = eligible & self.mask
        return super()._picks(X_lab, y_lab, X_pool, pred, conf, quota, eligible, pseudo, p_cls)


def _margin_share(s: np.ndarray) -> np.ndarray:
    """Each row's top-minus-runner-up score as its rank share in the pool (0 lowest, 1 highest)."""
    t = np.sort(s, axis=1)
    return np.argsort(np.argsort(t[:, -1] - t[:, -2])) / max(1, len(s) - 1)


class Picker(BaseEstimator):
    """CALM (``predict``, ``predict_proba``: the default CALM fitted on the same clips) whose
    ``decision_function``, which ranks the pool clips a round may pick, comes from ``picker``:
    "sav": SAV's scores; "min-rank": the pool clips on which SAV and CALM predict the same class,
    ranked by the smaller of their two margins' rank shares (the others last). Records its fits."""

    def __init__(self, picker: str = "sav"):
        self.picker = picker

    def fit(self, X, y):
        self.calm_ = base().fit(X, y)
        self.sav_ = base("sav").fit(X, y)
        self.classes_ = self.calm_.classes_
        _FITTED.append(self)
        return self

    def predict(self, X):
        return self.calm_.predict(X)

    def predict_proba(self, X):
        return self.calm_.predict_proba(X)

    def decision_function(self, X):
        s = np.asarray(self.sav_.decision_function(X), dtype=np.float64)
        if self.picker == "sav":
            return s
        c = np.asarray(self.calm_.decision_function(X), dtype=np.float64)
        pc, ps = np.argmax(c, axis=1), np.argmax(s, axis=1)
        out = np.zeros_like(c)
        both = np.minimum(_margin_share(c), _margin_share(s))
        out[np.arange(len(c)), pc] = np.where(pc == ps, 1.0 + both, 1e-6)
        return out


def estimates(Xs, ys, Xd, yd) -> tuple[dict, dict]:
    """Support-free estimates on the drawn pool ``Xd`` and the agreement masks; ``yd`` (the pool's
    hidden labels) only for the diagnostics ``calm_picks_right`` / ``sav_picks_right``."""
    calm = base().fit(Xs, ys)
    others = {n: base(n).fit(Xs, ys).predict(Xd) for n in ("sav", "calm-global", "linear-probe")}
    C = len(calm.classes_)
    per_round = SelfTraining().per_round
    pred, conf = confidence_scores(calm, Xd, "margin")
    proba = calm.predict_proba(Xd)
    counts = np.bincount(pred, minlength=C)
    p = counts / counts.sum()
    ent = float(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(C))
    quota, every = np.full(C, per_round), np.ones(len(pred), bool)
    picks = balanced_picks(pred, conf, quota, every)
    s_pred, s_conf = confidence_scores(base("sav").fit(Xs, ys), Xd, "margin")
    s_picks = balanced_picks(s_pred, s_conf, quota, every)
    p_cal = calm.predict(Xd)
    a2 = p_cal == others["sav"]
    a3 = a2 & (p_cal == others["calm-global"])
    est = {
        "skew": float(counts.max() / counts.mean()),
        "entropy": ent,
        "starved": float(np.mean(counts < per_round)),
        "top_proba": float(proba.max(axis=1).mean()),
        "pick_proba": float(proba[picks].max(axis=1).mean()),
        "agree2": float(a2.mean()),
        "agree3": float(a3.mean()),
        "agree_picks": float(a2[picks].mean()),
        "agree_global_picks": float(np.mean((p_cal == others["calm-global"])[picks])),
        "agree_probe_picks": float(np.mean((p_cal == others["linear-probe"])[picks])),
        "agree_on_sav_picks": float(a2[s_picks].mean()),
        "picks_share": float(len(picks) / len(Xd)),
        "calm_picks_right": float(np.mean(calm.classes_[pred[picks]] == yd[picks])),
        "sav_picks_right": float(np.mean(calm.classes_[s_pred[s_picks]] == yd[s_picks])),
        **loco(Xs, ys, Xd, per_round, SelfTraining().rounds),
    }
    return est, {"agree2": a2, "agree3": a3}


def loco(Xs, ys, Xd, per_round: int, rounds: int) -> dict:
    """Leave-one-class-out picks: for each class, CALM fitted on the other classes' labelled clips
    ranks the held-out class's labelled clips among the drawn pool by margin within their predicted
    class; a held-out clip ranked inside a class's first ``per_round`` (``per_round * rounds``) would
    be picked in round 1 (by the end), and every such pick is wrong by construction."""
    m = len(Xd)
    first, last, pct = [], [], []
    for c in np.unique(ys):
        keep = ys != c
        est = base().fit(Xs[keep], ys[keep])
        pred, conf = confidence_scores(est, np.concatenate([Xd, Xs[~keep]]), "margin")
        for h in range(m, len(pred)):
            rows = np.flatnonzero(pred[:m] == pred[h])
            rank = int(np.sum(conf[rows] > conf[h]))
            first.append(rank < per_round)
            last.append(rank < per_round * rounds)
            pct.append(rank / max(1, len(rows)))
    return {
        "loco_first": float(np.mean(first)),
        "loco_all": float(np.mean(last)),
        "loco_rank": float(np.median(pct)),
    }


def val_curve(st: SelfTraining, Xs, ys, Xpool, Xv, yv) -> list[float]:
    _FITTED.clear()
    st.fit(Xs, ys, Xpool)
    return [float(np.mean(f.predict(Xv) == yv)) for f in _FITTED]


def picker_variants(Xs, ys, Xpool, Xv, yv, seed: int) -> dict:
    """Validation curves of the schedule with the picks ranked by `Picker` (guard off)."""
    return {
        f"picks by {p}": val_curve(
            SelfTraining(Picker(p), random_state=seed, guard=None), Xs, ys, Xpool, Xv, yv
        )
        for p in ("sav", "min-rank")
    }


def episode(X, y, sup, pool, Xv, yv, shots: int, seed: int, only: str = "") -> dict:
    Xs, ys, Xpool = X[sup], y[sup], X[pool]
    C = len(np.unique(ys))
    st = SelfTraining(recording(), random_state=seed, guard=None)
    drawn = st._draw(len(pool), C)
    if only == "pickers":
        return {"variants": picker_variants(Xs, ys, Xpool, Xv, yv, seed)}
    est, masks = estimates(Xs, ys, X[pool[drawn]], y[pool[drawn]])
    if only == "estimates":
        return est
    rec: dict = {"val": val_curve(st, Xs, ys, Xpool, Xv, yv), **est}
    plab, pround = st.pseudo_labels_.astype(str), st.pseudo_round_
    truth = y[pool[st.pseudo_index_]]
    rec["pseudo_acc"] = [float(np.mean((plab == truth)[pround <= r])) for r in range(1, st.n_rounds_ + 1)]
    rec["variants"] = {}
    for name, mask in masks.items():
        f = Filtered(recording(), random_state=seed, guard=None)
        f.mask = mask
        rec["variants"][name] = val_curve(f, Xs, ys, Xpool, Xv, yv)
    for name, kw in {"per_round=2": {"per_round": 2}, "labelled_weight=5": {"labelled_weight": 5}}.items():
        v = SelfTraining(recording(), random_state=seed, guard=None, **kw)
        rec["variants"][name] = val_curve(v, Xs, ys, Xpool, Xv, yv)
    rec["variants"].update(picker_variants(Xs, ys, Xpool, Xv, yv, seed))
    if shots >= 2:
        rec["hcv"] = honest_cv(Xs, ys, Xpool, seed)
        rec["n_held"] = int(sum(min(shots, 5) for _ in np.unique(ys)))
    return rec


def run(name: str, store: str, shots_list: list[int], seeds: list[int], only: str = "") -> list[dict]:
    X, y, meta = load_features(store, mmap=False)
    X, y = np.asarray(X, dtype=np.float32), np.asarray(y).astype(str)
    train, val = split(name, y, meta)
    out = []
    for shots in shots_list:
        if name == "speech_commands" and shots == 5:
            shots = 3  # 5 training clips a word at most after the validation cut
        for seed in seeds:
            sup = draw_support(y, train, shots, seed)
            pool = np.setdiff1d(train, sup)
            rec = episode(X, y, sup, pool, X[val], y[val], shots, seed, only)
            out.append({"dataset": name, "shots": shots, "seed": seed, **rec})
            print(name, shots, seed, rec.get("val", [None])[-1], flush=True)
    return out


ESTIMATES = (
    "skew",
    "entropy",
    "starved",
    "top_proba",
    "pick_proba",
    "agree2",
    "agree3",
    "agree_picks",
    "agree_global_picks",
    "agree_probe_picks",
    "agree_on_sav_picks",
    "picks_share",
    "calm_picks_right",
    "sav_picks_right",
    "loco_first",
    "loco_all",
    "loco_rank",
)

RULES_1 = {  # 1 shot: rule -> rounds kept (all or none), from the support-free estimates
    "none (all rounds)": lambda r: True,
    "skew <= 2": lambda r: r["skew"] <= 2.0,
    "entropy >= 0.9": lambda r: r["entropy"] >= 0.9,
    "starved == 0": lambda r: r["starved"] == 0,
    "agree3 >= 0.4": lambda r: r["agree3"] >= 0.4,
    "agree_picks >= 0.85": lambda r: r["agree_picks"] >= 0.85,
    "agree_picks >= 0.78": lambda r: r["agree_picks"] >= 0.78,
    "agree_picks >= 0.78 or picks_share > 0.5": lambda r: r["agree_picks"] >= 0.78 or r["picks_share"] > 0.5,
    "loco_all <= 0.5": lambda r: r["loco_all"] <= 0.5,
}


def _hcv_rule(margin_clips: float):
    def ok(r):
        c = r.get("hcv")
        return True if c is None else c[-1] >= c[0] + margin_clips / r["n_held"] - 1e-9

    return ok


RULES_5 = {
    "guard today: last >= round 0": _hcv_rule(0),
    "last >= round 0 + 1 clip": _hcv_rule(1),
    "last >= round 0 + 2 clips": _hcv_rule(2),
    "every round >= the previous": lambda r: (
        r.get("hcv") is None or all(b >= a for a, b in zip(r["hcv"], r["hcv"][1:], strict=False))
    ),
    "every round >= round 0, last > round 0": lambda r: (
        r.get("hcv") is None or (min(r["hcv"][1:]) >= r["hcv"][0] and r["hcv"][-1] > r["hcv"][0])
    ),
}


def report(rows: list[dict]) -> None:
    merged: dict[tuple, dict] = {}  # an --estimates-only file updates the episodes of a full run
    for r in rows:
        m = merged.setdefault((r["dataset"], r["shots"], r["seed"]), {})
        variants = {**m.get("variants", {}), **r.get("variants", {})}
        m.update(r)
        m["variants"] = variants
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in merged.values():
        if "val" in r:
            groups.setdefault((r["dataset"], r["shots"]), []).append(r)
    print("per-episode estimates (min / median / max) and ST - CALM on validation (points):")
    for (d, s), recs in groups.items():
        gain = [100 * (r["val"][-1] - r["val"][0]) for r in recs]
        print(f"{d} {s}: ST-CALM mean {np.mean(gain):+.1f}, per episode {[round(g, 1) for g in gain]}")
        print(f"   pseudo-label accuracy after round 1: {np.mean([r['pseudo_acc'][0] for r in recs]):.2f}")
        for k in [k for k in ESTIMATES if all(k in r for r in recs)]:
            v = np.array([r[k] for r in recs])
            print(f"   {k:11s} {v.min():.2f} / {np.median(v):.2f} / {v.max():.2f}  {np.round(v, 2).tolist()}")
    print("\n| variant (guard off) | " + " | ".join(f"{d} {s}" for d, s in groups) + " |")
    print("|---|" + "---|" * len(groups))
    names = ["schedule"] + list(next(iter(groups.values()))[0]["variants"]) + [f"rounds={k}" for k in (1, 2)]
    for n in names:
        cells = []
        for recs in groups.values():
            if n == "schedule":
                v = [r["val"][-1] for r in recs]
            elif n.startswith("rounds="):
                v = [r["val"][min(int(n[7:]), len(r["val"]) - 1)] for r in recs]
            elif all(n in r["variants"] for r in recs):
                v = [r["variants"][n][-1] for r in recs]
            else:
                cells.append("-")
                continue
            cells.append(f"{100 * np.mean(np.array(v) - [r['val'][0] for r in recs]):+.1f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    for title, rules in (("1-shot stops", RULES_1), ("acceptance rules", RULES_5)):
        print(f"\n{title}: mean validation difference vs CALM / vs the unguarded schedule (episodes stopped)")
        print("| rule | " + " | ".join(f"{d} {s}" for d, s in groups) + " |")
        print("|---|" + "---|" * len(groups))
        for name, ok in rules.items():
            cells = []
            for recs in groups.values():
                try:
                    kept = [len(r["val"]) - 1 if ok(r) else 0 for r in recs]
                except KeyError:  # an estimate these episodes do not hold
                    cells.append("-")
                    continue
                d0 = np.mean([100 * (r["val"][k] - r["val"][0]) for r, k in zip(recs, kept, strict=True)])
                dst = np.mean([100 * (r["val"][k] - r["val"][-1]) for r, k in zip(recs, kept, strict=True)])
                cells.append(f"{d0:+.1f} / {dst:+.1f} ({sum(k == 0 for k in kept)})")
            print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--shots", default="1,5")
    p.add_argument("--store", action="append", default=[])
    p.add_argument("--datasets", default="")
    p.add_argument("--out", default="runs/st_one_shot.json")
    p.add_argument("--report", nargs="*")
    p.add_argument("--only", choices=("estimates", "pickers"), default="", help="record only these")
    a = p.parse_args()
    if a.report:
        report([r for f in a.report for r in json.loads(Path(f).read_text())])
        return
    stores = dict(s.split("=", 1) for s in a.store)
    names = a.datasets.split(",") if a.datasets else list(stores)
    shots = [int(s) for s in a.shots.split(",")]
    rows = []
    for n in names:
        rows += run(n, stores[n], shots, list(range(a.seeds)), a.only)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
