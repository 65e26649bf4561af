"""Labelling audio with a saved classifier: the one inference path behind `calm predict`,
`calm serve` and `calm.AudioClassifier`.

`load_predictor(MODEL.safetensors)` reads the classifier (`calm.load`), loads the frozen model its
metadata describes (`calm.models.spec.LoadSpec.from_metadata`; `model=` replaces the model, checked
against the stored extraction key by `calm.models.spec.check_key`) and returns a `Predictor`, a
`calm.clip_features.FeaturePipeline` with the classifier on top. Its stages follow Hugging Face
pipelines, each taking only its own options:

- `preprocess(source)`: any accepted input (path, bytes of one file, `(waveform, rate)`, audio dict;
  `calm.audio_inputs`) -> a checked `DecodedClip`. Bad audio raises `ClipError`.
- `forward(waveforms)`: a batch -> one class-probability row per clip, or a reason string for a
  clip whose features or scores are not finite (`embed`, then `classify`). A model error in a batch
  is retried clip by clip, so one clip never costs the others. `forward_scored` gives each clip as
  a `Scored`: its probabilities, the features they came from (what `explain=` needs) and, with a
  reject option, its known score (what the reject option thresholds).
- `postprocess(clip, probabilities, top_k=, alpha=, known=, explain=, features=)`: -> `Prediction`
  (label, probability, top-k, duration; the classifier's `unknown_label` when its reject option
  rejects the clip, with `alpha` the conformal prediction set, `calm.classifiers.calibration`, and
  with `explain=N` why: `explanation`, the top-k classes' scores and the N heads that carried each).

`predictor(sources, top_k=, batch_size=)` runs all three and gives one `Prediction` per source, in
order, each with either a label or an error; `predict_proba(X)` gives the probability rows.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from calm import _calibration as cal
from calm.audio_inputs import MIN_SECONDS, ClipError, DecodedClip
from calm.classifiers import calibration, rejection
from calm.clip_features import ClipFeatures, FeaturePipeline
from calm.errors import ParameterError
from calm.models.base import FeatureExtractor
from calm.models.spec import LoadSpec, ModelMismatchError, check_key

log = logging.getLogger(__name__)

__all__ = [
    "MIN_SECONDS",
    "DecodedClip",
    "ClipError",
    "ModelMismatchError",
    "UntrustedModelError",
    "Prediction",
    "Predictor",
    "Scored",
    "load_predictor",
]


@dataclass(frozen=True)
class Prediction:
    """The label of one clip and its probability, the `top_k` classes, or the `error` that stopped it."""

    source: str
    label: Any = None
    probability: float | None = None
    top_k: list[tuple[Any, float]] = field(default_factory=list)
    duration: float | None = None
    error: str | None = None
    prediction_set: list[Any] | None = None
    explanation: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: labels as Python scalars, top-k as `{"label", "probability"}` objects, and
        `prediction_set` when one was asked for."""
        out = {
            "source": self.source,
            "label": self.label,
            "probability": self.probability,
            "top_k": [{"label": lab, "probability": p} for lab, p in self.top_k],
            "duration": self.duration,
            "error": self.error,
        }
        if self.prediction_set is not None:
            out["prediction_set"] = self.prediction_set
        if self.explanation is not None:
            out["explanation"] = self.explanation
        return out


@dataclass(frozen=True)
class Scored:
    """What `Predictor.forward_scored` gives for one clip: its class probabilities (C,), the
    features (K, d) they came from (`Predictor.postprocess` explains them) and, with a reject
    option, its known score (the classifier's `known_score`, what the reject option thresholds;
    None without one)."""

    probabilities: np.ndarray
    features: np.ndarray
    known: float | None = None


def probabilities_of(output: Scored | str) -> np.ndarray | str:
    """A `Predictor.forward_scored` output's class probabilities (a reason string passes through)."""
    return output if isinstance(output, str) else output.probabilities


class Predictor(FeaturePipeline):
    """A fitted classifier and the frozen model it was fitted on (see the module docstring).

    `preprocess` is thread-safe; `forward` must run in one thread at a time (`calm serve` gives it
    one worker thread).
    """

    def __init__(self, classifier: Any, extractor: FeatureExtractor, *, min_seconds: float = MIN_SECONDS):
        super().__init__(extractor, min_seconds=min_seconds)
        self.classifier = classifier
        self.classes = list(np.asarray(classifier.classes_).tolist())

    @property
    def rejects(self) -> bool:
        """Whether the classifier has a reject option (`unknown=`)."""
        return getattr(self.classifier, "unknown", None) is not None

    @property
    def model_id(self) -> str:
        return str(self.extractor.model_id)

    def weight_bytes(self) -> int | None:
        """Bytes of the model's parameters and buffers (None when the extractor has no torch model)."""
        model = getattr(self.extractor, "model", None)
        if model is None or not hasattr(model, "parameters"):
            return None
        tensors = [*model.parameters(), *model.buffers()]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def replicate(self) -> Predictor:
        """A predictor with its own copy of the model (weights copied in memory, nothing re-read)
        and this one's classifier (prediction only reads it): `forward` of the two may then run in
        two threads at once (`calm serve --replicas`)."""
        return Predictor(self.classifier, copy.deepcopy(self.extractor), min_seconds=self.min_seconds)

    def info(self) -> dict[str, Any]:
        """Classes, model, prompt, heads, how the classifier was fitted, whether its probabilities
        are calibrated and how it rejects (`calm.classifiers.rejection.reject_info`; JSON-ready)."""
        meta = dict(getattr(self.classifier, "metadata_", {}) or {})
        return {
            "classes": self.classes,
            "model": self.model_id,
            "extraction_key": json.loads(json.dumps(self.extractor.key, default=str)),
            "prompt": meta.get("prompt"),
            "heads": meta.get("heads") or "all",
            "n_heads": int(self.classifier.n_heads_),
            "estimator": type(self.classifier).__name__,
            "method": meta.get("method"),
            "sample_rate": int(self.extractor.sample_rate),
            "max_seconds": self.extractor.max_seconds,
            "min_seconds": self.min_seconds,
            "calibrated": bool(getattr(self.classifier, "calibrated_", False)),
            "reject": rejection.reject_info(self.classifier),
        }

    # -- forward ----------------------------------------------------------------------------------
    def classify(self, features: Sequence[np.ndarray | str], *, known: bool = True) -> list[Scored | str]:
        """A `Scored` per feature array (K, d): its class probabilities (C,) and, with a reject
        option and `known`, its known score (else None); a reason string passes through."""
        failed = "non-finite class probabilities"  # kept for a row whose probabilities are not finite
        out: list[Scored | str] = [f if isinstance(f, str) else failed for f in features]
        ok = [i for i, f in enumerate(features) if not isinstance(f, str)]
        if ok:
            X = np.stack([features[i] for i in ok])
            knowns: Any = [None] * len(ok)
            if not (known and self.rejects):
                proba = np.asarray(self.classifier.predict_proba(X), np.float64)
            else:  # the class scores once, for both the probabilities and the known scores
                scores = self.classifier.class_scores(X)
                proba = np.asarray(calibration.proba(self.classifier, scores), np.float64)
                knowns = calibration.known_scores(self.classifier, X, scores)
            for j, (i, p, k) in enumerate(zip(ok, proba, knowns, strict=True)):
                if np.isfinite(p).all():
                    out[i] = Scored(p, X[j], None if k is None else float(k))
        return out

    def forward(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray | str]:
        """Class probabilities (C,) per waveform, or the reason it has none (no known scores)."""
        return [probabilities_of(s) for s in self.classify(self.embed(waveforms), known=False)]

    def forward_scored(self, waveforms: Sequence[np.ndarray]) -> list[Scored | str]:
        """`forward`, each clip's probabilities kept with its features and known score (`Scored`)."""
        return self.classify(self.embed(waveforms))

    # -- postprocess ------------------------------------------------------------------------------
    def labels(self, probabilities: np.ndarray, known: Any = None) -> list[Any]:
        """The label of each probability row (n, C): the most probable class (ties: the lower
        index), or the classifier's `unknown_label` where its reject option rejects the row: its
        known score (`known` (n,)) below the threshold. Without known scores the "top-proba"
        score is read off the probabilities; the others need them (ValueError)."""
        p = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(self.classes))
        best = np.asarray(self.classes, dtype=object)[np.argmax(p, axis=1)]
        if not self.rejects:
            return list(best)
        if known is None:
            if self.classifier.unknown_score != "top-proba":
                raise ValueError(
                    f"the {self.classifier.unknown_score} reject option needs the clips' known scores"
                )
            known = cal.proba_log_odds(p)
        return list(
            calibration.with_unknown(self.classifier, best, np.atleast_1d(np.asarray(known, np.float64)))
        )

    def explanation(self, features: np.ndarray, classes: Sequence[Any], heads: int) -> dict[str, Any]:
        """Why one clip (features (K, d)) got its label: the classifier's `explain` (its prediction
        and, for each of `classes`, score, probability and the `heads` heads that carried the
        score most: layer, head and source as the model names them, weight, similarity,
        contribution). Refuses a classifier without `explain` in one line (`ParameterError`)."""
        explain = getattr(self.classifier, "explain", None)
        if explain is None:
            name = type(self.classifier).__name__
            raise ParameterError(f"explain: a {name} classifier cannot say why a clip got its label")
        why = explain(np.asarray(features)[None], top=max(1, int(heads)))[0]
        names = list(self.extractor.head_names)
        named = len(names) == int(self.classifier.n_heads_)
        for rows in why["heads"].values():
            for row in rows if named else []:  # the model's own names, also for a file without them
                layer, index, source = names[row["head"]]
                row.update(layer=int(layer), index=int(index), source=str(source))
        return {
            "prediction": why["prediction"],
            "classes": [
                {
                    "label": c,
                    "score": why["scores"][str(c)],
                    "probability": why["probabilities"][str(c)],
                    "heads": why["heads"][str(c)],
                }
                for c in classes
            ],
        }

    def postprocess(
        self,
        clip: DecodedClip,
        probabilities: np.ndarray,
        *,
        top_k: int = 1,
        alpha: float | None = None,
        known: float | None = None,
        explain: int | None = None,
        features: np.ndarray | None = None,
    ) -> Prediction:
        """The label (`labels`; `known`: the clip's known score, needed by a reject option on a
        score other than "top-proba"), its class's probability, the `top_k` best classes (ties: the
        lower class index first), with `alpha` the conformal prediction set at that level and with
        `explain` (heads per class; needs the clip's `features`) the `explanation` of the top-k
        classes."""
        order = np.argsort(-probabilities, kind="stable")[: max(1, int(top_k))]
        best = [(self.classes[j], float(probabilities[j])) for j in order]
        sets = None if alpha is None else calibration.sets_of(self.classifier, probabilities[None], alpha)[0]
        plain = [s.item() if hasattr(s, "item") else s for s in sets] if sets is not None else None
        label = self.labels(probabilities, None if known is None else [known])[0]
        why = None
        if explain is not None:
            if features is None:
                raise ParameterError("explain needs the clip's features (forward_scored gives them)")
            why = self.explanation(features, [c for c, _ in best], explain)
        return Prediction(
            clip.source, label, best[0][1], best, clip.duration, prediction_set=plain, explanation=why
        )

    # -- the three stages over a list of inputs ---------------------------------------------------
    def predict_proba(
        self, X: Any, *, sample_rate: Any = None, batch_size: int = 8, cache: str | os.PathLike | None = None
    ) -> tuple[np.ndarray, ClipFeatures]:
        """(probabilities (n, C), NaN for a clip that failed; what `features` made of X, each failed
        clip's `ClipError` in its `errors`)."""
        proba, _, feats = self.scored(X, sample_rate=sample_rate, batch_size=batch_size, cache=cache)
        return proba, feats

    def scored(
        self, X: Any, *, sample_rate: Any = None, batch_size: int = 8, cache: str | os.PathLike | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, ClipFeatures]:
        """`predict_proba` with the clips' known scores (n,) (NaN for a clip that failed; None
        without a reject option): (probabilities, known scores, features)."""
        feats = self.features(X, sample_rate=sample_rate, batch_size=batch_size, cache=cache)
        proba = np.full((len(feats.sources), len(self.classes)), np.nan)
        known = np.full(len(feats.sources), np.nan)
        order = sorted(feats.rows)
        for i, p in zip(order, self.classify([feats.rows[i] for i in order]), strict=True):
            if isinstance(p, str):
                del feats.rows[i]
                feats.fail(i, feats.sources[i], p)
            else:
                proba[i] = p.probabilities
                known[i] = np.nan if p.known is None else p.known
        return proba, known if self.rejects else None, feats

    def __call__(
        self,
        sources: Sequence[Any],
        *,
        top_k: int = 1,
        batch_size: int = 8,
        sample_rate: Any = None,
        cache: str | os.PathLike | None = None,
        alpha: float | None = None,
        explain: int | None = None,
    ) -> list[Prediction]:
        """One `Prediction` per source, in order; a clip that fails gets its error, the rest go on
        (`alpha`: each with its conformal prediction set; `explain`: with its `explanation`, that
        many heads per class)."""
        proba, known, feats = self.scored(
            sources, sample_rate=sample_rate, batch_size=batch_size, cache=cache
        )
        out = []
        for i, source in enumerate(feats.sources):
            duration = feats.durations.get(i)
            if i in feats.errors:
                out.append(Prediction(source, duration=duration, error=feats.errors[i].reason))
            else:
                clip = DecodedClip(source, np.empty(0), duration or 0.0)
                k = None if known is None else float(known[i])
                pred = self.postprocess(
                    clip,
                    proba[i],
                    top_k=top_k,
                    alpha=alpha,
                    known=k,
                    explain=explain,
                    features=feats.rows.get(i),
                )
                out.append(replace(pred, duration=duration))  # None (not 0.0): a store's row without one
        return out


class UntrustedModelError(ModelMismatchError):
    """A classifier file names a model that is neither registered nor confirmed by the caller."""


def _confirmed(model_id: str, model_file: str | os.PathLike) -> None:
    from calm.models import MODELS

    if model_id not in MODELS:
        raise UntrustedModelError(
            f"{model_file}: the classifier names the model {model_id!r}, which is not a registered model; "
            f"calm loads a hub id or a local directory named by a file only when you confirm it: "
            f"rerun with --model {model_id} (or --trust-file-model) once you know it is the model you expect"
        )


def load_predictor(
    model_file: str | os.PathLike,
    *,
    model: str | None = None,
    device: str = "cpu",
    min_seconds: float = MIN_SECONDS,
    announce: Callable[[str], None] | None = None,
    trust_file_model: bool = False,
) -> Predictor:
    """Load a classifier saved by `calm fit` / `AudioClassifier.save` and the model it was fitted on.

    The file decides which model runs only when that is a registered model (`calm.models.MODELS`,
    e.g. the embedded whisper-tiny.en): a hub id or a local directory named by the file is loaded
    only when the caller confirms it, by naming it with `model=` (`--model`) or with
    `trust_file_model=True`, else `UntrustedModelError` says how (a classifier file from elsewhere
    cannot make `calm predict` / `calm serve` load an arbitrary checkpoint).

    Args:
        model_file: the `.safetensors` classifier file.
        model: load this model instead (registered name, hub id or directory), with the options the
            file records; its extraction key must equal the stored one, else `ModelMismatchError`
            says how to refit.
        device: torch device of the model.
        min_seconds: shorter clips are refused (`ClipError`).
        announce: called with one line naming the model, where its name came from (the file or
            `model=`) and its options, before the model is loaded (the CLI prints it).
        trust_file_model: load whatever model the file names (see above).
    """
    from calm.classifiers import load
    from calm.models import load_extractor

    classifier = load(model_file)
    metadata = dict(getattr(classifier, "metadata_", {}) or {})
    spec = LoadSpec.from_metadata(metadata, device=device, model=model)
    if model is None and not trust_file_model:
        _confirmed(spec.model_id, model_file)
    line = spec.describe("override" if model else "metadata")
    log.info("%s: loading %s", model_file, line)  # the file decides which model runs: say so
    if announce is not None:
        announce(line)
    extractor = load_extractor(spec)
    check_key(metadata, extractor.key, model=spec.label, override=model is not None)
    return Predictor(classifier, extractor, min_seconds=min_seconds)
