"""The model side of the zero-shot and pseudo-label baselines inside `run_evaluation`: a loaded LALM
answers (through `calm.answering.clips`, cached in the run directory) for `run_lalm_protocol`, and what
results.json says about those answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from calm.errors import CalmError
from calm.evaluate.config import EvalConfig
from calm.evaluate.episodes import ProtocolError, make_parts
from calm.evaluate.estimators import LALM_METHODS, PL_BASES, ZERO_SHOT, Method
from calm.evaluate.lalm_protocol import LALMRunsResult, run_lalm_protocol
from calm.models.base import FeatureExtractor

__all__ = ["lalm_runs", "lalm_skip_reason", "select_lalm"]


def select_lalm(
    methods: Sequence[str], extractor: FeatureExtractor | None, log: Callable[[str], None]
) -> tuple[list[str], dict[str, str]]:
    """The model-answer baselines among `methods` that can run with `extractor`, and why the others
    cannot (each reason also logged)."""
    lalm = [m for m in methods if m in LALM_METHODS]
    reason = lalm_skip_reason(extractor) if lalm else None
    if reason is None:
        return lalm, {}
    for m in lalm:
        log(f"skipping {m}: {reason}")
    return [], {m: reason for m in lalm}


def lalm_skip_reason(extractor: FeatureExtractor | None) -> str | None:
    """Why zero-shot / pseudo-labels cannot run with this extractor, or None when they can."""
    if extractor is None:
        return "no model loaded (--features): zero-shot and pseudo-labels need the model itself"
    from calm.answering.zeroshot import as_chat_lm

    try:
        as_chat_lm(extractor)
    except (TypeError, ValueError) as exc:  # not an LALM (Whisper), or loaded without its LM head
        return str(exc)
    return None


def _stage(progress: Callable | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def _answerers(
    config: EvalConfig,
    extractor: FeatureExtractor,
    paths: np.ndarray,
    classes: Sequence[str],
    progress,
    info: dict,
) -> tuple[Callable, Callable]:
    """The `zero_shot(rows)` and `pseudo_label(rows)` functions of `run_lalm_protocol`; each records
    in `info` what results.json reports about its answers."""
    from calm.answering.clips import pseudo_label_clips, zero_shot_clips

    out, spec = Path(config.out), config.lalm

    def zero_shot(rows: np.ndarray):
        cache = out / "zero_shot.json"
        res = zero_shot_clips(
            extractor,
            list(paths[rows]),
            classes,
            mode=spec.zero_shot_mode,
            batch_size=config.batch_size,
            cache=cache,
            progress=_stage(progress, "zero-shot answers"),
        )
        info["zero_shot"] = {
            "mode": spec.zero_shot_mode,
            "prompt": res.prompt,
            "clips": len(rows),
            "n_unparsed": res.n_unparsed,
            "cache": str(cache),
        }
        return res.predictions, res.scores

    def pseudo_label(rows: np.ndarray):
        cache = out / "pseudo_labels.json"
        res = pseudo_label_clips(
            extractor,
            list(paths[rows]),
            classes,
            rollouts=spec.pl_rollouts,
            seed=spec.pl_seed,
            batch_size=config.batch_size,
            cache=cache,
            progress=_stage(progress, "pseudo-labels"),
        )
        info["pseudo_labels"] = {
            "rollouts": spec.pl_rollouts,
            "temperature_range": [1.0, 2.5],
            "min_agreement": 0.5,
            "seed": spec.pl_seed,
            "pool": spec.pl_pool if spec.pl_pool is not None else "shots x classes",
            "clips": len(rows),
            "kept": int(np.sum(res.kept)),
            "answers_unparsed": res.n_unparsed,
            "cache": str(cache),
        }
        return res

    return zero_shot, pseudo_label


def lalm_runs(
    config: EvalConfig,
    X: Any,
    y: np.ndarray,
    meta: pd.DataFrame,
    extractor: FeatureExtractor | None,
    methods: list[str],
    classes: Sequence[str],
    registry: dict[str, Method],
    progress: Callable | None = None,
) -> tuple[LALMRunsResult, dict]:
    """Runs of zero-shot / sav+pl / calm+pl with the loaded model, and results.json's notes on them.

    A `ValueError` (e.g. option labels that are not single tokens, a pool too large) is raised again
    with the methods' names in front."""
    if extractor is None:
        raise ProtocolError("zero-shot and pseudo-labels need the model itself, not a store")
    info: dict = {}
    zero_shot, pseudo_label = _answerers(
        config, extractor, meta["path"].astype(str).to_numpy(), classes, progress, info
    )
    n_eps = len(config.shots) * len(config.seeds) * len(make_parts(meta, config.test_fold)[0])
    total = n_eps * ((ZERO_SHOT in methods) + any(m in PL_BASES for m in methods))
    done = [0]

    def step(_: str) -> None:
        done[0] += 1
        if progress is not None:
            progress("zero-shot / pseudo-label episodes", done[0], total)

    try:
        res = run_lalm_protocol(
            X,
            y,
            meta,
            methods=methods,
            shots=list(config.shots),
            seeds=list(config.seeds),
            test_fold=config.test_fold,
            zero_shot=zero_shot,
            zero_shot_params={"mode": config.lalm.zero_shot_mode},
            pseudo_label=pseudo_label,
            fewshot=registry,
            pl_pool_size=config.lalm.pl_pool,
            do_tune=config.tune,
            progress=step,
        )
    except CalmError as exc:
        raise ProtocolError(f"{', '.join(methods)}: {exc}") from exc
    return res, info
