"""Labelling audio with a saved classifier: the inference pipeline behind `calm predict` and `calm serve`.

`load_predictor(MODEL.safetensors)` reads the classifier (`calm.load`), loads the frozen model its
metadata names (or `model=`, checked against the stored extraction key) and returns a `Predictor`
whose three stages follow Hugging Face pipelines, each taking only its own options:

- `preprocess(source)`: a path or the bytes of one file -> `Clip` (waveform at the model's rate and
  duration), through the extractor's `load_input` (`calm.audio`). Bad audio raises `ClipError`.
- `forward(waveforms)`: a batch -> one class-probability row per clip, or a reason string for a
  clip whose features or scores are not finite. A model error in a batch is retried clip by clip,
  so one clip never costs the others.
- `postprocess(clip, probabilities, top_k=)`: -> `Prediction` (label, probability, top-k, duration).

`predictor(sources, top_k=, batch_size=)` runs all three and gives one `Prediction` per source, in
order, each with either a label or an error.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MIN_SECONDS",
    "Clip",
    "ClipError",
    "ExtractorChoice",
    "ModelMismatchError",
    "Prediction",
    "Predictor",
    "choose_extractor",
    "load_predictor",
]

#: clips shorter than this (seconds, after decoding) are refused: too little audio to label
MIN_SECONDS = 0.1
# magic bytes -> file suffix, so that uploaded bytes take the same decoder as the file on disk
_MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"FORM", ".aiff"))


class ClipError(ValueError):
    """One clip that cannot be labelled; `reason` says why (the message also names the clip)."""

    def __init__(self, source: str, reason: str):
        self.source, self.reason = str(source), reason
        super().__init__(f"{self.source}: {reason}")


class ModelMismatchError(ValueError):
    """The model to load is not the one the classifier was fitted on (or none is named)."""


@dataclass(frozen=True)
class Clip:
    """One decoded clip: `waveform` as the extractor's `load_input` returns it, `duration` in seconds."""

    source: str
    waveform: np.ndarray
    duration: float


@dataclass(frozen=True)
class Prediction:
    """The label of one clip and its probability, the `top_k` classes, or the `error` that stopped it."""

    source: str
    label: Any = None
    probability: float | None = None
    top_k: list[tuple[Any, float]] = field(default_factory=list)
    duration: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: labels as Python scalars, top-k as `{"label", "probability"}` objects."""
        return {
            "source": self.source,
            "label": self.label,
            "probability": self.probability,
            "top_k": [{"label": lab, "probability": p} for lab, p in self.top_k],
            "duration": self.duration,
            "error": self.error,
        }


@dataclass(frozen=True)
class ExtractorChoice:
    """Which model `load_predictor` will load and how: `model` plus `load_extractor` keyword arguments.

    `source` is `metadata` (the classifier names it) or `override` (`model=` / `--model`).
    """

    model: str
    kwargs: dict[str, Any]
    source: str

    def describe(self) -> str:
        where = "named by the classifier" if self.source == "metadata" else "given with --model"
        extras = {k: v for k, v in self.kwargs.items() if v not in (None, {}, "all") and k != "device"}
        return f"model {self.model} ({where}) on {self.kwargs.get('device', 'cpu')}" + (
            f", {json.dumps(extras, default=str)}" if extras else ""
        )


def choose_extractor(metadata: dict, *, model: str | None = None, device: str = "cpu") -> ExtractorChoice:
    """The model and options a saved classifier's metadata names; `model` replaces the model only."""
    named = metadata.get("model")
    if not (model or named):
        raise ModelMismatchError(
            "the classifier's metadata names no model: fit it with `calm fit`, or give the model with --model"
        )
    kwargs: dict[str, Any] = {"heads": metadata.get("heads") or "all", "prompt": metadata.get("prompt")}
    if metadata.get("layers") is not None:
        kwargs["layers"] = metadata["layers"]
    kwargs.update(metadata.get("options") or {})
    stored = (metadata.get("extraction_key") or {}).get("extractor") or {}
    if stored.get("long"):  # features averaged over windows (`long="windows"`), as when fitted
        kwargs["long"] = stored["long"]
    kwargs["device"] = device
    return ExtractorChoice(str(model or named), kwargs, "override" if model else "metadata")


def check_extraction_key(metadata: dict, extractor: Any, choice: ExtractorChoice) -> None:
    """Refuse an extractor whose key differs from the stored one (compute dtype aside).

    A `model=` override may name the same weights differently (a local copy of a hub model): the
    model name is then not compared when both keys carry the same non-empty revision.
    """
    stored = (metadata.get("extraction_key") or {}).get("extractor")
    if stored is None:
        return
    now = json.loads(json.dumps(extractor.key, default=str))
    same_weights = (
        choice.source == "override"
        and stored.get("revision")
        and (stored.get("revision") == now.get("revision"))
    )
    ignore = {"dtype"} | ({"model"} if same_weights else set())
    diff = sorted(k for k in set(stored) | set(now) if k not in ignore and stored.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{k}: fitted on {stored.get(k)!r}, now {now.get(k)!r}" for k in diff)
        raise ModelMismatchError(
            f"model {choice.model} gives different features from the ones the classifier was fitted on "
            f"({shown}). Refit on this model's features: `calm extract --model {choice.model} "
            f"--data KIND:ROOT --out STORE` (same --prompt/--heads/--layers/-o options), then "
            f"`calm fit STORE --out MODEL.safetensors`"
            + (
                "; or drop --model to use the model it was fitted on."
                if choice.source == "override"
                else " (the model changed since the classifier was fitted, e.g. a new hub revision)."
            )
        )


def _suffix_for(data: bytes, name: str | None) -> str:
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    suffix = Path(name or "").suffix.lower()
    return suffix if suffix.isascii() and suffix[1:].isalnum() and len(suffix) <= 6 else ".bin"


class Predictor:
    """A fitted classifier and the frozen model it was fitted on (see the module docstring).

    `preprocess` is thread-safe; `forward` must run in one thread at a time (`calm serve` gives it
    one worker thread).
    """

    def __init__(self, classifier: Any, extractor: Any, *, min_seconds: float = MIN_SECONDS):
        self.classifier = classifier
        self.extractor = extractor
        self.min_seconds = float(min_seconds)
        self.classes = list(np.asarray(classifier.classes_).tolist())

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
        """Classes, model, prompt, heads and how the classifier was fitted (JSON-ready)."""
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
        }

    # -- preprocess -------------------------------------------------------------------------------
    def preprocess(self, source: str | os.PathLike | bytes, *, name: str | None = None) -> Clip:
        """Decode a path, or the bytes of one audio file (`name`: its file name, for messages)."""
        if isinstance(source, bytes | bytearray | memoryview):
            return self._preprocess_bytes(bytes(source), name or "upload")
        shown = name or str(source)
        try:
            wave = self.extractor.load_input(source)
        except ClipError:
            raise
        except (ValueError, OSError, RuntimeError, EOFError) as exc:  # AudioError, decoders, missing files
            raise ClipError(shown, str(getattr(exc, "reason", None) or exc)) from exc
        wave = np.asarray(wave, dtype=np.float32)
        duration = wave.shape[-1] / float(self.extractor.sample_rate) if wave.size else 0.0
        if wave.size == 0:
            raise ClipError(shown, "empty (no audio samples)")
        if not np.isfinite(wave).all():
            raise ClipError(shown, "contains NaN or infinite samples")
        if duration < self.min_seconds:
            raise ClipError(shown, f"too short ({duration:.3f} s; at least {self.min_seconds:g} s needed)")
        return Clip(shown, wave, duration)

    def _preprocess_bytes(self, data: bytes, name: str) -> Clip:
        if not data:
            raise ClipError(name, "empty body (no audio data)")
        fd, tmp = tempfile.mkstemp(prefix="calm-upload-", suffix=_suffix_for(data, name))
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            try:
                return self.preprocess(tmp, name=name)
            except ClipError as exc:  # the reason must not show the temporary file's name
                raise ClipError(name, exc.reason.replace(tmp, name)) from None
        finally:
            os.unlink(tmp)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray | str]:
        """Class probabilities (C,) per waveform, or the reason it has none."""
        if not waveforms:
            return []
        try:
            feats = np.asarray(self.extractor.extract(list(waveforms)), dtype=np.float32)
        except Exception as exc:  # any model failure: isolate it to the clip that caused it
            if len(waveforms) == 1:
                return [f"model error: {type(exc).__name__}: {exc}"]
            return [r for w in waveforms for r in self.forward([w])]
        out: list[np.ndarray | str] = ["non-finite features (the model gave NaN or infinity)"] * len(feats)
        finite = np.isfinite(feats.reshape(len(feats), -1)).all(axis=1)
        if finite.any():
            proba = np.asarray(self.classifier.predict_proba(feats[finite]), dtype=np.float64)
            for i, p in zip(np.flatnonzero(finite), proba, strict=True):
                out[i] = p if np.isfinite(p).all() else "non-finite class probabilities"
        return out

    # -- postprocess ------------------------------------------------------------------------------
    def postprocess(self, clip: Clip, probabilities: np.ndarray, *, top_k: int = 1) -> Prediction:
        """The most probable class and the `top_k` best (ties: the lower class index first)."""
        order = np.argsort(-probabilities, kind="stable")[: max(1, int(top_k))]
        best = [(self.classes[j], float(probabilities[j])) for j in order]
        return Prediction(clip.source, best[0][0], best[0][1], best, clip.duration)

    def __call__(
        self,
        sources: Sequence[str | os.PathLike],
        *,
        top_k: int = 1,
        batch_size: int = 8,
    ) -> list[Prediction]:
        """One `Prediction` per source, in order; a clip that fails gets its error, the rest go on."""
        results: dict[int, Prediction] = {}
        clips: list[tuple[int, Clip]] = []
        for i, src in enumerate(sources):
            try:
                clips.append((i, self.preprocess(src)))
            except ClipError as exc:
                results[i] = Prediction(str(src), error=exc.reason)
        for start in range(0, len(clips), batch_size):
            batch = clips[start : start + batch_size]
            for (i, clip), out in zip(batch, self.forward([c.waveform for _, c in batch]), strict=True):
                if isinstance(out, str):
                    results[i] = Prediction(clip.source, duration=clip.duration, error=out)
                else:
                    results[i] = self.postprocess(clip, out, top_k=top_k)
        return [results[i] for i in range(len(sources))]


def load_predictor(
    model_file: str | os.PathLike,
    *,
    model: str | None = None,
    device: str = "cpu",
    min_seconds: float = MIN_SECONDS,
    announce: Callable[[ExtractorChoice], None] | None = None,
) -> Predictor:
    """Load a classifier saved by `calm fit` / `clf.save` and the model its metadata names.

    Args:
        model_file: the `.safetensors` classifier file.
        model: load this model instead (registered name, hub id or directory); its extraction key
            must equal the stored one, else `ModelMismatchError` says how to refit.
        device: torch device of the model.
        min_seconds: shorter clips are refused (`ClipError`).
        announce: called with the `ExtractorChoice` before the model is loaded (the CLI prints it).
    """
    import calm
    from calm.models import load_extractor

    classifier = calm.load(model_file)
    metadata = dict(getattr(classifier, "metadata_", {}) or {})
    choice = choose_extractor(metadata, model=model, device=device)
    if announce is not None:
        announce(choice)
    extractor = load_extractor(choice.model, **choice.kwargs)
    check_extraction_key(metadata, extractor, choice)
    return Predictor(classifier, extractor, min_seconds=min_seconds)
