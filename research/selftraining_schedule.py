"""Choose the self-training schedule (calm.selftraining) by paired measurements inside the TRAINING part.

Never touches a test clip. Validation splits (the test part of each dataset is dropped first):

- ESC-10: test fold 5 dropped; validation queries = fold 4; support + unlabelled pool = folds 1-3.
- FSDD: test takes 0-4 dropped; validation queries = takes 5-9; support + pool = takes 10-49.
- speech_commands_mini (no official split): the test part of `calm evaluate --holdout 0.3` (3 clips a
  word, `calm.evaluate.holdout_split`, seed 0) dropped; per word, 2 of the other 7 clips (seeded draw,
  seed 12345) are the validation queries; support + pool = the other 5 (so 1 and 3 shots only).

For each (dataset, shots, seed) the support set is drawn per class with a generator seeded by
(seed, class index); the pool is every other clip of the support part, labels hidden (`pool=N`
variants: N of them drawn with the seed). A variant's name spells out its schedule; what it does not
name is the pre-2026-12-02 schedule (labelled weight 1, no max_labelled, spread 1). Every
variant is compared with CALM (k = 25 %, tau_p 0.03, tau_w 0.5: `calm evaluate`'s defaults) on the
same support set and the same validation queries: mean per-seed difference with a 95 % t interval.

    nice -n 10 python research/selftraining_schedule.py --seeds 20 --datasets esc10 \
        --store esc10=runs/esc10-auto/features --out runs/st_esc10.json
    python research/selftraining_schedule.py --report runs/st_esc10.json   # markdown tables
    # --shots 2,3,4 for other shots, --variants "m=5 margin,m=5 margin w=shots" for a subset
"""

from __future__ import annotations

import argparse
import json
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from sklearn.base import BaseEstimator, ClassifierMixin

from calm import CALM, SAV, load_features
from calm._heads import class_centroids, cosine_similarities, head_posteriors, weighted_scores
from calm.evaluate import holdout_split
from calm.selftraining import SelfTraining

STORES = {  # default stores (`calm extract --model whisper-tiny.en`, default dtype); --store NAME=PATH
    "esc10": "runs/esc10-auto/features",
    "fsdd": "runs/fsdd-auto/features",
    "speech_commands": "runs/speech-auto/features",
}
SHOTS = {"esc10": (1, 5, 10), "fsdd": (1, 5, 10), "speech_commands": (1, 3)}
SPEECH_HOLDOUT = 0.3  # `calm evaluate --holdout` of the speech_commands_mini acceptance run
CALM_PARAMS = {"k": 0.25, "tau_p": 0.03, "tau_w": 0.5}
SAV_PARAMS = {"k": 0.25}


class FixedHeads(ClassifierMixin, BaseEstimator):
    """CALM scores (Eq. 13) with the head weights of the labelled-only fit kept fixed; ``fit`` only
    recomputes the centroids (Eq. 1). The "heads not re-selected" variant of the experiment."""

    def __init__(self, weights=None, tau_p: float = 0.03):
        self.weights = weights
        self.tau_p = tau_p

    def fit(self, X, y):
        self.classes_, idx = np.unique(np.asarray(y), return_inverse=True)
        self.centroids_ = class_centroids(np.asarray(X), idx, len(self.classes_))
        return self

    def decision_function(self, X) -> np.ndarray:
        p = head_posteriors(cosine_similarities(np.asarray(X), self.centroids_), self.tau_p)
        return weighted_scores(p, self.weights).numpy()

    def predict_proba(self, X) -> np.ndarray:
        s = self.decision_function(X)
        return s / s.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


def validation_split(name: str, y: np.ndarray, meta) -> tuple[np.ndarray, np.ndarray]:
    """(support+pool rows, validation query rows) inside the training part of ``name``."""
    n = len(y)
    if name == "esc10":
        fold = meta["fold"].astype(int).to_numpy()
        return np.flatnonzero(fold <= 3), np.flatnonzero(fold == 4)
    if name == "fsdd":
        take = np.array([int(re.search(r"_(\d+)\.wav$", p).group(1)) for p in meta["path"]])
        return np.flatnonzero(take >= 10), np.flatnonzero((take >= 5) & (take <= 9))
    train = (holdout_split(meta, y, SPEECH_HOLDOUT)["split"] == "train").to_numpy()
    rng = np.random.default_rng(12345)
    val = np.zeros(n, dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero((y == c) & train)
        val[rows[rng.permutation(len(rows))[:2]]] = True
    return np.flatnonzero(train & ~val), np.flatnonzero(val)


def draw_support(y: np.ndarray, train: np.ndarray, shots: int, seed: int) -> np.ndarray:
    classes = np.unique(y[train])
    out = []
    for ci, c in enumerate(classes):
        rows = train[y[train] == c]
        out.append(rows[np.random.default_rng([seed, ci]).permutation(len(rows))[:shots]])
    return np.concatenate(out)


ROUNDS = (1, 2, 3, 5, 8)  # reported after these rounds of each schedule (one run of max(ROUNDS))
_FITTED: list = []  # the inner estimators of one SelfTraining fit, in fit order (round 0 first)


class RecordingCALM(CALM):
    """CALM that records every fitted instance, so one run of R rounds gives rounds 1..R."""

    def fit(self, X, y):
        super().fit(X, y)
        _FITTED.append(self)
        return self


class RecordingSAV(SAV):
    def fit(self, X, y):
        super().fit(X, y)
        _FITTED.append(self)
        return self


class RecordingFixedHeads(FixedHeads):
    def fit(self, X, y):
        super().fit(X, y)
        _FITTED.append(self)
        return self


def variants() -> dict[str, dict]:
    """Every schedule tried; the name encodes it (m clips/class/round, confidence, w = labelled
    weight, "w=shots" = a labelled clip counts as many times as its class has labelled clips,
    spread=k, pool=N (the pool cut here), ppc=n (SelfTraining's own pool_per_class draw))."""
    v: dict[str, dict] = {}
    for m in (2, 3, 5, 10):
        v[f"m={m} margin w=shots"] = {"per_round": m, "labelled_weight": "shots"}
    m = 5
    for k in (2, 3):
        v[f"m={m} margin spread={k}"] = {"per_round": m, "spread": k}
        v[f"m={m} margin w=shots spread={k}"] = {"per_round": m, "labelled_weight": "shots", "spread": k}
    for ppc in (15, 20, 30, 50):
        v[f"m={m} margin w=shots ppc={ppc}"] = {
            "per_round": m,
            "labelled_weight": "shots",
            "pool_per_class": ppc,
        }
    for size in (300, 600, 1200):
        v[f"m={m} margin w=shots pool={size}"] = {"per_round": m, "labelled_weight": "shots", "pool": size}
    v[f"m={m} margin w=2"] = {"per_round": m, "labelled_weight": 2}
    v[f"m={m} margin w=4"] = {"per_round": m, "labelled_weight": 4}
    v[f"m={m} margin fixed-heads"] = {"per_round": m, "heads": "fixed"}
    for m in (1, 2, 3, 5, 10, 20, "shots"):
        v[f"m={m} margin"] = {"per_round": m}
    for m in (1, 2):
        v[f"m={m} probability"] = {"per_round": m, "confidence": "probability"}
        v[f"m={m} margin relabel"] = {"per_round": m, "relabel": True}
        v[f"m={m} margin w=2"] = {"per_round": m, "labelled_weight": 2}
        v[f"m={m} margin w=4"] = {"per_round": m, "labelled_weight": 4}
        v[f"m={m} margin fixed-heads"] = {"per_round": m, "heads": "fixed"}
    return v


def capped_pool(pool: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """The pool, or ``size`` of its clips drawn with the seed (as `calm evaluate --st-pool`)."""
    if size is None or size >= len(pool):
        return pool
    return np.sort(pool[np.random.default_rng([seed, 0x5354]).permutation(len(pool))[:size]])


def fit_variant(
    spec: dict, Xs, ys, Xpool, shots: int, inner: str, seed: int = 0
) -> tuple[SelfTraining, list]:
    """The fitted wrapper (max(ROUNDS) rounds) and its inner estimator after each round (0 = labelled)."""
    spec = {"labelled_weight": 1, "max_labelled": None, "pool_per_class": None} | dict(
        spec
    )  # names say the rest
    spec.pop("pool", None)
    heads = spec.pop("heads", "reselect")
    if spec.get("per_round") == "shots":
        spec["per_round"] = shots
    if inner == "sav":
        est = RecordingSAV(**SAV_PARAMS)
    elif heads == "fixed":
        est = RecordingFixedHeads(CALM(**CALM_PARAMS).fit(Xs, ys).weights_, CALM_PARAMS["tau_p"])
    else:
        est = RecordingCALM(**CALM_PARAMS)
    _FITTED.clear()
    st = SelfTraining(est, rounds=max(ROUNDS), random_state=seed, **spec).fit(Xs, ys, Xpool)
    fitted = list(_FITTED)
    fitted += [fitted[-1]] * (max(ROUNDS) + 1 - len(fitted))  # stopped early: the last one stays
    return st, fitted


def run_dataset(
    name: str, store: str, seeds: list[int], specs: dict[str, dict], inner: str, log
) -> list[dict]:
    X, y, meta = load_features(store, mmap=False)
    y = np.asarray(y).astype(str)
    X = np.asarray(X, dtype=np.float32)
    train, val = validation_split(name, y, meta)
    Xv, yv = X[val], y[val]
    rows = []
    for shots in SHOTS[name]:
        for seed in seeds:
            sup = draw_support(y, train, shots, seed)
            pool = np.setdiff1d(train, sup)
            Xs, ys = X[sup], y[sup]
            base_est = SAV(**SAV_PARAMS) if inner == "sav" else CALM(**CALM_PARAMS)
            base = 100 * base_est.fit(Xs, ys).score(Xv, yv)
            for vname, spec in specs.items():
                vpool = capped_pool(pool, spec.get("pool"), seed)
                st, fitted = fit_variant(spec, Xs, ys, X[vpool], shots, inner, seed)
                for R in ROUNDS:
                    n_p, p_acc = _pseudo_at(st, R, y[vpool], bool(spec.get("relabel")))
                    rows.append(
                        {
                            "dataset": name,
                            "inner": inner,
                            "shots": shots,
                            "seed": seed,
                            "variant": f"{vname} R={R}",
                            "base": base,
                            "acc": 100 * float(np.mean(fitted[R].predict(Xv) == yv)),
                            "n_pseudo": n_p,
                            "pseudo_acc": p_acc,
                        }
                    )
            log(f"{name} {inner} {shots}-shot seed {seed}")
    return rows


def _pseudo_at(st: SelfTraining, R: int, y_pool: np.ndarray, relabel: bool) -> tuple[int, float | None]:
    """Size and accuracy (%) against the hidden labels of the pseudo-labelled set after round R
    (relabel: only the final set is kept, so earlier rounds report their size without accuracy)."""
    if relabel:
        if R < st.n_rounds_:
            return st.rounds_[R - 1]["n_pseudo"], None
        chosen = np.arange(len(st.pseudo_index_))
    else:
        chosen = np.flatnonzero(st.pseudo_round_ <= R)
    right = st.pseudo_labels_[chosen] == y_pool[st.pseudo_index_[chosen]]
    return len(chosen), 100 * float(right.mean()) if len(right) else None


def paired(rows: list[dict]) -> dict:
    d = np.array([r["acc"] - r["base"] for r in rows])
    mean = float(d.mean())
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    pa = [r["pseudo_acc"] for r in rows if r["pseudo_acc"] is not None]
    return {
        "diff": mean,
        "lo": mean - half,
        "hi": mean + half,
        "n": len(d),
        "base": float(np.mean([r["base"] for r in rows])),
        "n_pseudo": float(np.mean([r["n_pseudo"] for r in rows])),
        "pseudo_acc": float(np.mean(pa)) if pa else None,
    }


HEAD_TO_HEAD = [
    ("m=5 margin R=3", "m=3 margin R=5"),
    ("m=5 margin R=3", "m=2 margin R=8"),
    ("m=5 margin R=5", "m=5 margin R=3"),
    ("m=1 probability R=3", "m=1 margin R=3"),
    ("m=2 probability R=8", "m=2 margin R=8"),
    ("m=2 margin relabel R=8", "m=2 margin R=8"),
    ("m=2 margin w=2 R=8", "m=2 margin R=8"),
    ("m=2 margin w=4 R=8", "m=2 margin R=8"),
    ("m=2 margin fixed-heads R=3", "m=2 margin R=3"),
    ("m=2 margin fixed-heads R=8", "m=2 margin R=8"),
]


def head_to_head(rows: list[dict]) -> str:
    """Paired differences between schedules (same seeds), for the pairs of HEAD_TO_HEAD present."""
    out = []
    for inner in sorted({r["inner"] for r in rows}):
        sub = [r for r in rows if r["inner"] == inner]
        cols = sorted({(r["dataset"], r["shots"]) for r in sub})
        names = {r["variant"] for r in sub}
        pairs = [(a, b) for a, b in HEAD_TO_HEAD if a in names and b in names]
        if not pairs:
            continue
        out.append(f"\n{inner}: schedule A minus schedule B, paired per seed (points)\n")
        out.append("| A - B | " + " | ".join(f"{d} {s}" for d, s in cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for a, b in pairs:
            cells = []
            for d, s in cols:
                acc = {
                    v: {
                        r["seed"]: r["acc"]
                        for r in sub
                        if r["variant"] == v and (r["dataset"], r["shots"]) == (d, s)
                    }
                    for v in (a, b)
                }
                p = paired(
                    [{"acc": acc[a][k], "base": acc[b][k], "n_pseudo": 0, "pseudo_acc": None} for k in acc[a]]
                )
                cells.append(f"{p['diff']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}]")
            out.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def report(rows: list[dict]) -> str:
    """One markdown table per inner estimator: variant x (dataset, shots) paired differences."""
    out = []
    for inner in sorted({r["inner"] for r in rows}):
        sub = [r for r in rows if r["inner"] == inner]
        cols = sorted({(r["dataset"], r["shots"]) for r in sub})
        out.append(f"\n{inner}+st minus {inner} (validation queries; mean [95 % t interval], points)\n")
        out.append("| variant | " + " | ".join(f"{d} {s}" for d, s in cols) + " | mean |")
        out.append("|---" * (len(cols) + 2) + "|")
        names = list(dict.fromkeys(r["variant"] for r in sub))
        for v in names:
            cells, means = [], []
            for d, s in cols:
                p = paired([r for r in sub if r["variant"] == v and r["dataset"] == d and r["shots"] == s])
                cells.append(f"{p['diff']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}]")
                means.append(p["diff"])
            out.append(f"| {v} | " + " | ".join(cells) + f" | {np.mean(means):+.2f} |")
        out.append(f"\n{inner} baseline and pseudo-labels of each variant (mean over seeds)\n")
        out.append("| variant | " + " | ".join(f"{d} {s}" for d, s in cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        base_cells = []
        for d, s in cols:
            p = paired([r for r in sub if r["variant"] == names[0] and r["dataset"] == d and r["shots"] == s])
            base_cells.append(f"{p['base']:.2f}")
        out.append(f"| {inner} accuracy | " + " | ".join(base_cells) + " |")
        for v in names:
            cells = []
            for d, s in cols:
                p = paired([r for r in sub if r["variant"] == v and r["dataset"] == d and r["shots"] == s])
                acc = "-" if p["pseudo_acc"] is None else f"{p['pseudo_acc']:.1f}"
                cells.append(f"{p['n_pseudo']:.0f} @ {acc} %")
            out.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n" + head_to_head(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=100)
    ap.add_argument("--datasets", default="esc10,fsdd,speech_commands")
    ap.add_argument("--inner", default="calm", choices=["calm", "sav"])
    ap.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    ap.add_argument("--out", type=Path, default=Path("runs/st_schedule.json"))
    ap.add_argument(
        "--report", type=Path, default=None, help="print the tables of a finished run(s)", nargs="+"
    )
    ap.add_argument(
        "--store", action="append", default=[], metavar="NAME=PATH", help="feature store of a dataset"
    )
    ap.add_argument("--shots", default=None, help="comma-separated shots (default: 1,5,10; speech 1,5)")
    args = ap.parse_args()
    stores = STORES | dict(s.split("=", 1) for s in args.store)
    if args.shots:
        for k in SHOTS:
            SHOTS[k] = tuple(int(x) for x in args.shots.split(","))
    if args.report:
        rows = {}  # several files: each (dataset, shots, seed, variant) once; cells absent from all are nan
        for f in args.report:
            for r in json.loads(f.read_text())["rows"]:
                rows.setdefault((r["inner"], r["dataset"], r["shots"], r["seed"], r["variant"]), r)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            print(report(list(rows.values())))
        return
    torch.set_num_threads(1)
    specs = variants()
    if args.variants:
        specs = {k: specs[k] for k in args.variants.split(",")}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    t0 = time.time()
    rows: list[dict] = []
    for name in args.datasets.split(","):
        rows += run_dataset(
            name, stores[name], seeds, specs, args.inner, lambda s: print(f"{time.time() - t0:7.1f}s {s}")
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = vars(args) | {"out": str(args.out), "stores": stores}
    args.out.write_text(json.dumps({"args": meta, "rows": rows}, default=str))
    print(report(rows))


if __name__ == "__main__":
    main()
