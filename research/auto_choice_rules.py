"""Which rule should ``auto`` use to choose among SAV, CALM-global, CALM and the linear probe?
(issue 24)

Validation episodes inside the TRAINING part of a feature store, never a test clip (the episodes
of ``class_score_variants.py``: per seed a third of the training groups -- speakers, folds -- is
held out as queries, the support is drawn from the rest; ``--group random`` holds out 30 % of the
clips). Per episode every candidate is fitted on the whole support set (its query accuracy) and
cross-validated inside it as `calm.classifiers.auto.AutoHead` does (stratified, at most 5 folds,
``--repeats`` shuffles). Rules, all from the support set alone:

  heads        the three head methods only, first shuffle (``auto`` before the probe joined)
  shipped1     the four candidates, first shuffle (``AutoHead(n_repeats=1)``)
  repN         the mean CV accuracy over the first N shuffles (rep3: ``AutoHead``'s defaults)
  probe+M      the probe unless another candidate's CV accuracy beats it by more than M points
  repN/probe+M both: the mean over N shuffles, the probe unless beaten by more than M points
  repN/tie-ll  repN, ties to the higher mean log-probability of the held-out clips' true class
               (uncalibrated predict_proba, floored at LOG_FLOOR); tie-p: the mean probability
  repN/ll, /p  that mean log-probability / probability alone
  repN/acc+Wll accuracy (%) plus W times the mean log-probability (acc+Wp: probability)
  loso/...     the same on leave-one-shot-out folds (``--loso``: as many folds as the smallest
               class has clips, one pass; with 5 or fewer shots the first shuffle's folds)
  oracle       the best candidate on the queries (a bound, not a rule)

Printed per store and shot count: each rule's mean query accuracy and its paired difference to the
single method with the best mean (95 % t interval), and how often each rule chose the probe.

    python research/auto_choice_rules.py runs/emodb/features --group speaker
    python research/auto_choice_rules.py runs/emodb/features --group speaker --loso --json e.json
    python research/auto_choice_rules.py e.json --summary esc10.json fsdd.json speech.json

``--summary`` applies round 2's adoption rule (research/README.md) to the ``--json`` files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).parent))
from class_score_variants import _episode, validation_store  # noqa: E402

from calm import methods  # noqa: E402

HEADS = ("sav", "calm-global", "calm")
#: floor of a held-out probability before its log (SAV's uncalibrated probabilities are near 0 / 1)
LOG_FLOOR = 1e-4
#: temperatures tried by the calibrated criterion (round 3)
TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 41))
ALL = (*HEADS, "linear-probe")


def _build(name: str):
    return methods.build(name, {**methods.info(name).defaults(), "calibration": None})


def _calibrated_ll(logp: np.ndarray, true: np.ndarray) -> float:
    """The mean log-probability of the true class after the best single temperature on these
    held-out log-probabilities (so candidates with sharper or softer raw probabilities compare)."""
    best = -np.inf
    for t in TEMPERATURES:
        z = logp / t
        z = z - z.max(axis=1, keepdims=True)
        ll = z[np.arange(len(true)), true] - np.log(np.exp(z).sum(axis=1))
        best = max(best, float(ll.mean()))
    return best


def _fold_stats(X, y, folds, m: str) -> tuple[float, float, float, float]:
    """(accuracy %, mean log-probability, mean probability of the true class, temperature-calibrated
    mean log-probability) of candidate ``m`` over one set of folds covering every clip once
    (uncalibrated predict_proba, as a fold is fitted in AutoHead)."""
    right = 0
    logp_all = np.zeros((len(y), int(y.max()) + 1))
    for tr, te in folds:
        clf = _build(m).fit(X[tr], y[tr])
        proba = np.asarray(clf.predict_proba(X[te]), dtype=np.float64)
        logp_all[te] = np.log(np.clip(proba, 1e-12, 1.0))[
            :, np.searchsorted(np.asarray(clf.classes_), np.arange(logp_all.shape[1]))
        ]
        right += int((np.asarray(clf.predict(X[te])) == y[te]).sum())
    p_true = np.exp(logp_all[np.arange(len(y)), y])
    logp = float(np.log(np.clip(p_true, LOG_FLOOR, 1.0)).mean())
    return 100.0 * right / len(y), logp, float(p_true.mean()), _calibrated_ll(logp_all, y)


def _cv(X: np.ndarray, y: np.ndarray, repeats: int, loso: bool) -> dict[str, list[tuple[float, ...]]]:
    """Per candidate, `_fold_stats` (accuracy %, mean log p, mean p, calibrated log p) per shuffle (seed 0, 1,
    ...) of at most 5 stratified folds, as AutoHead scores them; with ``loso`` one more entry under
    ``"loso:" + name``: leave-one-shot-out (as many folds as the smallest class has clips)."""
    n_min = int(np.bincount(y).min())
    n_splits = min(5, n_min)
    out: dict[str, list[tuple[float, ...]]] = {m: [] for m in ALL}
    if n_splits < 2:
        return out
    for r in range(repeats):
        folds = list(StratifiedKFold(n_splits, shuffle=True, random_state=r).split(np.zeros(len(y)), y))
        for m in ALL:
            out[m].append(_fold_stats(X, y, folds, m))
    if loso:
        folds = list(StratifiedKFold(n_min, shuffle=True, random_state=0).split(np.zeros(len(y)), y))
        for m in ALL:
            out[f"loso:{m}"] = [_fold_stats(X, y, folds, m) if n_min > 5 else out[m][0]]
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


def _pick_key(scores: dict[str, float], names: tuple[str, ...], tie: dict[str, float] | None = None) -> str:
    """The best score; ties to the higher ``tie`` value when given, else to the fallback, then the
    earlier name."""
    best = max(scores[m] for m in names)
    tied = [m for m in names if scores[m] == best]
    if tie is not None and len(tied) > 1:
        top = max(tie[m] for m in tied)
        tied = [m for m in tied if tie[m] == top]
    return methods.AUTO_FALLBACK if methods.AUTO_FALLBACK in tied else tied[0]


def _finer(cv: dict[str, list[tuple[float, ...]]], r: int, prefix: str = "") -> dict[str, str]:
    """The finer criteria on the mean over the first ``r`` shuffles (keys ``prefix + name``)."""
    acc = {m: float(np.mean([v[0] for v in cv[prefix + m][:r]])) for m in ALL}
    ll = {m: float(np.mean([v[1] for v in cv[prefix + m][:r]])) for m in ALL}
    pr = {m: float(np.mean([v[2] for v in cv[prefix + m][:r]])) for m in ALL}
    tag = f"rep{r}" if not prefix else "loso"
    out = {
        f"{tag}/tie-ll": _pick_key(acc, ALL, ll),
        f"{tag}/tie-p": _pick_key(acc, ALL, pr),
        f"{tag}/ll": _pick_key(ll, ALL),
        f"{tag}/p": _pick_key(pr, ALL),
    }
    for w in (0.5, 1.0, 2.0):
        out[f"{tag}/acc+{w:g}ll"] = _pick_key({m: acc[m] + w * ll[m] for m in ALL}, ALL)
    for w in (5.0, 10.0, 20.0):
        out[f"{tag}/acc+{w:g}p"] = _pick_key({m: acc[m] + w * pr[m] for m in ALL}, ALL)
    cll = {m: float(np.mean([v[3] for v in cv[prefix + m][:r]])) for m in ALL}
    out[f"{tag}/cll"] = _pick_key(cll, ALL)
    out[f"{tag}/tie-cll"] = _pick_key(acc, ALL, cll)
    for w in (2.0, 5.0, 10.0):
        out[f"{tag}/acc+{w:g}cll"] = _pick_key({m: acc[m] + w * cll[m] for m in ALL}, ALL)
    best = max(acc.values())
    tied = [m for m in ALL if acc[m] == best]
    fb = methods.AUTO_FALLBACK in tied
    out[f"{tag}/tie-fb-cll"] = methods.AUTO_FALLBACK if fb else _pick_key(acc, ALL, cll)
    out[f"{tag}/tie-fb-p"] = methods.AUTO_FALLBACK if fb else _pick_key(acc, ALL, pr)
    if prefix:
        out["loso"] = _pick_key(acc, ALL)
    return out


def rules(
    cv: dict[str, list[tuple[float, ...]]], query: dict[str, float], margins: list[float]
) -> dict[str, str]:
    """The method each rule picks on one episode."""
    out: dict[str, str] = {}
    repeats = len(cv["sav"])
    for r in sorted({1, 3, repeats}) if repeats else [1, 3]:
        mean = {m: float(np.mean([v[0] for v in cv[m][:r]])) if cv[m] else 0.0 for m in ALL}
        if r == 1:
            out["heads"], out["shipped1"] = _pick(mean, HEADS), _pick(mean, ALL)
        else:
            out[f"rep{r}"] = _pick(mean, ALL)
        for m in margins:
            out[f"{'' if r == 1 else f'rep{r}/'}probe+{m:g}"] = _lean(mean, m)
        if repeats and r > 1:
            out.update(_finer(cv, r))
    if repeats and "loso:sav" in cv:
        out.update(_finer(cv, 1, "loso:"))
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
    store: str,
    group: str,
    shots_list: list[int],
    seeds: range,
    repeats: int,
    margins: list[float],
    loso: bool,
) -> dict[str, dict[str, list[float]]]:
    """Print each rule's paired difference to the best single method; return, per shot count, each
    rule's per-episode difference (for the summary)."""
    X_t, yi, classes, train, groups = validation_store(store, group)
    X = X_t.numpy()
    diffs: dict[str, dict[str, list[float]]] = {}
    for shots in shots_list:
        picks: list[dict[str, str]] = []
        accs: list[dict[str, float]] = []
        for seed in seeds:
            ep = _episode(np.random.default_rng(seed), train, groups, yi, len(classes), shots, group)
            if ep is None:
                continue
            sup, qi = ep
            query = {
                m: 100.0 * float((_build(m).fit(X[sup], yi[sup]).predict(X[qi]) == yi[qi]).mean())
                for m in ALL
            }
            picks.append(rules(_cv(X[sup], yi[sup], repeats, loso), query, margins))
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
            diffs.setdefault(str(shots), {})[rule] = diff.tolist()
            probe = sum(p[rule] == "linear-probe" for p in picks)
            print(
                f"  {rule:>16}: {got.mean():6.2f}  - best {_interval(diff):>26}  probe {probe}/{len(picks)}"
            )
    return diffs


def summary(emodb: str, others: list[str], base: str = "rep3") -> None:
    """The adoption rule of round 2 (research/README.md) on ``--json`` files: per rule, its mean
    paired difference to the best single method on EmoDB over the shot counts, its gain on ``base``
    there, and its worst shortfall against ``base`` on the other stores at any shot count."""
    emo = json.loads(Path(emodb).read_text())
    rest = [json.loads(Path(f).read_text()) for f in others]
    print(f"{'rule':>16}  EmoDB mean  gain on {base}  worst elsewhere vs {base}  passes (a)+(b)")
    for rule in next(iter(emo.values())):
        mean = float(np.mean([np.mean(d[rule]) for d in emo.values()]))
        gain = mean - float(np.mean([np.mean(d[base]) for d in emo.values()]))
        worst = min(np.mean(d[rule]) - np.mean(d[base]) for doc in rest for d in doc.values())
        ok = gain >= 0.3 and worst >= -0.3 and rule != "oracle"
        print(f"{rule:>16}  {mean:+10.2f}  {gain:+12.2f}  {worst:+26.2f}  {'yes' if ok else 'no'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", help="a feature store; with --summary: EmoDB's --json file")
    ap.add_argument("--summary", nargs="*", help="the other stores' --json files: apply the adoption rule")
    ap.add_argument("--group", default="speaker")
    ap.add_argument("--shots", default="5,10")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=0, help="fresh seeds: e.g. 20 with --seeds 20")
    ap.add_argument("--loso", action="store_true", help="also leave-one-shot-out (cv = shots)")
    ap.add_argument("--json", help="write each rule's per-episode differences here")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--margins", default="0,2.5,5")
    a = ap.parse_args()
    if a.summary is not None:
        summary(a.store, a.summary)
        return
    shots = [int(s) for s in a.shots.split(",")]
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    diffs = run(a.store, a.group, shots, seeds, a.repeats, [float(m) for m in a.margins.split(",")], a.loso)
    if a.json:
        Path(a.json).write_text(json.dumps(diffs))


if __name__ == "__main__":
    main()
