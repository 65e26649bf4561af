"""Figure data helpers (hand-checked), what each figure draws (axes, titles, plotted values read back
from the matplotlib objects), and every figure written as a valid PNG."""

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
                        "mean": 50 + 10 * f + shots + (0 if method == "calm" else -3),
                        "std": 2.0,
                        "n_seeds": 2,
                        "k": k,
                        "fraction": f,
                    }
                )
    return rows


def _summary():
    return [
        {
            "method": m,
            "shots": n,
            "metric": "accuracy",
            "mean": 60.0 + n + (5 if m == "calm" else 0),
            "std": 1.0,
        }
        for m in ("sav", "calm")
        for n in (1, 5, 10)
    ] + [{"method": "calm", "shots": 1, "metric": "macro_f1", "mean": 1.0, "std": 0.0}]


def test_survival_figure_plots_each_class_and_the_sav_lines():
    w = np.array([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    fig = figures.survival_figure(w, ["dog", "rain", "siren"], uniform_k=[1, 2], max_classes=2)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "head weight w"
    assert ax.get_ylabel() == "fraction of heads with weight > w"
    assert "survival" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dog", "rain"]  # max_classes=2
    lines = ax.get_lines()
    assert len(lines) == 2 + 2  # two classes, then one dashed line per k
    for c, line in enumerate(lines[:2]):
        x, y = line.get_xdata(), line.get_ydata()
        np.testing.assert_array_equal(y, figures.survival_curves(w, x)[c])
    assert lines[0].get_ydata()[0] == 0.75 and lines[1].get_ydata()[0] == 1.0  # w = 0
    top = lines[0].get_xdata()[-1]
    for k, line in zip([1, 2], lines[2:], strict=True):
        assert line.get_linestyle() == "--"
        np.testing.assert_allclose(line.get_xdata(), [0, 1 / k, 1 / k, top])
        np.testing.assert_allclose(line.get_ydata(), [k / 4, k / 4, 0, 0])
    assert [t.get_text() for t in ax.texts] == ["SAV k=1", "SAV k=2"]


def test_conditional_vs_global_figure_plots_the_sweep_at_the_largest_shots():
    fig = figures.conditional_vs_global_figure(_sweep())
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("heads kept (k)", "accuracy (%)")
    assert ax.get_title() == "Class-conditional vs global weighting, 5 shots"
    calm, glob = ax.get_lines()
    assert calm.get_label() == "class-conditional (CALM)" and glob.get_label() == "global (CALM-global)"
    np.testing.assert_array_equal(calm.get_xdata(), [2, 10, 20])
    np.testing.assert_allclose(calm.get_ydata(), [56, 60, 65])
    np.testing.assert_allclose(glob.get_ydata(), [53, 57, 62])
    one = figures.conditional_vs_global_figure(_sweep(), shots=1)
    np.testing.assert_allclose(one.axes[0].get_lines()[0].get_ydata(), [52, 56, 61])


def test_shots_and_heads_figure_plots_every_method_and_the_calm_fraction_sweep():
    fig = figures.shots_and_heads_figure(_summary(), _sweep())
    ax1, ax2 = fig.axes
    assert (ax1.get_xlabel(), ax1.get_ylabel()) == ("shots per class", "accuracy (%)")
    assert ax1.get_title() == "Accuracy against shots"
    bars = {c.get_label(): c for c in ax1.containers}
    assert list(bars) == [
        "SAV",
        "CALM",
    ]  # titles from calm.methods; the macro_f1 row is another metric: not drawn
    data_line = bars["CALM"].lines[0]
    np.testing.assert_array_equal(data_line.get_xdata(), [1, 5, 10])
    np.testing.assert_allclose(np.asarray(data_line.get_ydata(), dtype=float), [66, 70, 75])
    assert ax2.get_xlabel() == "fraction of heads kept"
    by_label = {line.get_label(): line for line in ax2.get_lines()}
    assert list(by_label) == ["CALM, 1 shots", "CALM, 5 shots"]  # CALM only, not CALM-global
    np.testing.assert_allclose(by_label["CALM, 1 shots"].get_xdata(), [0.1, 0.5, 1.0])
    np.testing.assert_allclose(by_label["CALM, 5 shots"].get_ydata(), [56, 60, 65])


def test_influential_heads_figure_lays_counts_out_by_layer_and_head():
    names = [(layer, head, src) for src in ("encoder", "decoder") for layer in range(2) for head in range(3)]
    counts = np.arange(12)
    fig = figures.influential_heads_figure(counts, names, title="top heads")
    enc, dec = fig.axes[:2]  # then the colour bar
    assert (enc.get_title(), dec.get_title()) == ("encoder", "decoder")
    assert (enc.get_xlabel(), enc.get_ylabel()) == ("head", "layer")
    np.testing.assert_array_equal(enc.get_images()[0].get_array(), [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(dec.get_images()[0].get_array(), [[6, 7, 8], [9, 10, 11]])
    assert [t.get_text() for t in enc.get_yticklabels()] == ["0", "1"]
    assert fig.get_suptitle() == "top heads"
    assert fig.axes[2].get_ylabel() == "times a class's most influential head"


def test_every_figure_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(20), size=4)
    heads = [
        (layer, head, source)
        for source in ("encoder", "decoder_cross")
        for layer in range(2)
        for head in range(5)
    ]
    results = {
        "config": {"primary_metric": "accuracy"},
        "summary": _summary(),
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
    assert all(p.parent == tmp_path and p.name == figures.FIGURES[k] and is_png(p) for k, p in made.items())
    # without CALM fits or a sweep, only Fig. 5 (accuracy against shots) can be drawn
    only = figures.make_figures(tmp_path / "b", {"summary": _summary()})
    assert sorted(only) == ["fig5"] and is_png(only["fig5"])


def test_heatmap_checks_lengths(tmp_path):
    with pytest.raises(ValueError, match="3 counts for 2 head names"):
        figures.influential_heads(
            np.array([1, 2, 3]), [(0, 0, "decoder"), (0, 1, "decoder")], tmp_path / "x.png"
        )
    assert not (tmp_path / "x.png").exists()
