"""Which correction puts CALM's class scores on one scale? (issue 24, groundwork)

Validation episodes drawn inside the TRAINING part of a feature store, never a test clip: the
training groups (speakers, folds) are split per seed into support groups and held-out groups, or,
with ``--group random``, 30 % of the training clips are held out. Every variant is scored on the
same episodes and printed with its paired difference to the paper's CALM (95 % normal interval).

Variants (k heads per class or shared, tau_w 0.5):
  sav, calm-global, calm           the paper's classifiers (Eq. 1-13)
  calm-z                           each class's score standardised by its mean / std over the
                                   support clips of the other classes
  calm-center, calm-scale          each class's score centred on / divided by its support mean
  calm-margin                      own score minus the best rival, both with the class's own heads
  calm-mix                         mean of the CALM and CALM-global scores
  shrinkN                          class reliabilities shrunk towards the global one,
                                   (n_c r_c + N r) / (n_c + N)
  global-set                       CALM-global's head set with class-conditional weights

Run from the repository root on stores made by ``calm extract``:

    python research/class_score_variants.py runs/emodb/features --group speaker --tau-p 0.03 0.01
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from calm import _calibration as cal
from calm import _heads as H


def _variants(Xs: torch.Tensor, ys: np.ndarray, Xq: torch.Tensor, C: int, k: int, tau_p: float):
    y = torch.from_numpy(ys)
    mu = H.class_centroids(Xs, y, C)
    sim_s, sim_q = H.cosine_similarities(Xs, mu), H.cosine_similarities(Xq, mu)
    Ps, Pq = H.head_posteriors(sim_s, tau_p), H.head_posteriors(sim_q, tau_p)
    m = H.clamped_margins(Ps, y)
    out = {}
    correct = (H.head_predictions(sim_s) == y[:, None]).sum(0)
    kept = H.rank_heads(correct)[:k]
    out["sav"] = H.vote_counts(H.head_predictions(sim_q)[:, kept], C).argmax(1)
    rg = H.global_reliability(m)
    wg = H.head_weights(rg, k, 0.5)
    Sg = H.weighted_scores(Pq, wg)
    out["calm-global"] = Sg.argmax(1)
    rc = H.class_reliability(m, y, C)
    wc = H.head_weights(rc, k, 0.5)
    Sq, Ss = H.weighted_scores(Pq, wc), H.weighted_scores(Ps, wc)
    out["calm"] = Sq.argmax(1)
    other = y[:, None] != torch.arange(C)[None, :]
    mean_o = (Ss * other).sum(0) / other.sum(0)
    sd_o = (((Ss - mean_o) ** 2 * other).sum(0) / other.sum(0)).sqrt()
    out["calm-z"] = ((Sq - mean_o) / sd_o.clamp_min(1e-3)).argmax(1)
    out["calm-center"] = (Sq - Ss.mean(0)).argmax(1)
    out["calm-scale"] = (Sq / Ss.mean(0).clamp_min(1e-6)).argmax(1)
    Q = torch.einsum("nkc,dk->ndc", Pq, wc)  # class d's heads, posterior over all classes
    own = torch.diagonal(Q, dim1=1, dim2=2)
    rival = Q.masked_fill(torch.eye(C, dtype=torch.bool)[None], -1).amax(-1)
    out["calm-margin"] = (own - rival).argmax(1)
    out["calm-mix"] = (0.5 * Sq + 0.5 * Sg).argmax(1)
    n_c = torch.bincount(y, minlength=C).to(rc.dtype)[:, None]
    for lam in (3, 10, 30):
        out[f"shrink{lam}"] = H.weighted_scores(
            Pq, H.head_weights((n_c * rc + lam * rg) / (n_c + lam), k, 0.5)
        )
    shared = H.top_k_mask(rg, k)
    w_set = torch.softmax((rc / 0.5).masked_fill(~shared[None], float("-inf")), -1)
    out["global-set"] = H.weighted_scores(Pq, w_set).argmax(1)
    return {name: (p.argmax(1) if p.ndim == 2 else p).numpy() for name, p in out.items()}


def _episode(rng, train, groups, yi, C, shots, group):
    if group == "random":
        held = train & (rng.random(len(yi)) < 0.3)
    else:
        names = sorted(set(groups[train]))
        held = train & np.isin(groups, rng.choice(names, size=max(1, len(names) // 3), replace=False))
    pool = train & ~held
    support = []
    for c in range(C):
        idx = np.flatnonzero(pool & (yi == c))
        if len(idx) < shots:
            return None
        support.extend(rng.choice(idx, shots, replace=False))
    return np.array(support), np.flatnonzero(held)


def support_cosines(Xs: torch.Tensor, ys: np.ndarray, Xq: torch.Tensor, C: int):
    """(labels tensor, clips per class (C,), query cosines (nq, K, C), support cosines in-sample
    (n, K, C), leave-one-out support cosines or None when a class has one clip) of one episode."""
    y = torch.from_numpy(ys)
    counts = torch.bincount(y, minlength=C)
    mu = H.class_centroids(Xs, y, C)
    cos_q = H.cosine_similarities(Xq, mu)
    if not bool((counts >= 2).all()):
        return y, counts, cos_q, H.cosine_similarities(Xs, mu), None
    cos_in, cos_loo = cal.loo_cosines(Xs, y, mu, counts)
    return y, counts, cos_q, cos_in, cos_loo


def validation_store(store, group: str):
    """(X (n, K, d) float32, class indices (n,), classes, training-part mask (n,), group of each clip)
    of a feature store: the training part is everything but the official test split, or but the last
    fold, or (group "random") every clip; validation episodes (`_episode`) never leave it."""
    import calm

    X_np, labels, meta = calm.load_features(store)
    X = torch.from_numpy(np.asarray(X_np, dtype=np.float32))
    classes = sorted(set(labels))
    yi = np.array([classes.index(v) for v in labels])
    if "split" in meta and (meta["split"] == "test").any():
        train = (meta["split"] != "test").to_numpy()
    elif group == "random":
        train = np.ones(len(yi), bool)
    else:
        train = (meta["fold"] != meta["fold"].max()).to_numpy()
    groups = meta[group].astype(str).to_numpy() if group != "random" else np.arange(len(yi)).astype(str)
    return X, yi, classes, train, groups


def run(store: str, group: str, shots_list, seeds: int, k_frac: float, tau_p: float) -> None:
    X, yi, classes, train, groups = validation_store(store, group)
    k = H.resolve_k(k_frac, X.shape[1])
    acc: dict = {}
    for shots in shots_list:
        for seed in range(seeds):
            ep = _episode(np.random.default_rng(seed), train, groups, yi, len(classes), shots, group)
            if ep is None:
                continue
            sup, qi = ep
            for name, pred in _variants(X[sup], yi[sup], X[qi], len(classes), k, tau_p).items():
                acc.setdefault((shots, name), []).append(100 * (pred == yi[qi]).mean())
    print(f"{store}: k={k} tau_p={tau_p}, {seeds} validation seeds, group={group}")
    for shots in shots_list:
        base = np.array(acc[(shots, "calm")])
        print(f"  shots {shots}")
        for (s, name), values in acc.items():
            if s != shots:
                continue
            a = np.array(values)
            d = a - base
            h = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
            print(
                f"    {name:12s} {a.mean():6.2f} ± {a.std(ddof=1):5.2f}  - calm {d.mean():+6.2f} "
                f"[{d.mean() - h:+.2f}, {d.mean() + h:+.2f}]"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("store", help="a feature store folder (calm extract --out)")
    parser.add_argument("--group", default="speaker", help="meta column of held-out groups, or 'random'")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--k", type=float, default=0.25, help="fraction of heads kept")
    parser.add_argument("--tau-p", type=float, nargs="+", default=[0.03])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for tau_p in args.tau_p:
        run(args.store, args.group, [int(s) for s in args.shots.split(",")], args.seeds, args.k, tau_p)


if __name__ == "__main__":
    main()
