"""The results document: results.json (config, summary, runs, paired differences, analyses) and
results.md (the paper's Table 1 layout), built from run records and written to a run directory.

Values are percentages; summaries give mean and sample standard deviation over seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calm._files import atomic_write_text
from calm.evaluate.metrics import PRIMARY_METRIC
from calm.evaluate.openset_report import open_set_markdown
from calm.evaluate.predictions import Confusion, confusions, per_class_accuracy
from calm.evaluate.protocol import ProtocolResult
from calm.evaluate.reliability import reliability, reliability_markdown
from calm.evaluate.self_training_runs import st_summary, st_table
from calm.evaluate.skew import prediction_skew, skew_markdown
from calm.evaluate.summary import paired_differences, pseudo_label_summary, summarise
from calm.methods import REGISTRY

__all__ = [
    "METHOD_TITLES",
    "METRIC_TITLES",
    "build_results",
    "confusion_markdown",
    "per_class_markdown",
    "results_markdown",
    "write_json",
    "write_results",
]

METRIC_TITLES = {
    "accuracy": "accuracy (%)",
    "macro_f1": "macro-F1 (%)",
    "eer": "EER (%, lower is better)",
    "exact_match": "exact-match accuracy (%)",
    "question_accuracy": "question accuracy (%)",
    "map": "mAP (%)",
    "ece": "expected calibration error (%, 15 bins, lower is better)",
}


class _Titles(Mapping[str, str]):
    """method -> its title in tables, read from `calm.methods.REGISTRY` at each use (so a method
    registered after import has its title too)."""

    def __getitem__(self, name: str) -> str:
        return REGISTRY[name].title

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


#: method -> its title in tables (`calm.methods`)
METHOD_TITLES: Mapping[str, str] = _Titles()


def _metric_tables(summary: Sequence[Mapping], metrics: Sequence[str], model: str, data: str) -> list[str]:
    """One table per metric: rows model / dataset / shots, columns the methods, mean ± std."""
    methods = list(dict.fromkeys(s["method"] for s in summary))
    lookup = {(s["method"], s["shots"], s["metric"]): s for s in summary}
    shots = sorted({s["shots"] for s in summary})
    lines = []
    for metric in metrics:
        lines += [f"## {METRIC_TITLES.get(metric, metric)}", ""]
        lines.append(
            "| model | dataset | shots | " + " | ".join(METHOD_TITLES.get(m, m) for m in methods) + " |"
        )
        lines.append("|---|---|---|" + "---|" * len(methods))
        for n in shots:
            cells = []
            for m in methods:
                s = lookup.get((m, n, metric))
                cells.append("–" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f}")
            lines.append(f"| {model} | {data} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _paired_table(paired: Sequence[Mapping], primary: str) -> list[str]:
    if not paired:
        return []
    lines = [f"## Paired differences ({METRIC_TITLES.get(primary, primary)}, a - b, same support sets)", ""]
    lines += ["| shots | a | b | mean diff | 95 % interval |", "|---|---|---|---|---|"]
    for p in paired:
        ci = "–" if p["ci95_low"] is None else f"[{p['ci95_low']:+.2f}, {p['ci95_high']:+.2f}]"
        lines.append(
            f"| {p['shots']} | {METHOD_TITLES.get(p['a'], p['a'])} | "
            f"{METHOD_TITLES.get(p['b'], p['b'])} | {p['mean_diff']:+.2f} | {ci} |"
        )
    return lines + [""]


def _pseudo_label_table(pl: Sequence[Mapping]) -> list[str]:
    if not pl:
        return []
    lines = ["## Pseudo-labels (support of SAV+PL / CALM+PL; mean over episodes)", ""]
    lines.append("| shots | pool | kept | right among kept (%) | episodes with a class never kept |")
    lines.append("|---|---|---|---|---|")
    for r in pl:
        acc = "–" if r["label_accuracy_kept"] is None else f"{r['label_accuracy_kept']:.1f}"
        lines.append(
            f"| {r['shots']} | {r['pool']:.1f} | {r['kept']:.1f} | {acc} | "
            f"{r['episodes_missing_classes']} of {r['episodes']} |"
        )
    return lines + [""]


def _notes(results: Mapping[str, Any]) -> list[str]:
    """The zero-shot line, the warnings and the skipped methods."""
    lines = []
    zs = results.get("config", {}).get("zero_shot")
    if zs:
        lines.append(
            f"- zero-shot ({zs['mode']}): {zs['n_unparsed']} of {zs['clips']} answers named no class "
            "(counted wrong)"
        )
    lines += [f"- warning: {w}" for w in results.get("warnings", [])]
    lines += [f"- {m}: skipped ({why})" for m, why in results.get("skipped_methods", {}).items()]
    return lines


def results_markdown(results: Mapping[str, Any], confusions: Sequence[Confusion] = ()) -> str:
    """results.md: the paper's Table 1 layout (rows: model / dataset / shots; columns: methods), then,
    from the runs' predictions, confusion matrices and per-class accuracy."""
    cfg = results.get("config", {})
    summary = results["summary"]
    metrics = list(dict.fromkeys(s["metric"] for s in summary))
    primary = cfg.get("primary_metric", metrics[0] if metrics else "accuracy")
    metrics = [primary] + [m for m in metrics if m != primary]
    model, data = cfg.get("model", "?"), cfg.get("dataset", "?")
    lines = [f"# Results: {model} on {data}", ""]
    lines.append(
        f"Protocol: {cfg.get('protocol', '?')}; {cfg.get('n_seeds', '?')} seeds; mean ± std over seeds."
    )
    lines.append("")
    lines += _metric_tables(summary, metrics, model, data)
    lines += _paired_table([p for p in results.get("paired", []) if p["metric"] == primary], primary)
    lines += _pseudo_label_table(results.get("pseudo_label_summary", []))
    lines += st_table(results.get("self_training_summary", []))
    lines += open_set_markdown(results.get("open_set"))
    lines += reliability_markdown(results.get("reliability", []))
    lines += _notes(results)
    skew = skew_markdown(results.get("prediction_skew", []), METHOD_TITLES)
    tables = [t for t in (skew, confusion_markdown(confusions), per_class_markdown(confusions)) if t]
    return "\n".join(lines + [""] + tables).rstrip() + "\n"


MAX_MARKDOWN_CLASSES = 25  # wider matrices are left to figures/ and report.html


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def confusion_markdown(confs: Sequence[Confusion]) -> str:
    """One table per method and shot count: mean count over seeds with the row percentage."""
    if not confs:
        return ""
    lines = ["## Confusion matrices (rows true, columns predicted; mean count over seeds, row %)", ""]
    for conf in confs:
        title = METHOD_TITLES.get(conf.method, conf.method)
        lines += [f"### {title}, {conf.shots} shots ({len(conf.seeds)} seeds)", ""]
        if len(conf.classes) > MAX_MARKDOWN_CLASSES:
            lines += [f"{len(conf.classes)} classes: see report.html and figures/.", ""]
            continue
        cols = conf.classes + (["no answer"] if conf.has_no_answer else [])
        pct = conf.row_percent
        lines.append("| true \\ predicted | " + " | ".join(_cell(c) for c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for i, name in enumerate(conf.classes):
            cells = [f"{conf.counts[i, j]:.1f} ({pct[i, j]:.0f}%)" for j in range(len(cols))]
            lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def per_class_markdown(confs: Sequence[Confusion]) -> str:
    """Per shot count: rows classes, columns methods, accuracy mean ± std over seeds (%)."""
    if not confs:
        return ""
    lines = ["## Per-class accuracy (%, mean ± std over seeds)", ""]
    for shots in sorted({c.shots for c in confs}):
        group = [c for c in confs if c.shots == shots]
        stats = [per_class_accuracy(c) for c in group]
        lines += [f"### {shots} shots", ""]
        lines.append("| class | " + " | ".join(METHOD_TITLES.get(c.method, c.method) for c in group) + " |")
        lines.append("|---|" + "---|" * len(group))
        for j, name in enumerate(group[0].classes):
            cells = [
                "–" if not np.isfinite(mean[j]) else f"{mean[j]:.1f} ± {std[j]:.1f}" for mean, std in stats
            ]
            lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def build_results(
    result: ProtocolResult,
    config: Mapping[str, Any],
    *,
    confs: Sequence[Confusion] | None = None,
    **extra: Any,
) -> dict:
    """The results.json document: config, summary, runs, paired differences, the prediction skew of
    the runs' prediction records (`calm.evaluate.skew`), their reliability diagrams
    (`calm.evaluate.reliability`) and any extras. `confs`: the records' confusion matrices when the
    caller already has them (`confusions(result.predictions)`, computed here otherwise)."""
    primary = PRIMARY_METRIC[result.task]
    config = {
        **config,
        "task": result.task,
        "primary_metric": primary,
        "protocol": result.protocol,
        "classes": result.classes,
        "unit": "%",
    }
    pl = pseudo_label_summary(result.runs)
    st = st_summary(result.runs)
    if confs is None:
        confs = confusions(result.predictions) if result.predictions else []
    skew = prediction_skew(confs)
    rel = reliability(result.runs, result.predictions)
    return {
        "config": config,
        "summary": summarise(result.runs),
        "paired": paired_differences(result.runs),
        "runs": result.runs,
        **({"pseudo_label_summary": pl} if pl else {}),
        **({"self_training_summary": st} if st else {}),
        **({"prediction_skew": skew} if skew else {}),
        **({"reliability": rel} if rel else {}),
        **extra,
    }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, NumPy scalars -> Python, tuples -> lists, paths -> strings."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


def write_results(
    out_dir: str | Path, results: Mapping[str, Any], confusions: Sequence[Confusion] = ()
) -> tuple[Path, Path]:
    """Write results.json and results.md into out_dir (atomically); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "results.json"
    md = out_dir / "results.md"
    write_json(js, results)
    atomic_write_text(md, results_markdown(results, confusions))
    return js, md


def write_json(path: str | Path, results: Mapping[str, Any]) -> None:
    """Write `results` as JSON to `path` atomically: NaN / inf as null, NumPy values as Python."""
    atomic_write_text(Path(path), json.dumps(_clean(results), indent=1, allow_nan=False) + "\n")
