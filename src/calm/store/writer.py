"""Writing a feature store: extract clips' features into a key folder, resumably.

One job: run an extraction (`Extraction`, or the one-call `extract_to_store`): plan which clips
still need features (a clip is skipped when its absolute path is in the index with the same
content hash; a changed file's old row is dropped first, so a failed re-extraction never leaves
the old content's features behind), decode them ahead of the model, store each batch as one
shard, record failures, and report progress through a callback (`ExtractProgress` events; the
CLI draws them as a bar, the library has no terminal code beyond a plain text printer).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from calm._files import printable
from calm.audio_inputs import MIN_SECONDS, error_reason
from calm.models.base import ClipSource, FeatureExtractor
from calm.store.events import ExtractProgress, ExtractReport, ProgressCallback, as_callback
from calm.store.folder import KeyFolder, open_key_folder
from calm.store.format import DTYPES, FAILURES_FILE, LOCK_FILE, StoreError, StoreLock, no_link, store_path
from calm.store.pipeline import Decoded, decode_ahead, extract_batch, safe_hash

log = logging.getLogger("calm.store")


def _as_clips(clips: Any) -> list[Any]:
    from calm.data.base import Clip

    items = getattr(clips, "clips", clips)  # a Dataset
    return [c if isinstance(c, Clip) else Clip(path=Path(c), labels=()) for c in items]


def plan_clips(clips: Any, limit: int | None = None) -> list[tuple[str, Any]]:
    """(stored path, Clip) pairs of `clips` (Clips, a Dataset or paths), each path once, the first
    `limit` of them (so re-running with the same limit resumes the same work). A path listed twice
    with different labels is refused."""
    seen: dict[str, Any] = {}
    todo = []
    for clip in _as_clips(clips):
        p = store_path(clip.path)
        if p in seen:
            if tuple(seen[p].labels) != tuple(clip.labels):
                raise StoreError(
                    f"{printable(p)}: listed twice with different labels "
                    f"({seen[p].label!r} and {clip.label!r}); fix the dataset"
                )
            log.warning("%s listed twice: extracted once", printable(p))
            continue
        seen[p] = clip
        todo.append((p, clip))
    return todo if limit is None else todo[: max(0, int(limit))]


class Extraction:
    """Extraction of one extractor's features into the store `out` (its key folder for this
    extractor's key and the storage `dtype`), resumable and crash-safe.

    Audio decoding (`extractor.load_input`), the clip checks (`calm.audio_inputs.checked_clip`:
    a waveform shorter than `min_seconds`, empty or not finite fails with its reason) and hashing
    run in `workers` threads (default: min(4, CPUs)), up to `prefetch` clips ahead of the model,
    which gets batches of `batch_size`.
    `progress`: a callable receiving `ExtractProgress` events, True for a `TextProgress` printer
    on stderr, False or None for silence. `run` may be called more than once; each run holds the
    key folder's lock while it works.
    """

    def __init__(
        self,
        extractor: ClipSource,
        out: str | Path,
        *,
        batch_size: int = 8,
        dtype: str = "float16",
        workers: int | None = None,
        prefetch: int | None = None,
        progress: bool | ProgressCallback | None = None,
        min_seconds: float = MIN_SECONDS,
    ):
        if dtype not in DTYPES:
            raise StoreError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise StoreError(f"batch_size must be at least 1, got {batch_size}")
        self.extractor = extractor
        self.out = Path(out)
        self.batch_size = batch_size
        self.dtype = dtype
        self.workers = max(1, workers if workers is not None else min(4, os.cpu_count() or 1))
        self.prefetch = max(prefetch or 2 * batch_size + self.workers, batch_size)
        self.progress = as_callback(progress)
        self.min_seconds = float(min_seconds)

    def open_folder(self) -> KeyFolder:
        """The key folder this extraction writes to (created, not yet locked or recovered)."""
        ext = self.extractor
        folder = open_key_folder(
            self.out, ext.key, ext.head_names, getattr(ext, "model_id", "model"), self.dtype
        )
        try:
            folder.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"{folder.root}: cannot create the store folder ({exc.strerror or exc})"
            ) from None
        return folder

    @contextmanager
    def start(self, clips: Any, *, limit: int | None = None) -> Iterator[ExtractionRun]:
        """Lock the key folder, recover it after a crash and plan: yields an `ExtractionRun` whose
        `pending` clips still need features. `run` drives it with the local pipeline; a
        distributed extraction can compute features elsewhere and `write` them through it. On
        exit the index is closed and `report.seconds` set; the lock is held until then."""
        t0 = time.perf_counter()
        todo = plan_clips(clips, limit)
        folder = self.open_folder()
        report = ExtractReport(store=folder.root, digest=folder.digest, total=len(todo))
        with StoreLock(no_link(folder.root / LOCK_FILE)):
            if "feature_shape" in folder.info:
                report.redone = folder.recover()
            pending, hashes = self.pending(folder, todo, report)
            with open(no_link(folder.root / FAILURES_FILE), "w", encoding="utf-8") as failures_log:
                try:
                    yield ExtractionRun(self, folder, report, failures_log, pending, hashes)
                finally:
                    folder.close()
        report.seconds = time.perf_counter() - t0

    def run(self, clips: Any, *, limit: int | None = None, allow_failures: bool = True) -> ExtractReport:
        """Extract the features of `clips` (Clips, a Dataset or paths) not stored yet; see
        `extract_to_store`."""
        with self.start(clips, limit=limit) as run:
            run.extract()
        _check_failures(run.report, allow_failures)
        return run.report

    def pending(
        self, folder: KeyFolder, todo: list[tuple[str, Any]], report: ExtractReport
    ) -> tuple[list[tuple[str, Any]], dict[str, str | None]]:
        """The (path, clip) pairs of `todo` still to extract, and the hashes of those already
        indexed; counts the skipped ones in `report` and drops the old rows of changed files."""
        known = [p for p, _ in todo if p in folder.rows]
        hashes: dict[str, str | None] = {}
        if known:
            with ThreadPoolExecutor(self.workers) as pool:
                hashes = dict(zip(known, pool.map(safe_hash, known), strict=True))
        pending = []
        for p, clip in todo:
            if p in folder.rows and hashes.get(p) == folder.rows[p]["hash"]:
                report.skipped += 1
            else:
                pending.append((p, clip))
        folder.forget(p for p, _ in pending)  # changed (or vanished) files: their old rows go
        return pending, hashes


def _check_failures(report: ExtractReport, allow_failures: bool) -> None:
    """Log the failed clips; raise StoreError listing them unless `allow_failures`."""
    if not report.failed:
        return
    listing = "\n  ".join(f"{p}: {r}" for p, r in report.failed)
    log.warning("%d clips failed:\n  %s", len(report.failed), listing)
    if not allow_failures:
        n = len(report.failed)
        raise StoreError(f"{n} clips failed (the others are stored in {report.store}):\n  {listing}")


class ExtractionRun:
    """One run of an `Extraction` under the key folder's lock (made by `Extraction.start`).

    `pending`: the (path, clip) pairs still to extract; `hashes`: path -> sha256 of the clips
    already indexed. `extract()` runs the local pipeline (threaded decoding, the model, writes);
    a driver of its own calls `store(items)` (model + write) or `write(items, features)`
    (features computed elsewhere) with `Decoded` items, `fail` for clips that failed, and
    `advance(n)` to send a progress event. The first event (done 0) is sent on creation.
    """

    def __init__(
        self,
        job: Extraction,
        folder: KeyFolder,
        report: ExtractReport,
        failures_log: IO[str],
        pending: list[tuple[str, Any]],
        hashes: dict[str, str | None],
    ):
        self.job = job
        self.folder = folder
        self.report = report
        self.failures_log = failures_log
        self.pending = pending
        self.hashes = hashes
        self.origins = {p: str(c.meta["origin"]) for p, c in pending if "origin" in getattr(c, "meta", {})}
        self.done = 0
        self.stored_before = report.stored
        self.t0 = time.perf_counter()
        self.advance(0)

    def advance(self, n: int) -> None:
        """Count `n` more clips as done (stored or failed) and send a progress event."""
        self.done += n
        if self.job.progress is None:
            return
        seconds = time.perf_counter() - self.t0
        self.job.progress(
            ExtractProgress(
                done=self.done,
                total=len(self.pending),
                failed=len(self.report.failed),
                stored=self.report.stored - self.stored_before,
                skipped=self.report.skipped,
                seconds=seconds,
                clips_per_second=self.done / seconds if seconds > 0 else 0.0,
            )
        )

    def fail(self, path: str, clip_hash: str | None, reason: str) -> None:
        """Record a failed clip in the report and in failures.jsonl; the reason starts with the
        clip's `origin` when its loader gave one (an `hf:` row whose audio is a cache file)."""
        if path in self.origins:
            reason = f"{self.origins[path]}: {reason}"
        self.report.failed.append((path, reason))
        self.failures_log.write(json.dumps({"path": path, "hash": clip_hash, "reason": reason}) + "\n")
        self.failures_log.flush()

    def extract(self) -> None:
        """Decode the pending clips ahead of the model in threads, and store them batch by batch."""
        job = self.job
        batch: list[Decoded] = []
        decoded = decode_ahead(
            job.extractor,
            self.pending,
            self.hashes,
            workers=job.workers,
            prefetch=job.prefetch,
            min_seconds=job.min_seconds,
        )
        with closing(decoded):
            for item in decoded:
                if item.reason is not None:
                    self.fail(item.path, item.hash, item.reason)
                    self.advance(1)
                else:
                    batch.append(item)
                if len(batch) >= job.batch_size or (batch and not item.more):
                    self.store(batch)
                    self.advance(len(batch))
                    batch = []

    def store(self, batch: list[Decoded]) -> None:
        """Run the model on decoded clips and write those it handled (see `write`)."""
        n_heads = len(self.folder.info["head_names"])
        # a local run holds a whole extractor; a Ray driver's shell never reaches here (actors extract)
        extractor = cast(FeatureExtractor, self.job.extractor)
        feats, ok, errors = extract_batch(extractor, [d.input for d in batch], n_heads)
        for i, exc in errors:
            self.fail(batch[i].path, batch[i].hash, f"model error: {error_reason(exc)}")
        self.write([batch[i] for i in ok], feats)

    def write(self, items: list[Decoded], features: np.ndarray) -> None:
        """Store `features` (len(items), K, d) of `items` as one shard; rows that are not finite in
        the storage dtype are recorded as failures instead."""
        folder = self.folder
        with np.errstate(over="ignore", invalid="ignore"):
            stored = features.astype(DTYPES[folder.dtype][0])
        finite = np.isfinite(stored).reshape(len(stored), -1).all(axis=1)
        for j in np.flatnonzero(~finite):
            hint = " (too large for float16: use dtype float32)" if np.isfinite(features[j]).all() else ""
            self.fail(items[j].path, items[j].hash, f"non-finite features{hint}")
        keep = np.flatnonzero(finite)
        if keep.size == 0:
            return
        if "feature_shape" not in folder.info:
            folder.set_feature_shape((int(features.shape[1]), int(features.shape[2])))
        elif list(features.shape[1:]) != list(folder.feature_shape):
            held = folder.feature_shape
            raise StoreError(f"{folder.root}: features of shape {features.shape[1:]}, the store holds {held}")
        rows = [_index_row(items[j], folder.digest) for j in keep]
        folder.write_batch(stored[keep], rows)
        self.report.stored += len(rows)


def _index_row(item: Decoded, digest: str) -> dict[str, Any]:
    """A clip's index row before its shard is known (shard, row and checksums follow)."""
    clip = item.clip
    return {
        "path": item.path,
        "hash": item.hash,
        "label": clip.label,
        "labels": list(clip.labels),
        "fold": clip.fold,
        "split": clip.split,
        "meta": dict(clip.meta),
        "key": digest,
        "duration": item.duration,
    }


def extract_to_store(
    extractor: FeatureExtractor,
    clips: Any,
    out: str | Path,
    *,
    batch_size: int = 8,
    dtype: str = "float16",
    limit: int | None = None,
    allow_failures: bool = True,
    progress: bool | ProgressCallback | None = True,
    workers: int | None = None,
    prefetch: int | None = None,
    min_seconds: float = MIN_SECONDS,
) -> ExtractReport:
    """Extract the features of `clips` into the store `out`, skipping clips already stored.

    clips: `Clip`s, a `Dataset`, or paths. `limit` keeps the first N clips (so re-running with
    the same limit resumes the same work). Audio decoding (`extractor.load_input`) and hashing run
    in `workers` threads (default: min(4, CPUs)), up to `prefetch` clips ahead of the model. A
    decoded waveform must pass the checks every clip passes (`calm.audio_inputs.checked_clip`:
    samples, all finite, at least `min_seconds` long); its duration is recorded in its index row.
    `progress`: a callable receiving `ExtractProgress` events, True for plain lines on stderr
    (`TextProgress`), False or None for none. Clips that fail to load (or whose features are not
    finite) are recorded with the reason in the report and in failures.jsonl; with
    `allow_failures=False` a StoreError listing them is raised after every other clip is stored.
    Errors of the model itself propagate (after a failing batch is retried clip by clip, to
    single out a clip that breaks the model).
    """
    job = Extraction(
        extractor,
        out,
        batch_size=batch_size,
        dtype=dtype,
        workers=workers,
        prefetch=prefetch,
        progress=progress,
        min_seconds=min_seconds,
    )
    return job.run(clips, limit=limit, allow_failures=allow_failures)
