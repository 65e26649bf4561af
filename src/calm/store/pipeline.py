"""The extraction pipeline's two stages: threaded decoding ahead of the model, and the model call.

One job: turn pending clips into features. `decode_ahead` decodes clips (`extractor.load_input`),
checks a decoded waveform as every clip is checked (`calm.audio_inputs.checked_clip`: samples, all
finite, at least `min_seconds`) and hashes those that pass, in worker threads, a bounded number of
clips ahead of the consumer;
`extract_batch` runs the model on a batch and, when the batch fails, clip by clip to single out
the clips that break it. Nothing here writes to disk.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Generator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from calm.audio_inputs import MIN_SECONDS, checked_clip, error_reason
from calm.models.base import ClipSource, FeatureExtractor
from calm.store.format import StoreError, file_sha256


@dataclass
class Decoded:
    """One clip after decoding: its model input, or the reason it could not be read."""

    path: str  # as stored (`store_path`)
    clip: Any  # the `Clip`
    hash: str | None  # sha256 of the file's bytes (None when unreadable)
    input: Any  # `extractor.load_input(path)`, None on failure
    reason: str | None  # why it failed, None when it did not
    more: bool  # whether more clips follow
    duration: float | None = None  # seconds of a decoded waveform (None: not a waveform, or unknown)


class Prepared(NamedTuple):
    """What `prepare` made of one clip: its content hash, model input and duration, or the reason
    it failed."""

    hash: str | None
    input: Any
    reason: str | None
    duration: float | None = None


def safe_hash(path: str) -> str | None:
    """A clip's sha256, or None when it cannot be read."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def input_duration(extractor: ClipSource, path: str, x: Any, min_seconds: float) -> float | None:
    """The duration (seconds) of a decoded waveform `x` after the checks every clip passes
    (`calm.audio_inputs.checked_clip`; ClipError when it fails one); None for a model input that
    is not a waveform (a `VideoClip`, ...), which only the model checks."""
    if not isinstance(x, np.ndarray):
        return None
    return checked_clip(path, x, extractor.sample_rate, min_seconds).duration


def prepare(
    extractor: ClipSource, path: str, known_hash: str | None, min_seconds: float = MIN_SECONDS
) -> Prepared:
    """Worker: decode and check one clip (`input_duration`), then hash it. Decodes first and hashes
    only what passes (an undecodable file, however large, fails without being read in full); a file
    that changes while it is read fails too, so a stored hash always belongs to the decoded content."""
    try:
        before = os.stat(path)
        x = extractor.load_input(path)
        duration = input_duration(extractor, path, x, min_seconds)
    except Exception as exc:  # any per-clip decoding problem is recorded, not fatal
        return Prepared(None, None, error_reason(exc))
    try:
        digest = known_hash or file_sha256(path)
        after = os.stat(path)
    except OSError as exc:
        return Prepared(None, None, error_reason(exc))
    if (before.st_ino, before.st_size, before.st_mtime_ns) != (
        after.st_ino,
        after.st_size,
        after.st_mtime_ns,
    ):
        return Prepared(None, None, "file changed while it was read (extract again)")
    return Prepared(digest, x, None, duration)


def decode_ahead(
    extractor: ClipSource,
    pending: Sequence[tuple[str, Any]],
    known_hashes: Mapping[str, str | None],
    *,
    workers: int,
    prefetch: int,
    min_seconds: float = MIN_SECONDS,
) -> Generator[Decoded, None, None]:
    """`Decoded` clips in the order of `pending` ((path, clip) pairs), decoded and checked
    (`prepare`) in `workers` threads at most `prefetch` clips ahead. Close the iterator (or exhaust
    it) to stop the threads."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="calm-load")
    queue: deque[tuple[str, Any, Future[Prepared]]] = deque()
    it = iter(pending)

    def fill() -> None:
        while len(queue) < prefetch:
            nxt = next(it, None)
            if nxt is None:
                return
            p, clip = nxt
            queue.append((p, clip, pool.submit(prepare, extractor, p, known_hashes.get(p), min_seconds)))

    try:
        fill()
        while queue:
            p, clip, fut = queue.popleft()
            done = fut.result()
            fill()
            yield Decoded(p, clip, done.hash, done.input, done.reason, bool(queue), done.duration)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _extract_checked(extractor: FeatureExtractor, inputs: list[Any], n_heads: int) -> np.ndarray:
    feats = np.asarray(extractor.extract(inputs))
    if feats.ndim != 3 or feats.shape[0] != len(inputs) or feats.shape[1] != n_heads:
        raise StoreError(
            f"{type(extractor).__name__}.extract returned shape {feats.shape} for {len(inputs)} clips; "
            f"expected ({len(inputs)}, {n_heads}, d)"
        )
    return feats


def extract_batch(
    extractor: FeatureExtractor, inputs: list[Any], n_heads: int
) -> tuple[np.ndarray, list[int], list[tuple[int, BaseException]]]:
    """(features of the clips that worked, their indices in `inputs`, [(index, error)] of the others).

    A failing batch is retried clip by clip; a model that fails on every clip (or on a batch of
    one) raises its error, and a wrong output shape raises StoreError.
    """
    try:
        return _extract_checked(extractor, inputs, n_heads), list(range(len(inputs))), []
    except StoreError:
        raise
    except Exception as batch_exc:
        if len(inputs) == 1:
            raise
        parts, ok = [], []
        errors: list[tuple[int, BaseException]] = []
        for i, x in enumerate(inputs):
            try:
                parts.append(_extract_checked(extractor, [x], n_heads))
                ok.append(i)
            except StoreError:
                raise
            except Exception as exc:
                errors.append((i, exc))
        if not ok:
            raise batch_exc
        return np.concatenate(parts), ok, errors
