"""`run_evaluation`: the whole of `calm evaluate` as one library call. Features are extracted into a
store (or read from one), the few-shot protocol and the heads-kept sweep run, the model-answer
baselines run when the model can answer, and results.json / results.md / figures/ (Fig. 3-6 and a
confusion matrix per method and shot count), predictions.jsonl and report.html are written.

Progress is reported through `progress(stage, done, total)` (total None when unknown) and lines
worth showing through `log(text)`; both are optional, nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calm import methods
from calm.evaluate.config import EvalConfig
from calm.evaluate.episodes import ProtocolError, holdout_split, make_parts, row_labels
from calm.evaluate.estimators import LALM_METHODS, PL_BASES, Method
from calm.evaluate.head_maps import head_map_analyses
from calm.evaluate.lalm_runs import lalm_runs, select_lalm
from calm.evaluate.openset import open_set_results, open_set_unknowns
from calm.evaluate.predictions import confusions
from calm.evaluate.protocol import SWEEP_FRACTIONS, ProtocolResult, k_sweep, run_protocol
from calm.evaluate.records import order_runs
from calm.evaluate.reports import build_results, results_markdown, write_results
from calm.evaluate.self_training_runs import ST_BASES, ST_METHODS, run_st_protocol
from calm.models.base import FeatureExtractor

__all__ = ["EvaluationResult", "EvalFeatures", "Progress", "load_evaluation_features", "run_evaluation"]

Progress = Callable[[str, int, int | None], None]  # (stage, done, total or None)
Log = Callable[[str], None]


@dataclass
class EvalFeatures:
    """The arrays evaluated (`load_features`), the extractor when one was loaded, and what the
    extraction did (None with an existing store)."""

    X: Any
    y: np.ndarray
    meta: pd.DataFrame
    extractor: FeatureExtractor | None = None
    extraction: dict | None = None


@dataclass
class EvaluationResult:
    """What `run_evaluation` produced.

    Attributes:
        results: the results.json document (config, summary, paired, runs, analyses, ...).
        markdown: results.md (the table `calm evaluate` prints).
        results_json, results_md: where they were written.
        figures: figure name -> PNG path (empty without figures).
        protocol: the few-shot protocol's result (runs, and the fitted classifiers behind the figures).
        warnings: what some episodes could not do (pseudo-label classes never kept).
        skipped: method -> why it was not run.
        report_html: RUN_DIR/report.html (predictions of the few-shot runs: RUN_DIR/predictions.jsonl,
            `protocol.predictions`).
    """

    results: dict
    markdown: str
    results_json: Path
    results_md: Path
    figures: dict[str, Path] = field(default_factory=dict)
    protocol: ProtocolResult | None = None
    warnings: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    report_html: Path | None = None

    @property
    def summary(self) -> list[dict]:
        """Mean and std over seeds per (method, shots, metric)."""
        return self.results["summary"]


def _extraction_events(progress: Progress | None) -> Callable[[Any], None] | None:
    """The store's `ExtractProgress` events as `progress("extracting", done, total)` calls."""
    if progress is None:
        return None

    def on_event(event: Any) -> None:
        progress("extracting", event.done, event.total)

    return on_event


def _features_from_data(config: EvalConfig, progress: Progress | None, log: Log) -> EvalFeatures:
    """Extract `config.data` into the store (resuming), and read back the dataset's rows."""
    from calm.data import load_dataset
    from calm.models import load_extractor
    from calm.store import extract_to_store, load_features, store_path

    out = Path(config.out)
    store = Path(config.store) if config.store is not None else out / "features"
    dataset = load_dataset(str(config.data))
    log(f"dataset {config.data}: {len(dataset.clips)} clips, {len(dataset.classes)} classes")
    events = _extraction_events(progress)
    if config.ray is None:
        extractor = load_extractor(config.model)
        log(f"model {config.model.label}: {len(extractor.head_names)} heads; feature store {store}")
        report = extract_to_store(extractor, dataset, store, batch_size=config.batch_size, progress=events)
    else:
        extractor, report = _extract_on_ray(config, dataset, store, events, log)
    log(report.summary())
    X, y, meta = load_features(store, key=report.digest)
    wanted = {store_path(c.path) for c in dataset.clips}  # the store's own path normalisation
    keep = meta["path"].astype(str).isin(wanted).to_numpy()
    if not keep.all():  # the store may hold other clips extracted with the same key
        rows = np.flatnonzero(keep)
        X, y = X[rows], np.asarray(y)[rows]
        attrs = dict(meta.attrs)
        meta = meta[keep].reset_index(drop=True)
        meta.attrs.update(attrs)
    extraction = {
        "stored": report.stored,
        "skipped": report.skipped,
        "failed": [{"path": p, "reason": r} for p, r in report.failed],
        "seconds": round(report.seconds, 1),
        "digest": report.digest,
    }
    return EvalFeatures(X, np.asarray(y), meta, extractor, extraction)


def _extract_on_ray(config: EvalConfig, dataset: Any, store: Path, events: Any, log: Log) -> tuple[Any, Any]:
    """(the extractor when the model-answer baselines need it here, else None; the extraction
    report) of `dataset` extracted on the Ray cluster `config.ray`."""
    from calm.models import load_extractor
    from calm.store.distributed import extract_with_ray

    model, opts = config.model, config.ray
    assert opts is not None
    answers = any(m in LALM_METHODS for m in config.methods)
    extractor = load_extractor(model) if answers else None
    log(f"model {model.label}: extracting on Ray ({opts.address or 'local cluster'}); feature store {store}")
    report = extract_with_ray(
        model,
        dataset,
        store,
        options=opts,
        batch_size=config.batch_size,
        progress=events,
        extractor=extractor,
    )
    return extractor, report


def load_evaluation_features(
    config: EvalConfig, progress: Progress | None = None, log: Log | None = None
) -> EvalFeatures:
    """The features `config` evaluates: its `features` store, or `data` extracted with its model."""
    if config.features is not None:
        from calm.store import load_features

        X, y, meta = load_features(config.features, key=config.key)
        return EvalFeatures(X, np.asarray(y), meta)
    return _features_from_data(config, progress, log or (lambda _: None))


def _require_two_classes(y: np.ndarray, source: Any) -> None:
    """ProtocolError naming ``source`` when its clips carry fewer than two classes."""
    classes = sorted({label for labels in row_labels(y) for label in labels})
    if len(classes) < 2:
        raise ProtocolError(
            f"{source}: {len(classes)} class(es) {classes[:3]}; few-shot classification needs at least two"
        )


def _counter(progress: Progress | None, stage: str, total: int | None) -> Callable[[str], None] | None:
    """A `progress(message)` callback of the protocols that counts steps of one stage."""
    if progress is None:
        return None
    done = [0]
    progress(stage, 0, total)

    def step(_: str) -> None:
        done[0] += 1
        progress(stage, done[0], total)

    return step


def _few_shot(
    config: EvalConfig, feats: EvalFeatures, chosen: dict[str, Method], progress: Progress | None
) -> tuple[ProtocolResult, list[dict]]:
    """The protocol's runs (keeping the CALM fits at the largest shots for the figures) and the sweep."""
    shots, seeds = list(config.shots), list(config.seeds)
    main = methods.principal().name  # its fits at the largest shots draw Fig. 3 and 6
    max_shots, need_fits = max(shots), config.figures and main in chosen
    n_parts = len(make_parts(feats.meta, config.test_fold)[0])
    result = run_protocol(
        feats.X,
        feats.y,
        feats.meta,
        methods=chosen,
        shots=shots,
        seeds=seeds,
        test_fold=config.test_fold,
        do_tune=config.tune,
        keep_fits=(lambda m, n, s, p: need_fits and m == main and n == max_shots),
        keep_heads=lambda m, n: n == max_shots,
        progress=_counter(progress, "episodes", len(shots) * len(seeds) * n_parts * len(chosen)),
    )
    swept = sorted((m for m in chosen if methods.info(m).sweep), key=lambda m: m != main)  # main first
    sweep_methods: dict[str, Method] = {m: chosen[m] for m in swept}
    if not (config.figures and sweep_methods):
        return result, []
    sweep_seeds = seeds[: config.sweep_seeds]
    n_sweep = len(SWEEP_FRACTIONS) * len(shots) * len(sweep_seeds) * n_parts * len(sweep_methods)
    sweep = k_sweep(
        feats.X,
        feats.y,
        feats.meta,
        methods=sweep_methods,
        shots=shots,
        seeds=sweep_seeds,
        test_fold=config.test_fold,
        progress=_counter(progress, "heads-kept sweep", n_sweep),
    )
    return result, sweep


def _analyses(result: ProtocolResult, n_heads: int, head_names: list[tuple], sweep: list[dict]) -> tuple:
    """(analyses, weights of the first kept CALM fit, per-head top-k counts) behind Fig. 3-6."""
    analyses: dict = {"k_sweep": sweep, **head_map_analyses(result.head_weights, result.classes, head_names)}
    if not result.fits:
        return analyses, None, None
    from calm.figures import top_head_counts

    fits = list(result.fits.values())
    counts = top_head_counts([f.weights_ for f in fits], n_heads)
    if head_names:
        analyses["top_heads"] = [
            {"layer": h[0], "head": h[1], "source": h[2] if len(h) > 2 else "decoder", "count": int(c)}
            for h, c in sorted(zip(head_names, counts, strict=True), key=lambda t: -t[1])
            if c > 0
        ]
    return analyses, fits[0].weights_, counts


def _config_doc(
    config: EvalConfig, feats: EvalFeatures, chosen: dict[str, Method], lalm: list[str], registry: dict
) -> dict:
    """results.json's `config` (before the protocol's own fields are added)."""
    key_info = dict(feats.meta.attrs.get("key") or {})
    extractor_key = key_info.get("extractor", key_info)
    from_store = config.features is not None
    return {
        "model": (extractor_key.get("model") or extractor_key.get("model_id"))
        if from_store
        else config.model.label,
        "prompt": extractor_key.get("prompt", config.model.prompt),
        "head_source": extractor_key.get("heads", config.model.heads),
        "extraction_key": key_info,
        "dataset": config.data or str(config.features),
        "features": str(config.features) if from_store else None,
        "n_clips": int(len(feats.y)),
        "n_heads": int(feats.X.shape[1]),
        "head_dim": int(feats.X.shape[2]),
        "shots": list(config.shots),
        "seeds": list(config.seeds),
        "n_seeds": len(config.seeds),
        "methods": [m for m in config.methods if m in chosen or m in lalm or m in ST_METHODS],
        "test_fold": config.test_fold,
        "holdout": config.holdout,
        "tune": config.tune,
        "command": config.command(),
        "defaults": {
            **{name: dict(m.defaults) for name, m in chosen.items()},
            **{m: dict(registry[PL_BASES[m]].defaults) for m in lalm if m in PL_BASES},
            **{
                m: {**registry[ST_BASES[m]].defaults, **config.self_training.params()}
                for m in config.methods
                if m in ST_METHODS
            },
        },
    }


def _self_training(
    config: EvalConfig, feats: EvalFeatures, registry: dict, st: list[str], progress: Progress | None
) -> list[dict]:
    """Runs of the self-training methods (`calm.evaluate.self_training_runs`) on the same episodes."""
    n_parts = len(make_parts(feats.meta, config.test_fold)[0])
    total = len(config.shots) * len(config.seeds) * n_parts * len(st)
    return run_st_protocol(
        feats.X,
        feats.y,
        feats.meta,
        methods={m: registry[ST_BASES[m]] for m in st},
        spec=config.self_training,
        shots=list(config.shots),
        seeds=list(config.seeds),
        test_fold=config.test_fold,
        do_tune=config.tune,
        progress=_counter(progress, "self-training episodes", total),
    )


def _figures(out: Path, results: dict, result: ProtocolResult, weights, counts, head_names, confs) -> dict:
    from calm.figures import make_figures

    first = result.fits[next(iter(result.fits))] if result.fits else None
    return make_figures(
        out / "figures",
        results,
        weights=weights,
        classes=[str(c) for c in first.classes_] if first is not None else None,
        counts=counts,
        head_names=head_names or None,
        confusions=confs,
    )


def _report(
    config: EvalConfig, results: dict, result: ProtocolResult, feats: EvalFeatures, made: dict, confs: list
) -> Path:
    """RUN_DIR/predictions.jsonl and RUN_DIR/report.html (Fig. 3-6 embedded, players for the clips)."""
    from calm.evaluate.predictions import PREDICTIONS_FILE, write_predictions
    from calm.evaluate.report_html import ReportData, write_report

    out = Path(config.out)
    write_predictions(out / PREDICTIONS_FILE, result.predictions)
    paths = [str(p) for p in feats.meta["path"]] if "path" in feats.meta.columns else []
    figures = {k: v for k, v in made.items() if k.startswith("fig")}
    data = ReportData(results, result.predictions, paths, figures, config.command(), confs)
    return write_report(data, out)


def run_evaluation(
    config: EvalConfig, *, progress: Progress | None = None, log: Log | None = None
) -> EvaluationResult:
    """Everything `calm evaluate` does, for `config`; returns what was written (see `EvaluationResult`).

    Raises `ValueError` (`ProtocolError`, `DatasetError`, `StoreError` are ones) naming the problem.
    """
    t0 = time.perf_counter()
    log = log or (lambda _: None)
    out = Path(config.out)
    feats = load_evaluation_features(config, progress, log)
    _require_two_classes(feats.y, config.features if config.features is not None else config.data)
    if config.holdout is not None:
        feats.meta = holdout_split(feats.meta, feats.y, config.holdout)
    unknowns = open_set_unknowns(config, feats.y, feats.meta)  # bad open-set options fail before any run
    head_names = [tuple(h) for h in feats.meta.attrs.get("head_names", [])]
    log(f"{len(feats.y)} clips, features {tuple(feats.X.shape[1:])}")
    registry = config.classifier.registry()
    chosen = {m: registry[m] for m in config.methods if m in registry}
    lalm, skipped = select_lalm(config.methods, feats.extractor, log)
    st = [m for m in config.methods if m in ST_METHODS]
    if not chosen and not lalm and not st:
        raise ProtocolError("no method left to run")
    result, sweep = _few_shot(config, feats, chosen, progress)
    if st:
        result.runs = order_runs(
            result.runs + _self_training(config, feats, registry, st, progress), list(config.methods)
        )
    lalm_info: dict = {}
    warnings: list[str] = []
    if lalm:
        lalm_result, lalm_info = lalm_runs(
            config, feats.X, feats.y, feats.meta, feats.extractor, lalm, result.classes, registry, progress
        )
        warnings = lalm_result.warnings
        result.runs = order_runs(result.runs + lalm_result.runs, list(config.methods))
    for w in warnings:
        log(f"warning: {w}")
    analyses, weights, counts = _analyses(result, feats.X.shape[1], head_names, sweep)
    from calm._version import __version__

    doc = {
        **_config_doc(config, feats, chosen, lalm, registry),
        **lalm_info,
        "package": "calm-audio",
        "version": __version__,
        "extraction": feats.extraction,
    }
    extra = open_set_results(config, feats.X, feats.y, feats.meta, chosen, unknowns, progress)
    confs = confusions(result.predictions)  # once: results.json's skew, results.md, figures, report
    results = build_results(
        result, doc, confs=confs, analyses=analyses, skipped_methods=skipped, warnings=warnings, **extra
    )
    results["config"]["seconds"] = round(time.perf_counter() - t0, 1)
    js, md = write_results(out, results, confs)
    made = _figures(out, results, result, weights, counts, head_names, confs) if config.figures else {}
    html = _report(config, results, result, feats, made, confs)
    markdown = results_markdown(results, confs)
    return EvaluationResult(results, markdown, js, md, made, result, warnings, skipped, html)
