"""The detection evaluation's results.md and report.html (`calm.evaluate.detection_eval`'s document):
the mean ± std of every metric per method, the paired per-seed differences full - naive with their
95 % intervals, the per-seed values and the settings; the pieces are `calm evaluate`'s (its metric
tables, table helper and page style)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from calm.evaluate.openset_report import markdown_table
from calm.evaluate.sed_metrics import METRICS, OFFSET_LENGTH, SEGMENT, T_COLLAR

__all__ = ["detection_html", "detection_markdown", "paired_rows", "seed_rows", "write_detection_outputs"]

METHOD_NOTES = {
    "full": "calm detect's decision: median filter, threshold, background class never reported",
    "naive": "per-window argmax of the raw probabilities: no smoothing, no threshold",
}


def _folds(folds: Sequence[int]) -> str:
    return ", ".join(str(f) for f in folds) or "?"


def protocol_note(cfg: Mapping[str, Any]) -> str:
    """One paragraph: what was evaluated, on what, and how it was scored."""
    spec = cfg.get("soundscape", {})
    return (
        f"{cfg.get('n_seeds', '?')} seeds × {cfg.get('soundscapes', '?')} soundscapes of "
        f"{spec.get('duration', '?')} s; events: {', '.join(cfg.get('classes', []))} (fold "
        f"{cfg.get('test_fold', '?')}); backgrounds: {', '.join(cfg.get('backgrounds', []))} (fold "
        f"{cfg.get('background_fold', '?')}); {cfg.get('shots', '?')} support clips per class and of "
        f"'{cfg.get('background_label', '?')}' from folds {_folds(cfg.get('support_folds', ()))}; model "
        f"{cfg.get('model', '?')} {cfg.get('model_options') or ''}, method {cfg.get('method', '?')}; "
        f"window {cfg.get('window')} s, hop {cfg.get('hop')} s, median {cfg.get('median')}, threshold "
        f"{cfg.get('threshold')}. Scored with sed_eval: event-based onset collar {T_COLLAR} s, offset "
        f"collar max({T_COLLAR} s, {OFFSET_LENGTH:.0%} of the event), segments of {SEGMENT:g} s; "
        "micro-averaged over each seed's soundscapes; mean ± sample std over seeds."
    )


def summary_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per method, mean ± std over seeds of each metric."""
    lookup = {(s["method"], s["metric"]): s for s in results.get("summary", [])}
    methods = list(dict.fromkeys(s["method"] for s in results.get("summary", [])))
    rows = []
    for m in methods:
        cells = [m, METHOD_NOTES.get(m, "")]
        for metric in METRICS:
            s = lookup.get((m, metric))
            cells.append("–" if s is None else f"{s['mean']:.1f} ± {s['std']:.1f}")
        rows.append(cells)
    return ["method", "what", *METRICS.values()], rows


def paired_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per metric, the mean per-seed difference a - b and its 95 % interval."""
    rows = []
    for p in results.get("paired", []):
        low, high = p["ci95_low"], p["ci95_high"]
        ci = "–" if low is None else f"[{low:+.2f}, {high:+.2f}]"
        excludes = "–" if low is None else ("yes" if low > 0 or high < 0 else "no")
        title = METRICS.get(p["metric"], p["metric"])
        rows.append(
            [title, f"{p['a']} − {p['b']}", f"{p['mean_diff']:+.2f}", ci, excludes, str(p["n_seeds"])]
        )
    return ["metric", "difference", "mean", "95 % interval", "excludes 0", "seeds"], rows


def seed_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): every seed's metrics per method, with the event counts."""
    rows = []
    for r in results.get("runs", []):
        cells = [str(r["seed"]), r["method"]]
        cells += ["–" if r["metrics"].get(m) is None else f"{r['metrics'][m]:.1f}" for m in METRICS]
        rows.append(cells + [f"{r['n_events']} / {r['n_reference']}"])
    return ["seed", "method", *METRICS.values(), "events detected / reference"], rows


def detection_markdown(results: Mapping[str, Any]) -> str:
    """results.md."""
    cfg = results.get("config", {})
    lines = [f"# Detection results: {cfg.get('model', '?')} on {cfg.get('dataset', '?')}", ""]
    lines += [protocol_note(cfg), ""]
    lines += ["## Mean ± std over seeds", "", *markdown_table(*summary_rows(results))]
    lines += ["## Paired per-seed differences (same support sets and soundscapes)", ""]
    lines += markdown_table(*paired_rows(results))
    lines += ["## Per seed", "", *markdown_table(*seed_rows(results))]
    if results.get("command"):
        lines += ["## Command", "", "```", str(results["command"]), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: str) -> str:
    from calm.evaluate.report_sections import table

    return table([escape(h) for h in head], [[escape(c) for c in r] for r in rows], cls)


def detection_html(results: Mapping[str, Any]) -> str:
    """report.html: one self-contained page (no network, no JavaScript), `calm evaluate`'s style."""
    from calm.evaluate.report_html import CSS

    cfg = results.get("config", {})
    title = f"{cfg.get('model', '?')} on {cfg.get('dataset', '?')}"
    settings = json.dumps(cfg, indent=1, default=str)
    body = [
        f"<h1>Detection results: {escape(title)}</h1>",
        f'<p class="muted">{escape(cfg.get("package", ""))} {escape(str(cfg.get("version", "")))}</p>',
        f'<h2 id="summary">Summary</h2><p class="muted">{escape(protocol_note(cfg))}</p>',
        _html_table(*summary_rows(results), "summary"),
        '<h2 id="paired">Paired differences</h2><p class="muted">Per-seed differences on the same '
        "support sets and soundscapes, mean with a 95 % Student-t interval.</p>",
        _html_table(*paired_rows(results), "paired"),
        '<h2 id="seeds">Per seed</h2>',
        _html_table(*seed_rows(results), "seeds"),
        '<h2 id="config">Configuration</h2>',
        f'<pre class="cmd">{escape(str(results.get("command") or ""))}</pre>',
        f"<details><summary>settings</summary><pre>{escape(settings)}</pre></details>",
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>calm: detection, {escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_detection_outputs(out_dir: str | Path, results: Mapping[str, Any]) -> dict[str, Path]:
    """Write results.json, results.md and report.html into `out_dir` (atomically); their paths."""
    from calm._files import atomic_write_text
    from calm.evaluate.reports import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "html": out / "report.html"}
    write_json(paths["json"], results)
    atomic_write_text(paths["md"], detection_markdown(results))
    atomic_write_text(paths["html"], detection_html(results))
    for path in paths.values():
        path.chmod(0o644)
    return paths
