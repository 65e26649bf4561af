"""Per-class numbers of the self-training runs in a `calm evaluate` results.json: clips added, share
right against the hidden labels, and query recall with / without self-training (mean over seeds).

    python research/selftraining_per_class.py runs/esc10-st/results.json --method calm+st --shots 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def per_class(doc: dict, method: str, shots: int) -> list[str]:
    runs = [r for r in doc["runs"] if r["method"] == method and r["shots"] == shots]
    if not runs:
        raise SystemExit(f"no {method} runs at {shots} shots")
    lines = [
        f"{method}, {shots} shots, {len(runs)} episodes",
        "",
        "| class | added | right (%) | recall with ST | recall without | difference |",
        "|---|---|---|---|---|---|",
    ]
    for c in runs[0]["self_training"]["per_class"]:
        v = [r["self_training"]["per_class"][c] for r in runs]
        added = sum(x["added"] for x in v)
        right = 100 * sum(x["right"] for x in v) / added if added else float("nan")
        with_st = np.mean([x["query_recall"] for x in v])
        without = np.mean([x["query_recall_without_st"] for x in v])
        cells = [f"{added / len(v):.1f}", f"{right:.1f}", f"{with_st:.1f}", f"{without:.1f}"]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {with_st - without:+.1f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--method", default="calm+st")
    ap.add_argument("--shots", type=int, required=True)
    args = ap.parse_args()
    print("\n".join(per_class(json.loads(args.results.read_text()), args.method, args.shots)))


if __name__ == "__main__":
    main()
