"""The few-shot evaluation of `calm evaluate` as a library: `run_evaluation(EvalConfig(...))` does the
whole job; the modules below are its parts, usable on their own.

Everything works on a feature store's arrays, `X` (n, K, d), `y` (n,) label strings (multi-label
joined by `;`) and `meta` (columns `fold`, `split`, ...); episodes only index them, so features are
extracted once per clip.

- `episodes`: train/test parts and seeded support/query draws (`make_parts`, `sample_episode`).
- `methods`: the few-shot methods of `calm.methods` (the registry) as `Method`s (`fewshot_methods`),
  tuning inside the support set, the linear probe.
- `metrics`: accuracy, macro-F1, EER, multi-label question accuracy / exact match / mAP.
- `records`: `Run`, the record of one method on one episode, and its results.json form.
- `protocol`: the few-shot protocol (`run_protocol`) and the heads-kept sweep (`k_sweep`).
- `lalm`: zero-shot and pseudo-label runs on the same episodes (`run_lalm_protocol`).
- `summary`: means and stds over seeds, paired per-seed differences with 95 % intervals.
- `reports`: results.json / results.md.
- `self_training_runs`: `calm+st` / `sav+st` (and `-trans`) runs on the same episodes, pools, reports.
- `openset`: the open-set protocol (held-out classes, unknowns of another store) and its metrics.
- `config`, `runner`: `EvalConfig`, `run_evaluation`, `EvaluationResult`.
"""

from __future__ import annotations

from calm.evaluate.config import ClassifierSpec, EvalConfig, LALMSpec
from calm.evaluate.episodes import (
    Episode,
    Part,
    ProtocolError,
    episode_features,
    episodes,
    holdout_split,
    make_parts,
    row_labels,
    sample_episode,
    task_of,
)
from calm.evaluate.estimators import (
    FEWSHOT_METHODS,
    LALM_METHODS,
    PL_BASES,
    LinearProbe,
    Method,
    choose_params,
    fewshot_methods,
    tune,
)
from calm.evaluate.lalm_protocol import (
    PL_STREAM,
    ConstantClassifier,
    LALMRunsResult,
    one_hot_scores,
    pl_episode_runs,
    pl_pool,
    pseudo_label_report,
    run_lalm_protocol,
    zero_shot_episode_run,
)
from calm.evaluate.metrics import (
    PRIMARY_METRIC,
    accuracy,
    average_precision,
    class_scores,
    equal_error_rate,
    evaluate_method,
    macro_f1,
    multilabel_metrics,
    prediction_metrics,
)
from calm.evaluate.openset import run_open_set
from calm.evaluate.protocol import SWEEP_FRACTIONS, ProtocolResult, k_sweep, run_protocol
from calm.evaluate.records import Run, order_runs
from calm.evaluate.reports import METHOD_TITLES, METRIC_TITLES, build_results, results_markdown, write_results
from calm.evaluate.runner import EvaluationResult, run_evaluation
from calm.evaluate.self_training_runs import (
    ST_BASES,
    ST_METHODS,
    STSpec,
    run_st_protocol,
    st_pool,
    st_report,
    st_summary,
)
from calm.evaluate.summary import paired_differences, pseudo_label_summary, summarise

__all__ = [
    "FEWSHOT_METHODS",
    "LALM_METHODS",
    "METHOD_TITLES",
    "METRIC_TITLES",
    "PL_BASES",
    "PL_STREAM",
    "PRIMARY_METRIC",
    "ST_BASES",
    "ST_METHODS",
    "STSpec",
    "SWEEP_FRACTIONS",
    "ClassifierSpec",
    "ConstantClassifier",
    "Episode",
    "EvalConfig",
    "EvaluationResult",
    "LALMRunsResult",
    "LALMSpec",
    "LinearProbe",
    "Method",
    "Part",
    "ProtocolError",
    "ProtocolResult",
    "Run",
    "accuracy",
    "average_precision",
    "build_results",
    "choose_params",
    "class_scores",
    "episode_features",
    "episodes",
    "equal_error_rate",
    "evaluate_method",
    "fewshot_methods",
    "k_sweep",
    "macro_f1",
    "holdout_split",
    "make_parts",
    "multilabel_metrics",
    "one_hot_scores",
    "order_runs",
    "paired_differences",
    "pl_episode_runs",
    "pl_pool",
    "prediction_metrics",
    "pseudo_label_report",
    "pseudo_label_summary",
    "results_markdown",
    "row_labels",
    "run_evaluation",
    "run_lalm_protocol",
    "run_open_set",
    "run_protocol",
    "run_st_protocol",
    "sample_episode",
    "st_pool",
    "st_report",
    "st_summary",
    "summarise",
    "task_of",
    "tune",
    "write_results",
    "zero_shot_episode_run",
]
