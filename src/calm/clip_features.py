"""Per-head features of a list of clips (`calm.audio_inputs.AudioInput`), with per-clip failures.

Files go through the feature store when a cache folder is given (`calm.store.extract_to_store`:
clips already stored with the same content hash are read back, not extracted); waveforms, and
files without a cache, are decoded and extracted here in batches. A clip that cannot be decoded,
or whose features are not finite, is a failure `(index, "name: reason")`; the other clips keep
their features. A batch the model fails on is retried clip by clip to single out the clip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from calm.audio_inputs import AudioInput, error_reason, prepare_wave

#: storage dtype of the cache (float32: features equal those extracted without a cache)
CACHE_DTYPE = "float32"


def _windowed(extractor: Any) -> bool:
    from calm.models.windows import WindowedExtractor

    return isinstance(extractor, WindowedExtractor)


def load_clip(extractor: Any, clip: AudioInput) -> Any:
    """The model input of one clip (files: `extractor.load_input`; waveforms: `prepare_wave`)."""
    if clip.path is not None:
        return extractor.load_input(clip.path)
    return prepare_wave(clip, extractor.sample_rate, extractor.max_seconds, _windowed(extractor))


Rows = dict[int, np.ndarray]  # clip index -> features (K, d)
Failures = dict[int, str]  # clip index -> "name: reason"


def _extract(extractor: Any, loaded: list[tuple[int, Any]], rows: Rows, failures: Failures, names) -> None:
    """Features of (index, input) pairs into `rows`; a failing batch is retried one clip at a time."""
    try:
        feats = np.asarray(extractor.extract([x for _, x in loaded]), dtype=np.float32)
    except Exception:
        if len(loaded) == 1:
            raise
        for item in loaded:
            try:
                _extract(extractor, [item], rows, failures, names)
            except Exception as exc:  # this clip breaks the model: name it, keep the others
                failures[item[0]] = f"{names[item[0]]}: {error_reason(exc)}"
        return
    for (i, _), row in zip(loaded, feats, strict=True):
        if np.isfinite(row).all():
            rows[i] = row
        else:
            failures[i] = f"{names[i]}: features are not finite"


def _direct(
    extractor: Any, clips: list[tuple[int, AudioInput]], rows: Rows, failures: Failures, batch_size: int
):
    names = {i: clip.name for i, clip in clips}
    batch: list[tuple[int, Any]] = []
    for i, clip in clips:
        try:
            batch.append((i, load_clip(extractor, clip)))
        except Exception as exc:  # unreadable / empty / silent clips: recorded, not fatal
            failures[i] = f"{clip.name}: {error_reason(exc)}"
        if len(batch) == batch_size:
            _extract(extractor, batch, rows, failures, names)
            batch = []
    if batch:
        _extract(extractor, batch, rows, failures, names)


def _cached(
    extractor: Any,
    clips: list[tuple[int, AudioInput]],
    cache: Path,
    rows: Rows,
    failures: Failures,
    batch_size: int,
) -> None:
    """Files through the store under `cache` (stored clips with the same content are read back)."""
    from calm.store import extract_to_store, load_features, store_path

    paths = [store_path(clip.path or clip.name) for _, clip in clips]
    report = extract_to_store(
        extractor, paths, cache, batch_size=batch_size, dtype=CACHE_DTYPE, progress=False
    )
    failed = {store_path(p): reason for p, reason in report.failed}
    X, _, meta = load_features(cache, key=report.digest)
    row_of = {p: r for r, p in enumerate(meta["path"])}
    wanted = []
    for (i, clip), p in zip(clips, paths, strict=True):
        if p in failed or p not in row_of:
            failures[i] = f"{clip.name}: {failed.get(p, 'not in the store after extraction')}"
        else:
            wanted.append((i, row_of[p]))
    if wanted:
        feats = np.asarray(X[np.asarray([r for _, r in wanted])], dtype=np.float32)
        rows.update({i: row for (i, _), row in zip(wanted, feats, strict=True)})


def clip_features(
    extractor: Any, clips: list[AudioInput], *, cache: str | Path | None = None, batch_size: int = 8
) -> tuple[Rows, Failures]:
    """({index: features (K, d) float32}, {index: "name: reason"}): every clip is in one of them.

    With `cache`, files are read from / added to the feature store in that folder."""
    rows: Rows = {}
    failures: Failures = {}
    files = [(i, c) for i, c in enumerate(clips) if c.path is not None]
    direct = [(i, c) for i, c in enumerate(clips) if c.path is None]
    if cache is not None and files:
        _cached(extractor, files, Path(cache), rows, failures, batch_size)
    else:
        direct = files + direct
    _direct(extractor, direct, rows, failures, batch_size)
    return rows, failures
