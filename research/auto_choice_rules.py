"""Which rule should ``auto`` use to choose among SAV, CALM-global, CALM and the linear probe?
(issue 24)

Validation episodes inside the TRAINING part of a feature store, never a test clip (the episodes
of ``class_score_variants.py``: per seed a third of the training groups -- speakers, folds -- is
held out as queries, the support is drawn from the rest; ``--group random`` holds out 30 % of the
clips). Per episode every candidate is fitted on the whole support set (its query accuracy) and
cross-validated inside it as `calm.classifiers.auto.AutoHead` does (stratified, at most 5 folds,
``--repeats`` shuffles). Rules, all from the support set alone:

  heads        the three head methods only, first shuffle (``auto`` before the probe joined)
  shipped      the four candidates, first shuffle: ``AutoHead``'s defaults
  repN         the mean CV accuracy over the first N shuffles
  probe+M      the probe unless another candidate's CV accuracy beats it by more than M points
  repN/probe+M both: the mean over N shuffles, the probe unless beaten by more than M points
  oracle       the best candidate on the queries (a bound, not a rule)

Printed per store and shot count: each rule's mean query accuracy and its paired difference to the
single method with the best mean (95 % t interval), and how often each rule chose the probe.

    python research/auto_choice_rules.py runs/emodb/features --group speaker
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).parent))
from class_score_variants import _episode, validation_store  # noqa: E402

from calm import methods  # noqa: E402

HEADS = ("sav", "calm-global", "calm")
ALL = (*HEADS, "linear-probe")


def _build(name: str):
    return methods.build(name, {**methods.info(name).defaults(), "calibration": None})


def _cv(X: np.ndarray, y: np.ndarray, repeats: int) -> dict[str, list[float]]:
    """Per candidate, its CV accuracy (%) for each shuffle (seed 0, 1, ...), as AutoHead scores it."""
    n_splits = int(min(5, np.bincount(y).min()))
    out: dict[str, list[float]] = {m: [] for m in ALL}
    if n_splits < 2:
        return out
    for r in range(repeats):
        folds = list(StratifiedKFold(n_splits, shuffle=True, random_state=r).split(np.zeros(len(y)), y))
        for m in ALL:
            right = sum(int((_build(m).fit(X[tr], y[tr]).predict(X[te]) == y[te]).sum()) for tr, te in folds)
            out[m].append(100.0 * right / len(y))
    return out


def _pick(scores: dict[str, float], names: tuple[str, ...]) -> str:
    """AutoHead's rule: the best CV accuracy, ties to the fallback (CALM-global), then the earlier name."""
    best = max(scores[m] for m in names)
    tied = [m for m in names if scores[m] == best]
    return methods.AUTO_FALLBACK if methods.AUTO_FALLBACK in tied else tied[0]


def _lean(scores: dict[str, float], margin: float) -> str:
    """The probe unless a head method's CV accuracy beats it by more than ``margin`` points."""
    rival = max(scores[m] for m in HEADS)
    return "linear-probe" if rival <= scores["linear-probe"] + margin else _pick(scores, HEADS)


def rules(cv: dict[str, list[float]], query: dict[str, float], margins: list[float]) -> dict[str, str]:
    """The method each rule picks on one episode."""
    out: dict[str, str] = {}
    repeats = len(cv["sav"])
    for r in sorted({1, 3, repeats}) if repeats else [1]:
        mean = {m: float(np.mean(v[:r])) if v else 0.0 for m, v in cv.items()}
        if r == 1:
            out["heads"], out["shipped"] = _pick(mean, HEADS), _pick(mean, ALL)
        else:
            out[f"rep{r}"] = _pick(mean, ALL)
        for m in margins:
            out[f"{'' if r == 1 else f'rep{r}/'}probe+{m:g}"] = _lean(mean, m)
    if not repeats:  # one clip a class: every rule fits the fallback
        out = dict.fromkeys(out, methods.AUTO_FALLBACK)
    out["oracle"] = max(query, key=query.get)
    return out


def _interval(d: np.ndarray) -> str:
    if len(d) < 2 or d.std(ddof=1) == 0:
        return f"{d.mean():+.2f}"
    h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+.2f} [{d.mean() - h:+.2f}, {d.mean() + h:+.2f}]"


def run(
    store: str, group: str, shots_list: list[int], seeds: int, repeats: int, margins: list[float]
) -> None:
    X_t, yi, classes, train, groups = validation_store(store, group)
    X = X_t.numpy()
    for shots in shots_list:
        picks: list[dict[str, str]] = []
        accs: list[dict[str, float]] = []
        for seed in range(seeds):
            ep = _episode(np.random.default_rng(seed), train, groups, yi, len(classes), shots, group)
            if ep is None:
                continue
            sup, qi = ep
            query = {
                m: 100.0 * float((_build(m).fit(X[sup], yi[sup]).predict(X[qi]) == yi[qi]).mean())
                for m in ALL
            }
            picks.append(rules(_cv(X[sup], yi[sup], repeats), query, margins))
            accs.append(query)
        best = max(ALL, key=lambda m: np.mean([a[m] for a in accs]))
        print(
            f"\n{store} shots {shots} ({len(accs)} episodes); best single: {best} "
            f"{np.mean([a[best] for a in accs]):.2f}; singles "
            + ", ".join(f"{m} {np.mean([a[m] for a in accs]):.2f}" for m in ALL)
        )
        for rule in picks[0]:
            got = np.array([a[p[rule]] for a, p in zip(accs, picks, strict=True)])
            diff = got - np.array([a[best] for a in accs])
            probe = sum(p[rule] == "linear-probe" for p in picks)
            print(
                f"  {rule:>16}: {got.mean():6.2f}  - best {_interval(diff):>26}  probe {probe}/{len(picks)}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--group", default="speaker")
    ap.add_argument("--shots", default="5,10")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--margins", default="0,2.5,5")
    a = ap.parse_args()
    shots = [int(s) for s in a.shots.split(",")]
    run(a.store, a.group, shots, a.seeds, a.repeats, [float(m) for m in a.margins.split(",")])


if __name__ == "__main__":
    main()
