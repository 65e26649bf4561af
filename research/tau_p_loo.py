"""Can CALM choose its posterior temperature tau_p per support set, by leave-one-out? (issue 24)

Validation episodes inside the TRAINING part of a feature store, drawn exactly as in
``class_score_variants.py`` (held-out training speakers / folds, or 30 % random clips with
``--group random``); never a test clip. For every tau_p of the grid, CALM and CALM-global are
scored on the held-out clips and, by leave-one-out, on the support clips alone (each clip scored
against its class centroid without it, its own margins taken out of the reliabilities and the
heads and weights chosen again: ``calm._calibration.loo_cosines`` / ``loo_weighted_scores``, the
machinery of the fitted calibration). ``*-loo`` picks, per support set, the tau_p of the grid with
the highest leave-one-out accuracy (ties: the one nearest the paper's 0.03 on a log scale, then the
larger). At one shot (no leave-one-out inside a class) ``*-loo`` keeps 0.03. Printed: accuracy and
the paired difference to the paper's CALM (tau_p 0.03), 95 % normal interval, and how often each
tau_p was chosen.

    python research/tau_p_loo.py /work/research/emodb-features --group speaker
    python research/tau_p_loo.py /work/research/fsdd-features --group speaker
    python research/tau_p_loo.py /work/research/esc10-features --group fold
    python research/tau_p_loo.py /work/research/speech-features --group random --shots 1,3,5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from class_score_variants import _episode, support_cosines, validation_store  # noqa: E402

from calm import _calibration as cal  # noqa: E402
from calm import _heads as H  # noqa: E402

PAPER = 0.03


def _pick(loo_acc: dict[float, float]) -> float:
    best = max(loo_acc.values())
    tied = [t for t, a in loo_acc.items() if a >= best - 1e-9]
    return min(tied, key=lambda t: (abs(np.log(t / PAPER)), -t))


def _episode_scores(Xs, ys, Xq, C, k, grid, tau_w=0.5):
    y, counts, cos_q, cos_in, cos_loo = support_cosines(Xs, ys, Xq, C)
    loo = cos_loo is not None
    preds, loo_acc = {}, {}
    for tau in grid:
        m = H.clamped_margins(H.head_posteriors(cos_in, tau), y)
        Pq = H.head_posteriors(cos_q, tau)
        for name, r in (("calm", H.class_reliability(m, y, C)), ("calm-global", H.global_reliability(m))):
            w = H.head_weights(r, k, tau_w)
            preds[(name, tau)] = H.weighted_scores(Pq, w).argmax(1).numpy()
            if loo:
                wf = w.expand(C, -1) if w.ndim == 1 else w
                s = cal.loo_weighted_scores(
                    H.head_posteriors(cos_loo, tau),
                    m,
                    y,
                    r,
                    wf,
                    counts,
                    lambda rr: H.head_weights(rr, k, tau_w),
                )
                loo_acc[(name, tau)] = float((s.argmax(1) == y).double().mean())
    for alpha in (0.5,):  # 1 shot: class reliabilities mixed with the global ones
        m = H.clamped_margins(H.head_posteriors(cos_in, PAPER), y)
        r = alpha * H.class_reliability(m, y, C) + (1 - alpha) * H.global_reliability(m)[None]
        preds[(f"mix{alpha:g}", PAPER)] = (
            H.weighted_scores(H.head_posteriors(cos_q, PAPER), H.head_weights(r, k, tau_w)).argmax(1).numpy()
        )
    correct = (H.head_predictions(cos_in) == y[:, None]).sum(0)
    kept = H.rank_heads(correct)[:k]
    out = {"sav": H.vote_counts(H.head_predictions(cos_q)[:, kept], C).argmax(1).numpy()}
    chosen = {}
    for name in ("calm", "calm-global"):
        for tau in grid:
            out[f"{name}@{tau:g}"] = preds[(name, tau)]
        t = _pick({tau: loo_acc[(name, tau)] for tau in grid}) if loo else PAPER
        out[f"{name}-loo"] = preds[(name, t)]
        chosen[name] = t
    out["mix0.5"] = preds[("mix0.5", PAPER)]
    # the shipped default: tau_p and the pooling (class / global) by leave-one-out, lam 1 at 1 shot
    from calm import CALM

    out["CALM(scores=loo)"] = CALM(k, scores="loo", calibration=None).fit(Xs, ys).predict(Xq)
    # joint choice over weighting x tau_p; ties: class before global, then nearest 0.03
    if loo:
        best = max(loo_acc.values())
        for name in ("calm", "calm-global"):
            tied = {t: 1.0 for t in grid if loo_acc[(name, t)] >= best - 1e-9}
            if tied:
                t = _pick(tied)
                out["joint-loo"] = preds[(name, t)]
                chosen["joint"] = (name, t)
                break
    else:
        out["joint-loo"] = preds[("calm-global", PAPER)]
        chosen["joint"] = ("calm-global", PAPER)
    return out, chosen


def run(store, group, shots_list, seeds, k_frac, grid):
    X, yi, classes, train, groups = validation_store(store, group)
    k = H.resolve_k(k_frac, X.shape[1])
    print(f"{store}: k={k}, {seeds} validation seeds, group={group}, grid={grid}")
    for shots in shots_list:
        acc: dict[str, list[float]] = {}
        picks: dict[str, list] = {"calm": [], "calm-global": [], "joint": []}
        for seed in range(seeds):
            ep = _episode(np.random.default_rng(seed), train, groups, yi, len(classes), shots, group)
            if ep is None:
                continue
            sup, qi = ep
            out, chosen = _episode_scores(X[sup], yi[sup], X[qi], len(classes), k, grid)
            for name, pred in out.items():
                acc.setdefault(name, []).append(100 * (pred == yi[qi]).mean())
            for name, t in chosen.items():
                picks[name].append(t)
        base = np.array(acc[f"calm@{PAPER:g}"])
        print(f"  shots {shots}")
        for name, values in acc.items():
            a = np.array(values)
            d = a - base
            h = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
            ci = f"[{d.mean() - h:+.2f}, {d.mean() + h:+.2f}]"
            print(f"    {name:18s} {a.mean():6.2f}  - calm@0.03 {d.mean():+6.2f} {ci}")
        for name, ts in picks.items():
            if name == "joint":
                print(
                    "    joint chosen: "
                    + ", ".join(f"{w}@{t:g}:{ts.count((w, t))}" for w, t in sorted(set(ts)))
                )
            else:
                print(f"    {name} tau_p chosen: " + ", ".join(f"{t:g}:{ts.count(t)}" for t in grid))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("store")
    parser.add_argument("--group", default="speaker")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--k", type=float, default=0.25)
    parser.add_argument("--grid", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.03, 0.05, 0.1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.store, args.group, [int(s) for s in args.shots.split(",")], args.seeds, args.k, args.grid)


if __name__ == "__main__":
    main()
