"""Figure data helpers (hand-checked) and every figure written as a valid PNG."""

from __future__ import annotations

import numpy as np
import pytest

from calm import figures


def is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 1000


def test_survival_curves_hand_checked():
    w = np.array([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    s = figures.survival_curves(w, np.array([0.0, 0.2, 0.25, 0.4, 0.5]))
    assert s.tolist() == [[0.75, 0.5, 0.5, 0.25, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]]


def test_top_head_counts_hand_checked():
    w1 = np.array([[0.1, 0.9, 0.0], [0.2, 0.3, 0.5]])
    w2 = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    assert figures.top_head_counts([w1, w2], 3).tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="expected 4"):
        figures.top_head_counts([w1], 4)


def _sweep():
    rows = []
    for method in ("calm", "calm-global"):
        for shots in (1, 5):
            for f, k in ((0.1, 2), (0.5, 10), (1.0, 20)):
                rows.append(
                    {
                        "method": method,
                        "shots": shots,
                        "metric": "accuracy",
                        "mean": 50 + 10 * f + shots,
                        "std": 2.0,
                        "n_seeds": 2,
                        "k": k,
                        "fraction": f,
                    }
                )
    return rows


def test_every_figure_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(20), size=4)
    heads = [
        (layer, head, source)
        for source in ("encoder", "decoder_cross")
        for layer in range(2)
        for head in range(5)
    ]
    summary = [
        {"method": m, "shots": n, "metric": "accuracy", "mean": 60.0 + n, "std": 1.0, "n_seeds": 3}
        for m in ("sav", "calm")
        for n in (1, 5, 10)
    ]
    results = {
        "config": {"primary_metric": "accuracy"},
        "summary": summary,
        "analyses": {"k_sweep": _sweep()},
    }
    made = figures.make_figures(
        tmp_path,
        results,
        weights=w,
        classes=list("abcd"),
        counts=figures.top_head_counts([w], 20),
        head_names=heads,
    )
    assert sorted(made) == ["fig3", "fig4", "fig5", "fig6"]
    assert all(p.parent == tmp_path and is_png(p) for p in made.values())
    # without CALM fits or a sweep, only Fig. 5 (accuracy against shots) can be drawn
    only = figures.make_figures(tmp_path / "b", {"summary": summary})
    assert sorted(only) == ["fig5"] and is_png(only["fig5"])


def test_heatmap_checks_lengths(tmp_path):
    with pytest.raises(ValueError, match="3 counts for 2 head names"):
        figures.influential_heads(
            np.array([1, 2, 3]), [(0, 0, "decoder"), (0, 1, "decoder")], tmp_path / "x.png"
        )
