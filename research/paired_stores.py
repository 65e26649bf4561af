"""Paired per-seed comparison of two `calm evaluate` runs of the same clips on two feature stores
(e.g. float32 against bf16 extraction): checks that every episode drew the same support and query
clips in both (the protocol draws rows by seed; the stores must hold the same clips in the same
order), then prints, per method and shots, the mean of the per-seed differences B - A with a 95 %
t interval.

    python research/paired_stores.py STORE_A RUN_A STORE_B RUN_B [--test-fold 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from calm.evaluate.episodes import episodes, make_parts
from calm.store import load_features


def episode_paths(store: Path, config: dict, test_fold: str) -> dict[tuple[int, int, str], tuple]:
    """(shots, seed, part) -> (support paths, support labels, query paths) as drawn for `store`."""
    _, y, meta = load_features(store)
    parts, _ = make_parts(meta, int(test_fold) if test_fold.isdigit() else test_fold)
    paths = meta["path"].astype(str).to_numpy()
    out = {}
    for e in episodes(y, parts, config["shots"], config["seeds"]):
        out[(e.shots, e.seed, e.part)] = (
            tuple(paths[e.support]),
            tuple(e.support_y.tolist()),
            tuple(sorted(paths[e.query])),
        )
    return out


def accuracies(run: dict) -> dict[tuple[str, int, int], float]:
    return {
        (r["method"], r["shots"], r["seed"]): r["metrics"]["accuracy"] for r in run["runs"] if r.get("part")
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store_a", type=Path)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("store_b", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--test-fold", default="5")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    run_a = json.loads((args.run_a / "results.json").read_text())
    run_b = json.loads((args.run_b / "results.json").read_text())
    shots = sorted({r["shots"] for r in run_a["runs"]})
    seeds = sorted({r["seed"] for r in run_a["runs"]})
    config = {"shots": shots, "seeds": seeds}
    ep_a = episode_paths(args.store_a, config, args.test_fold)
    ep_b = episode_paths(args.store_b, config, args.test_fold)
    same = ep_a == ep_b
    print(f"{len(ep_a)} episodes; same support and query clips in both stores: {same}")
    if not same:
        raise SystemExit("the stores draw different episodes: a paired comparison is not valid")
    acc_a, acc_b = accuracies(run_a), accuracies(run_b)
    rows = []
    print(f"{'method':<14}{'shots':>6}{'A':>8}{'B':>8}{'B - A':>8}  95 % interval")
    for method in sorted({k[0] for k in acc_a}):
        for n in shots:
            keys = [(method, n, s) for s in seeds if (method, n, s) in acc_a and (method, n, s) in acc_b]
            d = np.array([acc_b[k] - acc_a[k] for k in keys])
            half = (
                float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0
            )
            row = {
                "method": method,
                "shots": n,
                "a": float(np.mean([acc_a[k] for k in keys])),
                "b": float(np.mean([acc_b[k] for k in keys])),
                "mean_diff": float(d.mean()),
                "ci95": [float(d.mean() - half), float(d.mean() + half)],
                "n_seeds": len(d),
            }
            rows.append(row)
            print(
                f"{method:<14}{n:>6}{row['a']:>8.2f}{row['b']:>8.2f}{row['mean_diff']:>+8.2f}"
                f"  [{row['ci95'][0]:+.2f}, {row['ci95'][1]:+.2f}]"
            )
    if args.json:
        args.json.write_text(json.dumps({"same_episodes": same, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
