"""The feature half of the one inference path: `FeaturePipeline` turns any accepted input into
per-head features, clip by clip, with per-clip errors; `calm.inference.Predictor` adds the
classifier on top of it (and `calm predict`, `calm serve` and `calm.AudioClassifier` run that).

- `preprocess(source)`: an input (`calm.audio_inputs`: path, bytes, `(waveform, rate)`, audio dict)
  -> a checked `DecodedClip`; anything wrong with it is a `ClipError`.
- `embed(waveforms)`: a batch -> one (K, d) feature array per clip, or the reason it has none. A
  model error in a batch is retried clip by clip, so one clip never costs the others.
- `features(X, sample_rate=, batch_size=, cache=)`: both over a list of inputs -> `ClipFeatures`
  (rows, per-clip errors, durations). With `cache=FOLDER` the files go through the feature store
  there (`calm.store.extract_to_store`, float32): clips stored with the same content hash are read
  back, not decoded (their duration is the one recorded in the store's index; None in stores
  written before it was recorded); the others are decoded once, by the store, which applies
  the same checks (`checked_clip`) and gives the same reasons. Waveforms are never cached (the
  store keys features by path and hash).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calm.audio_inputs import (
    MIN_SECONDS,
    AudioInput,
    ClipError,
    DecodedClip,
    as_input,
    as_inputs,
    bytes_file,
    checked_clip,
    error_reason,
    long_enough,
    prepare_wave,
)
from calm.models.base import FeatureExtractor

#: storage dtype of the cache (float32: features equal those extracted without a cache)
CACHE_DTYPE = "float32"
NON_FINITE = "non-finite features (the model gave NaN or infinity)"


@dataclass
class ClipFeatures:
    """What `FeaturePipeline.features` made of n inputs: `rows` {index: (K, d) float32}, `errors`
    {index: ClipError}, every index in exactly one of them; `durations` {index: seconds} of the
    decoded clips; `sources` the name of each input."""

    sources: list[str]
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    errors: dict[int, ClipError] = field(default_factory=dict)
    durations: dict[int, float] = field(default_factory=dict)

    def fail(self, i: int, source: str, reason: str) -> None:
        self.errors[i] = ClipError(source, reason)

    def stacked(self, n_heads: int) -> tuple[np.ndarray, list[int]]:
        """(features of the usable clips (m, K, d) in input order, their indices)."""
        ok = sorted(self.rows)
        if not ok:
            return np.zeros((0, n_heads, 0), dtype=np.float32), ok
        return np.stack([self.rows[i] for i in ok]), ok

    def error(self) -> ClipError | None:
        """One `ClipError` naming every failed clip, or None."""
        return ClipError.of([self.errors[i] for i in sorted(self.errors)]) if self.errors else None


class FeaturePipeline:
    """A frozen model's features of audio inputs (see the module docstring).

    `preprocess` is thread-safe; `embed` must run in one thread at a time.
    """

    def __init__(self, extractor: FeatureExtractor, *, min_seconds: float = MIN_SECONDS):
        self.extractor = extractor
        self.min_seconds = float(min_seconds)

    @property
    def windows(self) -> bool:
        """Whether the model averages windows of a long clip (`long="windows"`)."""
        return dict(self.extractor.key).get("long") == "windows"

    # -- preprocess -------------------------------------------------------------------------------
    def preprocess(self, source: Any, *, name: str | None = None, sample_rate: Any = None) -> DecodedClip:
        """One input (`name`: how messages call it) -> a checked `DecodedClip`, or ClipError."""
        if isinstance(source, bytes | bytearray | memoryview):
            shown = name or "upload"
            with bytes_file(bytes(source), shown) as tmp:
                try:
                    return self.preprocess(tmp, name=shown)
                except ClipError as exc:  # the reason must not show the temporary file's name
                    raise ClipError(shown, exc.reason.replace(tmp, shown)) from None
        return self.decode(as_input(source, name or str(source), sample_rate), name=name)

    def decode(self, item: AudioInput, *, name: str | None = None) -> DecodedClip:
        """An `AudioInput` decoded at the model's rate and checked (`calm.audio_inputs`)."""
        shown = name or item.name
        ex = self.extractor
        if item.path is None:
            wave = prepare_wave(item, ex.sample_rate, ex.max_seconds, self.windows, self.min_seconds)
        else:
            try:
                wave = ex.load_input(item.path)
            except ClipError:
                raise
            except (ValueError, OSError, RuntimeError, EOFError) as exc:  # AudioError, decoders, missing
                raise ClipError(shown, error_reason(exc)) from exc
        return checked_clip(shown, wave, ex.sample_rate, self.min_seconds)

    # -- forward (features) -----------------------------------------------------------------------
    def embed(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray | str]:
        """ClipFeatures (K, d) float32 per waveform, or the reason it has none."""
        if not waveforms:
            return []
        try:
            feats = np.asarray(self.extractor.extract(list(waveforms)), dtype=np.float32)
        except Exception as exc:  # any model failure: isolate it to the clip that caused it
            if len(waveforms) == 1:
                return [f"model error: {type(exc).__name__}: {exc}"]
            return [r for w in waveforms for r in self.embed([w])]
        return [row if np.isfinite(row).all() else NON_FINITE for row in feats]

    # -- the whole path over a list of inputs -----------------------------------------------------
    def features(
        self,
        X: Any,
        *,
        sample_rate: Any = None,
        batch_size: int = 8,
        cache: str | os.PathLike | None = None,
    ) -> ClipFeatures:
        """Every input of X decoded, checked and embedded (files through the store under `cache`)."""
        inputs = as_inputs(X, sample_rate)
        out = ClipFeatures([x.source if isinstance(x, ClipError) else x.name for x in inputs])
        batch: list[tuple[int, DecodedClip]] = []
        stored: list[tuple[int, Path]] = []
        for i, clip_input in enumerate(inputs):
            if not isinstance(clip_input, ClipError) and cache is not None and clip_input.path is not None:
                stored.append((i, clip_input.path))  # decoded and checked by the store, if not stored yet
                continue
            try:
                if isinstance(clip_input, ClipError):
                    raise clip_input
                clip = self.decode(clip_input)
            except ClipError as exc:
                out.errors[i] = exc
                continue
            out.durations[i] = clip.duration
            batch.append((i, clip))
            if len(batch) == batch_size:
                self._embed_into(out, batch)
                batch = []
        self._embed_into(out, batch)
        if stored:
            self._from_store(out, stored, Path(cache), batch_size)  # type: ignore[arg-type]
        return out

    def _embed_into(self, out: ClipFeatures, batch: list[tuple[int, DecodedClip]]) -> None:
        for (i, clip), row in zip(batch, self.embed([c.waveform for _, c in batch]), strict=True):
            if isinstance(row, str):
                out.fail(i, clip.source, row)
            else:
                out.rows[i] = row

    def _from_store(
        self, out: ClipFeatures, files: list[tuple[int, Path]], cache: Path, batch_size: int
    ) -> None:
        """ClipFeatures and durations of files through the store under `cache`: stored ones are read
        back without decoding, the others decoded, checked and extracted there (one decode each)."""
        from calm.store import extract_to_store, load_features, store_path

        paths = [store_path(p) for _, p in files]
        report = extract_to_store(
            self.extractor,
            paths,
            cache,
            batch_size=batch_size,
            dtype=CACHE_DTYPE,
            progress=False,
            min_seconds=self.min_seconds,
        )
        failed = {store_path(p): reason for p, reason in report.failed}
        X, _, meta = load_features(cache, key=report.digest)
        row_of = {p: r for r, p in enumerate(meta["path"])}
        seconds = meta["duration"].tolist()
        wanted = []
        for (i, _), p in zip(files, paths, strict=True):
            try:
                if p in failed or p not in row_of:
                    raise ClipError(out.sources[i], failed.get(p, "not in the store after extraction"))
                if seconds[row_of[p]] is not None:  # stored under a lower min_seconds: refused here too
                    out.durations[i] = long_enough(
                        out.sources[i], float(seconds[row_of[p]]), self.min_seconds
                    )
            except ClipError as exc:
                out.errors[i] = exc
                continue
            wanted.append((i, row_of[p]))
        if wanted:
            feats = np.asarray(X[np.asarray([r for _, r in wanted])], dtype=np.float32)
            out.rows.update({i: row for (i, _), row in zip(wanted, feats, strict=True)})
