"""The detection evaluation (`calm evaluate-detection`): few-shot sound event detection on
soundscapes built from held-out clips, the full method against a naive baseline, seed by seed.

Per seed: soundscapes (`calm.evaluate.soundscapes`) whose events are clips of the event classes
from `test_fold` and whose backgrounds are clips of the background classes from `background_fold`;
a support set of `shots` clips per event class from `support_folds`, plus `shots` clips of the
background classes (from `support_folds` without `background_fold`, so no soundscape background is
a support clip) as one extra class, `BACKGROUND`, that is never an event; one
`calm.AudioClassifier` fitted on it (support features cached in OUT/features, so seeds that share
clips extract them once). Every soundscape goes once through `AudioClassifier.detect` (the one
inference path of `calm detect`); both methods read the same per-window probabilities:

- `full`: `calm detect`'s decision with the configured settings (median filter, threshold,
  `BACKGROUND` never reported); the defaults are `calm detect`'s, chosen without these soundscapes;
- `naive`: per-window argmax of the raw probabilities, no smoothing, no threshold (a window whose
  argmax is `BACKGROUND` holds no event, as the class is background by definition).

Scores: `calm.evaluate.sed_metrics` (sed_eval) over all soundscapes of a seed. Runs are records
like `calm evaluate`'s (method, shots, seed, metrics), so `calm.evaluate.summary` gives the mean ±
std and the paired per-seed differences (full - naive, 95 % Student-t intervals). results.json,
results.md and report.html (`calm.evaluate.detection_report`) are rewritten after every seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calm.data.base import Dataset, DatasetError
from calm.detection import (
    DEFAULT_HOP,
    DEFAULT_MEDIAN,
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW,
    Detection,
    events_of,
)
from calm.errors import ParameterError
from calm.evaluate.soundscapes import SoundscapeSpec, generate
from calm.methods import DEFAULT_METHOD
from calm.models import DEFAULT_MODEL

__all__ = [
    "BACKGROUND",
    "DEFAULT_BACKGROUNDS",
    "DEFAULT_EVENTS",
    "METHODS",
    "DetectionEvalConfig",
    "naive_events",
    "run_detection_evaluation",
]

#: ESC-10's short, well-delimited sounds (the events) and its ambient ones (the backgrounds)
DEFAULT_EVENTS = ("Dog bark", "Rooster", "Baby cry", "Person sneeze", "Clock tick", "Chainsaw", "Helicopter")
DEFAULT_BACKGROUNDS = ("Rain", "Sea waves", "Fire crackling")
BACKGROUND = "background"  # the support set's class of background clips
METHODS = ("full", "naive")  # in this order: the paired differences are full - naive


@dataclass(frozen=True)
class DetectionEvalConfig:
    """Everything a detection evaluation depends on (see the module docstring)."""

    data: str
    out: Path
    model: str = DEFAULT_MODEL
    model_options: Mapping[str, Any] = field(default_factory=dict)
    method: str = DEFAULT_METHOD
    device: str = "cpu"
    shots: int = 5
    seeds: tuple[int, ...] = tuple(range(10))
    events: tuple[str, ...] = DEFAULT_EVENTS
    backgrounds: tuple[str, ...] = DEFAULT_BACKGROUNDS
    test_fold: int = 5
    background_fold: int = 4
    support_folds: tuple[int, ...] = (1, 2, 3, 4)
    soundscapes: int = 4
    spec: SoundscapeSpec = field(default_factory=SoundscapeSpec)
    window: float = DEFAULT_WINDOW
    hop: float = DEFAULT_HOP
    median: int = DEFAULT_MEDIAN
    threshold: float = DEFAULT_THRESHOLD
    batch_size: int = 16

    def check(self) -> None:
        """Raise `ParameterError` for settings that cannot run (before anything is loaded)."""
        if self.shots < 1 or self.soundscapes < 1 or not self.seeds:
            raise ParameterError(
                f"need shots >= 1, soundscapes >= 1 and a seed; got {self.shots}, {self.soundscapes}, "
                f"{list(self.seeds)}"
            )
        if self.test_fold in self.support_folds:
            raise ParameterError(
                f"test fold {self.test_fold} is also a support fold {list(self.support_folds)}"
            )
        if not self.events or not self.backgrounds:
            raise ParameterError("need at least one event class and one background class")
        both = sorted(set(self.events) & set(self.backgrounds))
        if both or BACKGROUND in self.events:
            raise ParameterError(f"classes both event and background (or named {BACKGROUND!r}): {both}")
        self.spec.check()


@dataclass(frozen=True)
class Pools:
    """The clips each part of the protocol draws from: label -> sorted paths."""

    test: dict[str, list[Path]]  # soundscape events
    scene: list[Path]  # soundscape backgrounds
    support: dict[str, list[Path]]  # support clips of the event classes
    support_background: list[Path]  # support clips of the BACKGROUND class


def _by_class(dataset: Dataset, classes: Sequence[str], folds: Sequence[int]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {c: [] for c in classes}
    for clip in dataset.clips:
        label = clip.labels[0] if clip.labels else None
        if label in out and clip.fold in folds:
            out[label].append(Path(clip.path))
    return {c: sorted(paths) for c, paths in out.items()}


def pools_of(dataset: Dataset, config: DetectionEvalConfig) -> Pools:
    """The clip pools of `dataset` (raises `DatasetError` naming what is missing)."""
    where = config.data
    if any(c.fold is None for c in dataset.clips):
        raise DatasetError(f"{where}: the detection evaluation needs folds (an esc10: or esc50: dataset)")
    unknown = [c for c in (*config.events, *config.backgrounds) if c not in dataset.classes]
    if unknown:
        raise DatasetError(f"{where}: no class {unknown}; classes: {dataset.classes}")
    bg_support_folds = [f for f in config.support_folds if f != config.background_fold]
    pools = Pools(
        test=_by_class(dataset, config.events, [config.test_fold]),
        scene=sum(_by_class(dataset, config.backgrounds, [config.background_fold]).values(), []),
        support=_by_class(dataset, config.events, config.support_folds),
        support_background=sum(_by_class(dataset, config.backgrounds, bg_support_folds).values(), []),
    )
    short = [c for c, p in pools.support.items() if len(p) < config.shots]
    if len(pools.support_background) < config.shots:
        short.append(f"{BACKGROUND} ({'/'.join(config.backgrounds)}, folds {bg_support_folds})")
    if short:
        raise DatasetError(f"{where}: fewer than {config.shots} support clips for {short}")
    empty = [c for c, p in pools.test.items() if not p]
    if empty or not pools.scene:
        raise DatasetError(
            f"{where}: no clips of {empty or list(config.backgrounds)} in fold "
            f"{config.test_fold if empty else config.background_fold}"
        )
    return pools


def support_set(pools: Pools, shots: int, seed: int) -> tuple[list[Path], list[str]]:
    """`shots` clips per event class and of `BACKGROUND`, drawn with `seed` (paths, labels)."""
    rng = np.random.default_rng([int(seed), 1])
    paths: list[Path] = []
    labels: list[str] = []
    for label, pool in [*pools.support.items(), (BACKGROUND, pools.support_background)]:
        picked = rng.choice(len(pool), size=shots, replace=False)
        paths += [pool[i] for i in sorted(picked)]
        labels += [label] * shots
    return paths, labels


def naive_events(det: Detection) -> list[Any]:
    """The naive baseline's events of a detection: per-window argmax of the raw probabilities, no
    smoothing, no threshold (windows of a background class hold none)."""
    failed = ~np.isfinite(det.probabilities).all(axis=1)
    return events_of(
        det.starts,
        np.nan_to_num(det.probabilities),
        np.zeros(len(det.classes)),
        det.classes,
        window=det.window,
        duration=det.duration,
        background=det.background,
        failed=failed,
    )


def _detect(clf: Any, path: Path, config: DetectionEvalConfig) -> Detection:
    """`calm detect` on one soundscape with the configured settings (its `events` are `full`'s)."""
    return clf.detect(
        str(path),
        window=config.window,
        hop=config.hop,
        median=config.median,
        threshold=config.threshold,
        background=[BACKGROUND],
        batch_size=config.batch_size,
    )


def run_seed(clf: Any, pools: Pools, config: DetectionEvalConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """One seed: (run records of both methods, each soundscape's reference and detected events)."""
    from calm.evaluate.sed_metrics import SedScores

    t0 = time.perf_counter()
    paths, labels = support_set(pools, config.shots, seed)
    clf.fit([str(p) for p in paths], labels)
    fitted = time.perf_counter() - t0
    scapes = generate(
        pools.test,
        pools.scene,
        config.out / "soundscapes" / f"seed_{seed}",
        seed=seed,
        count=config.soundscapes,
        spec=config.spec,
    )
    scores = {m: SedScores(config.events) for m in METHODS}
    details: list[dict[str, Any]] = []
    for scape in scapes:
        det = _detect(clf, scape.audio, config)
        found = {"full": det.events, "naive": naive_events(det)}
        for m in METHODS:
            scores[m].add(scape.events, found[m], scape.duration)
        details.append(
            {
                "seed": seed,
                "soundscape": str(scape.audio),
                "reference": [list(r) for r in scape.events],
                **{m: [e.as_dict() for e in found[m]] for m in METHODS},
            }
        )
    wall = time.perf_counter() - t0
    timing = {
        "fit_seconds": fitted,
        "wall_seconds": wall,
        "audio_seconds": config.soundscapes * config.spec.duration,
    }
    runs = [
        {
            "method": m,
            "shots": config.shots,
            "seed": seed,
            "part": 0,
            "metrics": scores[m].scores(),
            "n_events": sum(len(d[m]) for d in details),
            "n_reference": sum(len(d["reference"]) for d in details),
            "support": [str(p) for p in paths],
            **timing,
        }
        for m in METHODS
    ]
    return runs, details


def build_results(
    config: DetectionEvalConfig, runs: Sequence[dict], details: Sequence[dict], **extra: Any
) -> dict:
    """The results.json document of the runs so far."""
    from calm._version import __version__
    from calm.evaluate.summary import paired_differences, summarise

    cfg = {k: v for k, v in asdict(config).items() if k not in ("spec", "out")}
    cfg.update(
        protocol="detection",
        primary_metric="event_f1",
        dataset=config.data,
        n_seeds=len({r["seed"] for r in runs}),
        classes=list(config.events),
        background_label=BACKGROUND,
        soundscape=asdict(config.spec),
        package="calm-audio",
        version=__version__,
        out=str(config.out),
    )
    return {
        "config": cfg,
        "summary": summarise(runs),
        "paired": paired_differences(runs),
        "runs": list(runs),
        "soundscapes": list(details),
        **extra,
    }


def run_detection_evaluation(
    config: DetectionEvalConfig,
    *,
    progress: Callable[[str], None] | None = None,
    command: str | None = None,
) -> dict:
    """Run every seed (see the module docstring); returns the results document, also written to
    `config.out` (results.json, results.md, report.html) after each seed."""
    from calm.audio_classifier import AudioClassifier
    from calm.data import load_dataset
    from calm.evaluate.detection_report import write_detection_outputs
    from calm.evaluate.sed_metrics import SedScores

    config.check()
    SedScores(config.events)  # sed_eval missing: one line now, not after the first seed's work
    pools = pools_of(load_dataset(config.data), config)
    clf = AudioClassifier(
        config.model,
        config.method,
        model_options=dict(config.model_options),
        cache=config.out / "features",
        device=config.device,
        batch_size=config.batch_size,
    )
    runs: list[dict] = []
    details: list[dict] = []
    results: dict = {}
    for seed in config.seeds:
        seed_runs, seed_details = run_seed(clf, pools, config, seed)
        runs += seed_runs
        details += seed_details
        results = build_results(config, runs, details, command=command)
        write_detection_outputs(config.out, results)
        if progress is not None:
            f1 = {r["method"]: r["metrics"]["event_f1"] for r in seed_runs}
            seg = {r["method"]: r["metrics"]["segment_f1"] for r in seed_runs}
            progress(
                f"seed {seed}: event F1 full {f1['full']:.1f} naive {f1['naive']:.1f}; segment F1 full "
                f"{seg['full']:.1f} naive {seg['naive']:.1f} ({seed_runs[0]['wall_seconds']:.0f} s)"
            )
    return results
