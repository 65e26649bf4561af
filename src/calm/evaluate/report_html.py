"""report.html: one self-contained page per run directory (figures embedded, no network, no JavaScript).

Input: a `ReportData` -- the results.json document, the per-episode prediction records
(`calm.evaluate.predictions`), the audio file of each store row (for the players), the PNG figures to
embed and the command that reproduces the run. Sections, in order: the Table 1-style summary and
the paired differences; confusion matrices per method and shot count (mean counts over seeds and
row percentages); per-class accuracy with its spread over seeds and the classes CALM gains or loses
against SAV and the linear probe; the prediction skew (predicted against true counts per class,
`calm.evaluate.skew`); the misclassified test clips of one seed per method with an
`<audio>` player (links relative to the run directory, so the page works next to the data); the
open-set tables; calibration (ECE and reliability diagrams, `calm.evaluate.reliability`); the
per-class head maps (`calm.evaluate.head_maps`); the figures; the configuration and the command
(`SECTIONS`; `register_section` adds one). Light and dark colours follow prefers-color-scheme.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from html import escape
from pathlib import Path
from typing import Any

from calm.evaluate.config import ClassifierSpec, EvalConfig
from calm.evaluate.head_maps import head_map_section
from calm.evaluate.openset_html import open_set_section
from calm.evaluate.predictions import Confusion, confusions
from calm.evaluate.reliability import png_html, reliability_section
from calm.evaluate.report_sections import (
    confusion_section,
    method_title,
    misclassified_section,
    per_class_section,
    skew_section,
    table,
)
from calm.evaluate.reports import METHOD_TITLES, METRIC_TITLES
from calm.evaluate.skew import prediction_skew
from calm.methods import REGISTRY
from calm.models import DEFAULT_MODEL
from calm.models.spec import LoadSpec

__all__ = [
    "SECTIONS",
    "ReportContext",
    "ReportData",
    "ReportSection",
    "recorded_config",
    "register_section",
    "render_report",
    "reproduce_command",
    "write_report",
]

CLASSIFIER_FIELDS = {f.name for f in fields(ClassifierSpec)}

FIGURE_CAPTIONS = {
    "fig3": "Fig. 3: per-class head weight survival (CALM) against uniform SAV voting",
    "fig4": "Fig. 4: class-conditional (CALM) against global (CALM-global) weighting",
    "fig5": "Fig. 5: accuracy against shots, and against the fraction of heads kept",
    "fig6": "Fig. 6: most influential head per class",
}
CSS = """
:root{color-scheme:light dark;--bg:#fff;--fg:#1b1f24;--muted:#57606a;--line:#d0d7de;--card:#f3f5f7;
--good:#1a7f37;--bad:#cf222e;--heat:37,99,235}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--fg:#e6edf3;--muted:#9da7b3;--line:#3d444d;
--card:#161b22;--good:#3fb950;--bad:#ff7b72;--heat:56,139,253}}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;background:var(--bg);color:var(--fg);
max-width:1200px;margin:0 auto;padding:20px 28px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:16px 0 4px}.muted{color:var(--muted)}
table{border-collapse:collapse;margin:6px 0 14px}th,td{border:1px solid var(--line);padding:3px 8px;
text-align:right;vertical-align:middle}th{background:var(--card);font-weight:600}.l{text-align:left}
td.best{font-weight:700}.pos{color:var(--good)}.neg{color:var(--bad)}
table.cm td{text-align:center;min-width:3.3em;line-height:1.15}table.cm small{display:block;opacity:.85}
table.cm td.z{opacity:.4}.grid{display:flex;flex-wrap:wrap;gap:6px 22px}.card h3{margin:8px 0 2px}
table.cm th.rot{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;max-height:9em}
details{border:1px solid var(--line);border-radius:6px;padding:4px 12px;margin:6px 0}
summary{cursor:pointer;font-weight:600}figure{margin:12px 0}figcaption{color:var(--muted)}
img{max-width:100%;background:#fff;border-radius:6px;padding:4px}
pre{background:var(--card);padding:10px;overflow-x:auto;border-radius:6px}pre.cmd{white-space:pre-wrap}audio{height:30px;width:240px}
"""


@dataclass
class ReportData:
    """What report.html shows.

    results: the results.json document (config, summary, paired, runs, analyses, warnings).
    predictions: per-episode prediction records (schema in `calm.evaluate.predictions`); empty = the
      confusion, per-class and misclassified sections say that the run kept none.
    clip_paths: audio file of each store row (`query` indices point here); empty = no players.
    figures: figure id ("fig3" ...) -> PNG file, embedded as base64.
    command: the command line that reproduces the run.
    confusions: the prediction records' confusion matrices when the caller has them already
      (`calm.evaluate.predictions.confusions`; None: computed from `predictions`).
    """

    results: Mapping[str, Any]
    predictions: Sequence[Mapping[str, Any]] = ()
    clip_paths: Sequence[str] = ()
    figures: Mapping[str, Path] = field(default_factory=dict)
    command: str | None = None
    confusions: Sequence[Confusion] | None = None


def summary_section(results: Mapping[str, Any]) -> str:
    """Table 1 layout: one table per metric, rows = shots, columns = methods (mean ± std over seeds)."""
    cfg, summary = results.get("config", {}), results.get("summary", [])
    methods = list(dict.fromkeys(s["method"] for s in summary))
    metrics = list(dict.fromkeys(s["metric"] for s in summary))
    primary = cfg.get("primary_metric", metrics[0] if metrics else "accuracy")
    metrics = [primary] + [m for m in metrics if m != primary]
    lookup = {(s["method"], s["shots"], s["metric"]): s for s in summary}
    out = ['<h2 id="summary">Summary</h2>']
    out.append(
        f'<p class="muted">Protocol: {escape(str(cfg.get("protocol", "?")))}; '
        f"{escape(str(cfg.get('n_seeds', '?')))} seeds; mean ± sample std over seeds (%).</p>"
    )
    for metric in metrics:
        out.append(f"<h3>{escape(METRIC_TITLES.get(metric, metric))}</h3>")
        rows = []
        for n in sorted({s["shots"] for s in summary}):
            present = [lookup[m, n, metric]["mean"] for m in methods if (m, n, metric) in lookup]
            best = (min if metric == "eer" else max)(present) if present else None
            row = [f'<td class="l">{n}</td>']
            for m in methods:
                s = lookup.get((m, n, metric))
                text = "–" if s is None else f"{s['mean']:.2f} ± {s['std']:.2f}"
                mark = ' class="best"' if s is not None and s["mean"] == best else ""
                row.append(
                    f'<td{mark} data-method="{escape(m)}" data-shots="{n}" data-metric="{metric}">{text}</td>'
                )
            rows.append(row)
        out.append(table(['<th class="l">shots</th>', *(method_title(m) for m in methods)], rows, "summary"))
    return "\n".join(out)


def paired_section(results: Mapping[str, Any]) -> str:
    cfg = results.get("config", {})
    primary = cfg.get("primary_metric", "accuracy")
    paired = [p for p in results.get("paired", []) if p["metric"] == primary]
    if not paired:
        return ""
    rows = []
    for p in paired:
        low, high = p["ci95_low"], p["ci95_high"]
        ci = "–" if low is None else f"[{low:+.2f}, {high:+.2f}]"
        sign = "" if low is None or low <= 0 <= high else (' class="pos"' if low > 0 else ' class="neg"')
        attrs = f'data-a="{escape(p["a"])}" data-b="{escape(p["b"])}" data-shots="{p["shots"]}"'
        rows.append(
            [
                str(p["shots"]),
                f'<td class="l">{method_title(p["a"])}</td>',
                f'<td class="l">{method_title(p["b"])}</td>',
            ]
            + [f"<td{sign} {attrs}>{p['mean_diff']:+.2f}</td>", f"<td{sign}>{ci}</td>", str(p["n_seeds"])]
        )
    head = ["shots", '<th class="l">a</th>', '<th class="l">b</th>', "mean a − b", "95 % interval", "seeds"]
    title = escape(METRIC_TITLES.get(primary, primary))
    return (
        f'<h2 id="paired">Paired differences</h2><p class="muted">{title}: per-seed differences on the '
        "same support sets, mean with a 95 % Student-t interval; coloured where it excludes 0.</p>"
        + table(head, rows, "paired")
    )


def figures_section(figures: Mapping[str, Path]) -> str:
    shown = [(k, Path(p)) for k, p in figures.items() if Path(p).is_file()]
    if not shown:
        return ""
    out = ['<h2 id="figures">Figures</h2>']
    for key, path in shown:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        out.append(png_html(data, FIGURE_CAPTIONS.get(key, path.stem)))
    return "\n".join(out)


def reproduce_command(config: Mapping[str, Any], run_dir: str | Path = "RUN_DIR") -> str:
    """The `calm evaluate` command line of a run from its results.json `config`: the `command`
    recorded there (`EvalConfig.command()`), or for runs recorded before it, the command of the
    `EvalConfig` its fields describe (`recorded_config`)."""
    if config.get("command"):
        return str(config["command"])
    return recorded_config(config, run_dir).command()


def recorded_config(config: Mapping[str, Any], run_dir: str | Path = "RUN_DIR") -> EvalConfig:
    """The `EvalConfig` of a results.json `config` (data or store, protocol, the classifier options
    read back through each method's parameters in `calm.methods`), writing to `run_dir`."""
    spec: dict[str, Any] = {}
    for name, params in (config.get("defaults") or {}).items():
        method = REGISTRY.get(name)
        if method is None or method.kind != "few-shot":
            continue
        spec |= {f: params[p] for p, f in method.params.items() if p in params and f in CLASSIFIER_FIELDS}
    if "sav_k" in spec and spec["sav_k"] == spec.get("k", ClassifierSpec.k):
        del spec["sav_k"]
    features = config.get("features")
    return EvalConfig(
        out=run_dir,
        data=None if features else config.get("dataset"),
        features=features or None,
        model=LoadSpec(str(config.get("model") or DEFAULT_MODEL)),
        shots=config.get("shots") or EvalConfig.shots,
        seeds=config.get("seeds") or EvalConfig.seeds,
        methods=[m for m in config.get("methods", EvalConfig.methods) if m in REGISTRY],
        test_fold=config.get("test_fold", EvalConfig.test_fold),
        holdout=config.get("holdout"),
        tune=bool(config.get("tune")),
        classifier=ClassifierSpec(**spec),
    )


def config_section(results: Mapping[str, Any], command: str) -> str:
    cfg = results.get("config", {})
    notes = [f"<li>warning: {escape(str(w))}</li>" for w in results.get("warnings", [])]
    notes += [
        f"<li>{method_title(m)}: skipped ({escape(str(w))})</li>"
        for m, w in results.get("skipped_methods", {}).items()
    ]
    return (
        '<h2 id="config">Configuration</h2><h3>Command that reproduces this run</h3>'
        f'<pre class="cmd"><code>{escape(command)}</code></pre>'
        + (f"<ul>{''.join(notes)}</ul>" if notes else "")
        + "<details><summary>config (results.json)</summary>"
        + f"<pre>{escape(json.dumps(cfg, indent=1, default=str))}</pre></details>"
    )


@dataclass(frozen=True)
class ReportContext:
    """What a section renders from: the report's data, the run folder (links are relative to it),
    the confusion matrices of the prediction records, the command that reproduces the run and the
    prediction skew (results.json's `prediction_skew`, `calm.evaluate.skew`)."""

    data: ReportData
    run_dir: Path
    confusions: Sequence[Confusion]
    command: str
    skew: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class ReportSection:
    """One section of report.html: its anchor (`<h2 id=...>`), its link in the page's navigation
    line, and `render(context) -> HTML` ("" leaves the section out)."""

    anchor: str
    nav: str
    render: Callable[[ReportContext], str]


#: The page's sections, in order; `register_section` adds one.
SECTIONS: list[ReportSection] = [
    ReportSection("summary", "summary", lambda c: summary_section(c.data.results)),
    ReportSection("paired", "paired", lambda c: paired_section(c.data.results)),
    ReportSection("confusion", "confusion", lambda c: confusion_section(c.confusions)),
    ReportSection("per-class", "per class", lambda c: per_class_section(c.confusions)),
    ReportSection("skew", "prediction skew", lambda c: skew_section(c.skew)),
    ReportSection(
        "misclassified",
        "misclassified",
        lambda c: misclassified_section(c.data.predictions, c.data.clip_paths, c.run_dir, c.confusions),
    ),
    ReportSection("open-set", "open set", lambda c: open_set_section(c.data.results)),
    ReportSection("reliability", "calibration", lambda c: reliability_section(c.data.results, METHOD_TITLES)),
    ReportSection("head-maps", "head maps", lambda c: head_map_section(c.data.results, METHOD_TITLES)),
    ReportSection("figures", "figures", lambda c: figures_section(c.data.figures)),
    ReportSection("config", "config", lambda c: config_section(c.data.results, c.command)),
]


def register_section(section: ReportSection, *, before: str = "figures") -> ReportSection:
    """Add `section` to every report written from now on, before the section anchored `before`
    (a new anchor: ValueError when it is taken or `before` does not exist)."""
    anchors = [s.anchor for s in SECTIONS]
    if section.anchor in anchors:
        raise ValueError(f"report.html already has a section {section.anchor!r}")
    if before not in anchors:
        raise ValueError(f"no report section {before!r}; the sections are {', '.join(anchors)}")
    SECTIONS.insert(anchors.index(before), section)
    return section


def render_report(data: ReportData, run_dir: str | Path) -> str:
    """The report page as one HTML string (links relative to `run_dir`)."""
    run_dir = Path(run_dir).resolve()
    cfg = data.results.get("config", {})
    confs = data.confusions
    if confs is None:
        confs = confusions(data.predictions) if data.predictions else []
    skew = data.results.get("prediction_skew") or prediction_skew(confs)  # a document without it
    title = f"{cfg.get('model', '?')} on {cfg.get('dataset', '?')}"
    command = data.command or reproduce_command(cfg, run_dir)
    context = ReportContext(data, run_dir, confs, command, skew)
    nav = " · ".join(f'<a href="#{s.anchor}">{escape(s.nav)}</a>' for s in SECTIONS)
    body = [
        f"<h1>Results: {escape(title)}</h1>",
        f'<p class="muted">{escape(str(cfg.get("package", "calm-audio")))} '
        f"{escape(str(cfg.get('version', '')))} · {escape(str(cfg.get('n_clips', '?')))} clips · "
        f"{len(cfg.get('classes', []))} classes · {nav}</p>",
        *(section.render(context) for section in SECTIONS),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>calm: {escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(b for b in body if b)
        + "\n</body></html>\n"
    )


def write_report(data: ReportData, run_dir: str | Path, name: str = "report.html") -> Path:
    """Write RUN_DIR/report.html atomically; returns its path."""
    from calm._files import atomic_write_text

    path = Path(run_dir) / name
    atomic_write_text(path, render_report(data, run_dir))
    path.chmod(0o644)  # a page to share, like results.json (the atomic write leaves 0600)
    return path
