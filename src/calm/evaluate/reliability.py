"""Reliability diagrams: how far each method's top probability is from its accuracy, per method and
shot count, pooled over the seeds' queries; results.json's `reliability`, results.md's line and
report.html's figure.

Built from the prediction records (`calm.evaluate.predictions`: each query's predicted class and the
probability given it) of the runs whose scores are probabilities (those with an `ece` metric). Per
(method, shots), in results.json:

    {"method": "calm", "shots": 5, "n": 800,
     "ece_pooled": 2.61,             # % like the metrics: the ECE over every query of every seed
     "ece_episode": 8.5,             # % : the mean over episodes of the per-run `ece` metric
     "bins": [{"bin": 13, "confidence": 0.905, "accuracy": 0.88, "count": 61}, ...]}

`bins` are the non-empty ones of the ECE's 15 equal-width bins (`calm.evaluate.metrics.ECE_BINS`),
confidence and accuracy as fractions. Per episode, 80 queries in 15 bins give an ECE of several
points even when perfectly calibrated; the pooled value is the one to hold against a bar.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

import numpy as np

from calm.evaluate.metrics import ECE_BINS, calibration_bins, expected_calibration_error

__all__ = [
    "figure_html",
    "png_data",
    "png_html",
    "reliability",
    "reliability_figure",
    "reliability_markdown",
    "reliability_section",
]


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def reliability(runs: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]) -> list[dict]:
    """One entry per (method, shots) with an `ece` metric (schema in the module docstring), in
    the order the runs first name them."""
    episode: dict[tuple[str, int], list[float]] = {}
    for r in runs:
        if "ece" in r.get("metrics", {}):
            episode.setdefault((r["method"], int(r["shots"])), []).append(float(r["metrics"]["ece"]))
    pooled: dict[tuple[str, int], tuple[list[float], list[bool]]] = {}
    for rec in records:
        key = (rec["method"], int(rec["shots"]))
        if key not in episode:
            continue
        conf, right = pooled.setdefault(key, ([], []))
        for p, pred, true in zip(rec["p_pred"], rec["y_pred"], rec["y_true"], strict=True):
            if p is not None:
                conf.append(float(p))
                right.append(pred == true)
    out = []
    for key, (conf, right) in pooled.items():
        index, count, mean_conf, acc = calibration_bins(conf, right, ECE_BINS)
        out.append(
            {
                "method": key[0],
                "shots": key[1],
                "n": len(conf),
                "ece_pooled": _sig(100 * expected_calibration_error(conf, right, ECE_BINS)),
                "ece_episode": _sig(float(np.mean(episode[key]))),
                "bins": [
                    {"bin": int(b), "confidence": _sig(c), "accuracy": _sig(a), "count": int(n)}
                    for b, n, c, a in zip(index, count, mean_conf, acc, strict=True)
                ],
            }
        )
    return out


def reliability_markdown(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """results.md's lines: the pooled and per-episode ECE of each method and shot count."""
    if not entries:
        return []
    cells = [
        f"{e['method']} {e['shots']}-shot {e['ece_pooled']:.1f} / {e['ece_episode']:.1f}" for e in entries
    ]
    return [
        f"ECE (%, {ECE_BINS} bins; pooled over every query of every seed / mean per episode; "
        "reliability diagrams in results.json `reliability` and report.html): " + "; ".join(cells) + ".",
        "",
    ]


def reliability_figure(entries: Sequence[Mapping[str, Any]], titles: Mapping[str, str] | None = None) -> Any:
    """A matplotlib `Figure`: one panel per method, accuracy against mean confidence of each bin,
    one line per shot count (marker area: the bin's share of queries), the diagonal for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(e["method"] for e in entries))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods), 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        for e in (e for e in entries if e["method"] == method):
            conf = [b["confidence"] for b in e["bins"]]
            acc = [b["accuracy"] for b in e["bins"]]
            share = np.array([b["count"] for b in e["bins"]], dtype=float) / max(1, e["n"])
            line = ax.plot(conf, acc, lw=1.2, label=f"{e['shots']}-shot, ECE {e['ece_pooled']:.1f} %")[0]
            ax.scatter(conf, acc, s=8 + 240 * share, color=line.get_color(), alpha=0.7)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", aspect="equal")
        ax.set_title((titles or {}).get(method, method), fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    return fig


def png_data(fig: Any) -> str:
    """A figure as a base64 PNG (closed after), for an `<img src="data:image/png;base64,...">`."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_html(data: str, caption: str) -> str:
    """A base64 PNG embedded in report.html with its caption (escaped here)."""
    shown = escape(caption)
    image = f'<img alt="{shown}" src="data:image/png;base64,{data}">'
    return f"<figure>{image}<figcaption>{shown}</figcaption></figure>"


def figure_html(fig: Any, caption: str) -> str:
    """A figure embedded in report.html (base64 PNG) with its caption."""
    return png_html(png_data(fig), caption)


def reliability_section(results: Mapping[str, Any], titles: Mapping[str, str]) -> str:
    """report.html's reliability section ("" when the run has no probabilities)."""
    entries = results.get("reliability") or []
    if not entries:
        return ""
    caption = (
        f"Reliability: accuracy against confidence in {ECE_BINS} bins, pooled over seeds "
        "(dashed: perfect calibration; marker area: share of queries)"
    )
    rows = "".join(
        f"<tr><td class=l>{escape(titles.get(e['method'], e['method']))}</td><td>{e['shots']}</td>"
        f'<td data-method="{escape(e["method"])}" data-shots="{e["shots"]}">{e["ece_pooled"]:.2f}</td>'
        f"<td>{e['ece_episode']:.2f}</td><td>{e['n']}</td></tr>"
        for e in entries
    )
    return (
        '<h2 id="reliability">Calibration</h2>'
        '<table class="reliability"><tr><th>method</th><th>shots</th><th>ECE pooled (%)</th>'
        "<th>ECE per episode (%)</th>"
        f"<th>queries</th></tr>{rows}</table>" + figure_html(reliability_figure(entries, titles), caption)
    )
