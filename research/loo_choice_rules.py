"""Which rule should CALM use to choose tau_p and the reliability pooling per support set? (issue 24)

Companion of ``tau_p_loo.py``, on the same validation episodes (inside the training parts, never
a test clip; 20 seeds). The class reliabilities are shrunk towards the global one,
(n_c r_c + lam r) / (n_c + lam) (``calm._heads.shrunk_reliability``): lam 0 is the paper's CALM
(Eq. 11), inf CALM-global (Eq. 7). A rule picks (lam, tau_p) from its lam set x the tau_p grid by
the leave-one-out accuracy of the support clips (``acc``) or that plus a tenth of the mean
leave-one-out margin of the normalised scores (``acc+m``); ties go to the tau_p nearest 0.03,
then to the earlier lam. With one clip a class (no leave-one-out) every rule but L0 / Linf uses
lam 1. Printed per store and shots: each rule's mean paired difference to the paper's CALM
(tau_p 0.03), with SAV and CALM-global for reference. The rule shipped as
``CALM(scores="loo")`` is ``L0inf+m``.

    python research/loo_choice_rules.py /work/research
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from class_score_variants import _episode, support_cosines, validation_store  # noqa: E402

from calm import _heads as H  # noqa: E402

PAPER, TAU_W, INF = 0.03, 0.5, math.inf
GRID = [0.005, 0.01, 0.02, 0.03, 0.05, 0.1]
RULES = {
    "L0": ([0], "acc"),
    "Linf": ([INF], "acc"),
    "L0inf": ([0, INF], "acc"),
    "L0inf+m": ([0, INF], "acc+m"),
    "L01inf": ([0, 1, INF], "acc"),
    "L01inf+m": ([0, 1, INF], "acc+m"),
    "L1": ([1], "acc"),
    "L1+m": ([1], "acc+m"),
    "L013inf+m": ([0, 1, 3, INF], "acc+m"),
    "L3": ([3], "acc"),
}
ONE_SHOT = {"L0": 0, "Linf": INF}  # every other rule: lam 1


def _scores(Xs, ys, Xq, yq, C, k):
    """Query accuracy per (lam, tau_p) and leave-one-out (accuracy, margin) of the support clips."""
    y, counts, cos_q, cos_in, cos_loo = support_cosines(Xs, ys, Xq, C)
    loo = cos_loo is not None
    query, support = {}, {}
    for tau in GRID:
        m = H.clamped_margins(H.head_posteriors(cos_in, tau), y).double()
        Pq = H.head_posteriors(cos_q, tau).double()
        rc, rg = H.class_reliability(m, y, C), m.mean(0)
        for lam in [0, 1, 3, INF]:
            w = H.head_weights(H.shrunk_reliability(rc, rg, counts, lam), k, TAU_W)
            query[(lam, tau)] = 100 * float((H.weighted_scores(Pq, w).argmax(1).numpy() == yq).mean())
            if loo:
                wl = H.head_weights(H.loo_reliabilities(m, y, rc, rg, counts, lam), k, TAU_W)
                s = torch.einsum("nkc,nck->nc", H.head_posteriors(cos_loo, tau).double(), wl)
                p = s / s.sum(1, keepdim=True)
                own = p.gather(1, y.view(-1, 1))[:, 0]
                rival = p.scatter(1, y.view(-1, 1), -1).amax(1)
                support[(lam, tau)] = (float((s.argmax(1) == y).double().mean()), float((own - rival).mean()))
    kept = H.rank_heads((H.head_predictions(cos_in) == y[:, None]).sum(0))[:k]
    query["sav"] = 100 * float(
        (H.vote_counts(H.head_predictions(cos_q)[:, kept], C).argmax(1).numpy() == yq).mean()
    )
    return query, support, loo


def _select(support, lams, crit):
    def key(c):
        acc, margin = support[c]
        value = acc if crit == "acc" else acc + 0.1 * margin
        return (round(value, 9), -abs(math.log(c[1] / PAPER)), -lams.index(c[0]), c[1])

    return max([(lam, t) for lam in lams for t in GRID], key=key)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stores", type=Path, help="folder holding emodb-, esc10-, fsdd- and speech-features")
    root = parser.parse_args().stores
    torch.set_num_threads(1)
    for store, group, shots_list in [
        ("emodb", "speaker", (1, 2, 5, 10)),
        ("fsdd", "speaker", (1, 2, 5, 10)),
        ("esc10", "fold", (1, 2, 5, 10)),
        ("speech", "random", (1, 2, 3, 5)),
    ]:
        X, yi, classes, train, groups = validation_store(root / f"{store}-features", group)
        C, k = len(classes), H.resolve_k(0.25, X.shape[1])
        for shots in shots_list:
            res: dict[str, list[float]] = {}
            for seed in range(20):
                ep = _episode(np.random.default_rng(seed), train, groups, yi, C, shots, group)
                if ep is None:
                    continue
                sup, qi = ep
                query, support, loo = _scores(X[sup], yi[sup], X[qi], yi[qi], C, k)
                base = query[(0, PAPER)]
                res.setdefault("sav", []).append(query["sav"] - base)
                res.setdefault("calm-global", []).append(query[(INF, PAPER)] - base)
                for name, (lams, crit) in RULES.items():
                    choice = _select(support, lams, crit) if loo else (ONE_SHOT.get(name, 1), PAPER)
                    res.setdefault(name, []).append(query[choice] - base)
            print(
                f"{store:6s} {shots:2d} " + " ".join(f"{r}:{np.mean(v):+.2f}" for r, v in res.items()),
                flush=True,
            )


if __name__ == "__main__":
    main()
