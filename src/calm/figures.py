"""The paper's analyses as PNG figures (Fig. 3-6), drawn from arrays and `results.json` records.

- Fig. 3 `survival`: per class, the fraction of heads whose CALM weight exceeds w, against w, with
  dashed lines for uniform SAV voting over k heads (weight 1/k on k of K heads).
- Fig. 4 `conditional_vs_global`: CALM (class-conditional) and CALM-global accuracy against the
  number of heads kept.
- Fig. 5 `shots_and_heads`: accuracy against shots (every method, mean ± std over seeds) and CALM
  accuracy against the fraction of heads kept (one line per shots value).
- Fig. 6 `influential_heads`: layer x head heat map of how often each head is a class's most
  influential one (largest w_c^j), counted over classes and seeds; one panel per head source.
- `confusion_matrix_png`: a method's confusion matrix at one shot count (mean counts over seeds,
  coloured by row percentage); `calm evaluate` writes one per method and shot count.

Each figure has a `*_figure` function that takes plain data and returns the matplotlib `Figure`
(built without pyplot, so no global state and no display), and a function of the figure's name
that also takes a path, writes the PNG and returns the path; `make_figures` writes every figure
whose data is present.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calm.methods import REGISTRY, principal

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "survival_curves",
    "survival",
    "survival_figure",
    "conditional_vs_global",
    "conditional_vs_global_figure",
    "shots_and_heads",
    "shots_and_heads_figure",
    "top_head_counts",
    "influential_heads",
    "influential_heads_figure",
    "make_figures",
    "confusion_matrix_figure",
    "confusion_matrix_png",
    "confusion_pngs",
]

FIGURES = {
    "fig3": "fig3_weight_survival.png",
    "fig4": "fig4_conditional_vs_global.png",
    "fig5": "fig5_shots_and_heads.png",
    "fig6": "fig6_influential_heads.png",
}


def _new_figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _save(fig: Figure, path: Path) -> Path:
    """Render `fig` as PNG in memory, then write it atomically: a full disk (any OSError) names
    `path` and leaves no partial file."""
    import io

    from calm._files import atomic_write_bytes

    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def survival_curves(weights: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """S_c(w) = fraction of heads j with w_c^j > w, for each class c (rows) and grid value w (columns)."""
    weights = np.asarray(weights, dtype=np.float64)
    return (weights[:, :, None] > np.asarray(grid)[None, None, :]).mean(1)


def survival_figure(
    weights: np.ndarray,
    classes: Sequence[str],
    *,
    uniform_k: Sequence[int] | None = None,
    max_classes: int = 10,
    title: str = "",
) -> Figure:
    """Fig. 3: per-class weight survival functions (one line per class, the first `max_classes`),
    then one dashed uniform SAV voting line per k."""
    weights = np.asarray(weights, dtype=np.float64)
    n_classes, K = weights.shape
    if uniform_k is None:
        uniform_k = sorted({max(1, round(K * f)) for f in (0.1, 0.3, 0.5)} | {K})
    top = max(float(weights.max()), 1.0 / min(uniform_k)) * 1.05
    grid = np.linspace(0.0, top, 400)
    curves = survival_curves(weights, grid)
    fig = _new_figure((6.5, 4.2))
    ax = fig.subplots()
    for c in range(min(n_classes, max_classes)):
        ax.plot(grid, curves[c], lw=1.4, label=str(classes[c]))
    for k in uniform_k:
        ax.plot([0, 1.0 / k, 1.0 / k, top], [k / K, k / K, 0, 0], ls="--", color="grey", lw=1)
        ax.annotate(
            f"SAV k={k}",
            (1.0 / k, k / K),
            fontsize=7,
            color="grey",
            xytext=(3, 2),
            textcoords="offset points",
        )
    ax.set_xlabel("head weight w")
    ax.set_ylabel("fraction of heads with weight > w")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "Per-class head weight survival (CALM) vs uniform SAV voting")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    return fig


def survival(weights: np.ndarray, classes: Sequence[str], path: Path, **options: Any) -> Path:
    """Fig. 3 (`survival_figure`, same options) written as a PNG at `path`."""
    return _save(survival_figure(weights, classes, **options), path)


def conditional_vs_global_figure(
    sweep: Sequence[Mapping[str, Any]], *, shots: int | None = None, metric: str = "accuracy"
) -> Figure:
    """Fig. 4: class-conditional (CALM) vs global weighting, metric against the number of heads kept
    (one line per method, at `shots`, by default the largest in the sweep)."""
    rows = [r for r in sweep if r["metric"] == metric]
    if shots is None:
        shots = max(r["shots"] for r in rows)
    rows = [r for r in rows if r["shots"] == shots]
    fig = _new_figure((6, 4))
    ax = fig.subplots()
    swept = sorted((m for m in REGISTRY.values() if m.sweep), key=lambda m: not m.principal)
    for method in swept:
        assert method.sweep is not None
        rs = sorted((r for r in rows if r["method"] == method.name), key=lambda r: r["k"])
        if rs:
            k = np.array([r["k"] for r in rs])
            mean = np.array([r["mean"] for r in rs])
            std = np.array([r["std"] for r in rs])
            ax.plot(k, mean, method.sweep.line, label=method.sweep.label)
            ax.fill_between(k, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("heads kept (k)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"Class-conditional vs global weighting, {shots} shots")
    ax.legend()
    return fig


def conditional_vs_global(sweep: Sequence[Mapping[str, Any]], path: Path, **options: Any) -> Path:
    """Fig. 4 (`conditional_vs_global_figure`, same options) written as a PNG at `path`."""
    return _save(conditional_vs_global_figure(sweep, **options), path)


def shots_and_heads_figure(
    summary: Sequence[Mapping[str, Any]], sweep: Sequence[Mapping[str, Any]], *, metric: str = "accuracy"
) -> Figure:
    """Fig. 5: metric against shots (all methods) and CALM's metric against the fraction of heads kept."""
    fig = _new_figure((11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    rows = [s for s in summary if s["metric"] == metric]
    for method in dict.fromkeys(s["method"] for s in rows):
        rs = sorted((s for s in rows if s["method"] == method), key=lambda s: s["shots"])
        ax1.errorbar(
            [s["shots"] for s in rs],
            [s["mean"] for s in rs],
            yerr=[s["std"] for s in rs],
            marker="o",
            capsize=3,
            label=REGISTRY[method].title if method in REGISTRY else method,
        )
    ax1.set_xlabel("shots per class")
    ax1.set_ylabel(f"{metric} (%)")
    ax1.set_title("Accuracy against shots")
    ax1.legend(fontsize=8)
    main = principal()
    srows = [r for r in sweep if r["metric"] == metric and r["method"] == main.name]
    for n in sorted({r["shots"] for r in srows}):
        rs = sorted((r for r in srows if r["shots"] == n), key=lambda r: r["fraction"])
        ax2.plot([r["fraction"] for r in rs], [r["mean"] for r in rs], "-o", label=f"{main.title}, {n} shots")
    ax2.set_xlabel("fraction of heads kept")
    ax2.set_ylabel(f"{metric} (%)")
    ax2.set_title("Accuracy against the fraction of heads kept")
    if srows:
        ax2.legend(fontsize=8)
    return fig


def shots_and_heads(
    summary: Sequence[Mapping[str, Any]], sweep: Sequence[Mapping[str, Any]], path: Path, **options: Any
) -> Path:
    """Fig. 5 (`shots_and_heads_figure`, same options) written as a PNG at `path`."""
    return _save(shots_and_heads_figure(summary, sweep, **options), path)


def top_head_counts(weights: Sequence[np.ndarray], n_heads: int) -> np.ndarray:
    """How often each head is a class's most influential one (arg-max over heads of w_c), over fits."""
    counts = np.zeros(n_heads, dtype=np.int64)
    for w in weights:
        w = np.asarray(w)
        if w.shape[-1] != n_heads:
            raise ValueError(f"weights have {w.shape[-1]} heads, expected {n_heads}")
        np.add.at(counts, np.argmax(w.reshape(-1, n_heads), axis=1), 1)
    return counts


def influential_heads_figure(
    counts: np.ndarray, head_names: Sequence[Sequence[Any]], *, title: str = ""
) -> Figure:
    """Fig. 6: layer x head heat map of top-head counts (rows layers, columns heads), one panel per
    head source (`head_names` entries `(layer, head[, source])`, aligned with `counts`)."""
    counts = np.asarray(counts)
    names = [(int(h[0]), int(h[1]), str(h[2]) if len(h) > 2 else "decoder") for h in head_names]
    if len(names) != len(counts):
        raise ValueError(f"{len(counts)} counts for {len(names)} head names")
    sources = list(dict.fromkeys(s for _, _, s in names))
    fig = _new_figure((4 * len(sources) + 1, 4))
    axes = fig.subplots(1, len(sources), squeeze=False)
    vmax = max(int(counts.max()), 1)
    for ax, source in zip(axes[0], sources, strict=True):
        idx = [i for i, n in enumerate(names) if n[2] == source]
        layers = sorted({names[i][0] for i in idx})
        heads = sorted({names[i][1] for i in idx})
        grid = np.zeros((len(layers), len(heads)))
        for i in idx:
            grid[layers.index(names[i][0]), heads.index(names[i][1])] = counts[i]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(heads)), [str(h) for h in heads], fontsize=7)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(source)
    fig.colorbar(im, ax=axes[0].tolist(), label="times a class's most influential head")
    fig.suptitle(title or "Most influential head per class (CALM)")
    return fig


def influential_heads(
    counts: np.ndarray, head_names: Sequence[Sequence[Any]], path: Path, **options: Any
) -> Path:
    """Fig. 6 (`influential_heads_figure`, same options) written as a PNG at `path`."""
    return _save(influential_heads_figure(counts, head_names, **options), path)


def make_figures(
    out_dir: Path,
    results: Mapping[str, Any],
    *,
    weights: np.ndarray | None = None,
    classes: Sequence[str] | None = None,
    counts: np.ndarray | None = None,
    head_names: Sequence[Sequence[Any]] | None = None,
    confusions: Sequence[Any] = (),
) -> dict[str, Path]:
    """Draw every figure whose data is available (confusion matrices: `confusion_pngs`); returns
    {figure id: path}."""
    out_dir = Path(out_dir)
    metric = results.get("config", {}).get("primary_metric", "accuracy")
    sweep = results.get("analyses", {}).get("k_sweep", [])
    made: dict[str, Path] = {}
    if weights is not None and classes is not None:
        made["fig3"] = survival(weights, classes, out_dir / FIGURES["fig3"])
    if sweep:
        made["fig4"] = conditional_vs_global(sweep, out_dir / FIGURES["fig4"], metric=metric)
    if results.get("summary"):
        made["fig5"] = shots_and_heads(results["summary"], sweep, out_dir / FIGURES["fig5"], metric=metric)
    if counts is not None and head_names is not None:
        made["fig6"] = influential_heads(counts, head_names, out_dir / FIGURES["fig6"])
    made.update(confusion_pngs(out_dir, confusions))
    return made


def confusion_matrix_figure(
    counts: np.ndarray, classes: Sequence[str], *, title: str = "", no_answer: bool = False
) -> Figure:
    """A confusion matrix (rows true, columns predicted; mean counts over seeds, last column the
    queries with no answer when `no_answer`) coloured by row percentage; each non-empty cell is
    labelled with its count and percentage (labels left out above 30 classes)."""
    counts = np.asarray(counts, dtype=np.float64)
    cols = list(classes) + (["no answer"] if no_answer else [])
    counts = counts[:, : len(cols)]
    totals = counts.sum(1, keepdims=True)
    pct = np.divide(100 * counts, totals, out=np.zeros_like(counts), where=totals > 0)
    size = max(4.0, 0.42 * len(cols) + 2.5)
    fig = _new_figure((size + 1.2, size))
    ax = fig.subplots()
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), list(classes), fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(cols) <= 30:
        for i, j in np.ndindex(pct.shape):
            if counts[i, j]:
                text = f"{counts[i, j]:.1f}".removesuffix(".0") + f"\n{pct[i, j]:.0f}%"
                ink = "white" if pct[i, j] > 55 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color=ink)
    fig.colorbar(im, ax=ax, label="% of the true class", fraction=0.046)
    ax.set_title(title or "Confusion matrix (mean over seeds)")
    return fig


def confusion_matrix_png(counts: np.ndarray, classes: Sequence[str], path: Path, **options: Any) -> Path:
    """`confusion_matrix_figure` (same options) written as a PNG at `path`."""
    return _save(confusion_matrix_figure(counts, classes, **options), path)


def confusion_pngs(out_dir: Path, confusions: Sequence[Any]) -> dict[str, Path]:
    """One PNG per confusion matrix (objects with method, shots, classes, counts, has_no_answer, like
    `calm.evaluate.predictions.Confusion`): OUT/confusion_<method>_<shots>shots.png, keyed
    "confusion:<method>:<shots>"."""
    made = {}
    for c in confusions:
        path = Path(out_dir) / f"confusion_{c.method}_{c.shots}shots.png"
        title = f"{c.method}, {c.shots} shots: confusion matrix (mean over seeds)"
        made[f"confusion:{c.method}:{c.shots}"] = confusion_matrix_png(
            c.counts, c.classes, path, title=title, no_answer=c.has_no_answer
        )
    return made
