"""Feature extraction on a Ray cluster with Ray Data: one node or many, GPU or CPU actors.

One job: compute the features of an `ExtractionRun`'s pending clips on a Ray cluster and hand
them back to the run, which writes them (the driver is the only writer: the same lock, shards,
index and failures as the local path, so a store written through Ray cannot be told apart).

The pipeline, streamed by Ray Data's executor (backpressure keeps every stage's queue bounded):

    pending clips, in chunks of batch_size   (a Ray dataset, one row per chunk)
      -> decode: `map` as CPU tasks           (hash + `extractor.load_input`, per-clip failures)
      -> embed: `map_batches` on an actor pool (each actor loads the extractor once from the
                                                `LoadSpec` it is given; batch = one chunk, exactly
                                                the batch the local path would run)
      -> the driver: `iter_rows` -> `ExtractionRun.write` / `fail` / `advance`

Fault tolerance: Ray Data creates the actors with `max_restarts=-1` and `max_task_retries=-1`: a
killed actor is restarted (its model reloaded) and its chunk run again; the driver ignores a
clip it has already written (a retried chunk's rows come back at most once more). A killed
driver loses at most the chunks in flight: the store's own crash safety covers the rest, and a
rerun (local or Ray) extracts only what is missing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calm.audio_inputs import error_reason
from calm.models.base import FeatureExtractor
from calm.models.spec import LoadSpec
from calm.store.events import ExtractReport, ProgressCallback
from calm.store.format import StoreError
from calm.store.pipeline import Decoded, extract_batch, prepare
from calm.store.stall import StallWatch
from calm.store.writer import Extraction, ExtractionRun, _check_failures

log = logging.getLogger("calm.store")
INSTALL_HINT = (
    "the Ray engine needs Ray Data: pip install 'calm-audio[ray]' (or pip install 'ray[data]>=2.40')"
)
DECODE_MEMORY = 512 * 2**20  # bytes a decoding task may hold (decoded audio of one chunk)
_SCALARS = (int, float, str, bool, type(None))


def require_ray() -> Any:
    """The `ray` module, or a StoreError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise StoreError(INSTALL_HINT) from None
    return ray


def load_recipe(recipe: LoadSpec) -> FeatureExtractor:
    """The extractor a `LoadSpec` describes, loaded in this process (each actor loads its own)."""
    from calm.models import load_extractor

    return load_extractor(recipe)


@dataclass(frozen=True)
class RayOptions:
    """Where and how the Ray engine runs.

    address: None (join the local cluster `ray start` made, else start one in this process),
        "auto" (an existing cluster, found through RAY_ADDRESS or this node), or "HOST:PORT".
    actors: extractor actors (None: one per GPU of the cluster, one on a CPU-only cluster).
    gpus_per_actor: GPUs per actor (None: 1 when the cluster has GPUs, else 0; fractions share).
    cpus_per_actor: CPUs per actor (also its torch threads, at least 1). None: 1, or less when
        the actors would otherwise leave no CPU to the decoding tasks (fractions share a CPU).
    decode_cpus: CPUs per decoding task.
    stall_minutes: with no clip finished for this long, say so (and again each such period).
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    decode_cpus: float = 0.5
    stall_minutes: float = 5.0

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise StoreError(f"actors must be at least 1, got {self.actors}")
        cpus = self.cpus_per_actor
        if (self.gpus_per_actor or 0) < 0 or (cpus is not None and cpus <= 0) or self.decode_cpus <= 0:
            raise StoreError("gpus_per_actor must be >= 0, cpus_per_actor and decode_cpus > 0")
        if not self.stall_minutes > 0:
            raise StoreError(f"stall_minutes must be > 0, got {self.stall_minutes}")

    def resolved(self, cluster: Mapping[str, float]) -> RayOptions:
        """These options with `actors`, `gpus_per_actor` and `cpus_per_actor` filled in from the
        cluster's resources; StoreError (one line: the numbers and the option to change) when the
        actors and one decoding task cannot run at once, which would wait forever."""
        gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
        per = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if gpus else 0.0)
        if per > gpus:
            raise StoreError(f"gpus_per_actor={per}, but the Ray cluster has {gpus:g} GPUs")
        actors = self.actors or (max(1, int(gpus // per)) if per else 1)
        if actors * per > gpus:
            raise StoreError(
                f"{actors} actors x {per:g} GPUs (--actors, --gpus-per-actor) need {actors * per:g} GPUs, "
                f"but the Ray cluster has {gpus:g}: lower --actors or --gpus-per-actor"
            )
        room = _floor(cpus - self.decode_cpus)  # one decoding task must always be able to run
        fit = _floor(room / actors)
        cpu = self.cpus_per_actor if self.cpus_per_actor is not None else min(1.0, fit)
        if cpu <= 0 or actors * cpu > room:
            asked = f"{actors} actors x {cpu:g} CPUs" if cpu > 0 else f"{actors} actors"
            raise StoreError(
                f"{asked} (--actors, --cpus-per-actor) and a decoding task of {self.decode_cpus:g} CPUs "
                f"do not fit the Ray cluster's {cpus:g} CPUs: lower --actors or --cpus-per-actor"
                + (f" (at most {fit:g} with {actors} actors)" if fit > 0 else "")
            )
        return dataclasses.replace(self, actors=actors, gpus_per_actor=per, cpus_per_actor=cpu)

    def describe(self, cluster: Mapping[str, float]) -> str:
        """One line: what the resolved options take of the cluster."""
        gpu = f" + {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        return (
            f"Ray: {self.actors} extractor actors x {self.cpus_per_actor:g} CPU{gpu}, decoding tasks of "
            f"{self.decode_cpus:g} CPU, on a cluster of {float(cluster.get('CPU', 0)):g} CPUs"
            f" and {float(cluster.get('GPU', 0)):g} GPUs"
        )


def _floor(value: float) -> float:
    """`value` rounded down to 2 decimals (Ray's fractional resources are exact to 1e-4)."""
    return math.floor(value * 100 + 1e-9) / 100


def _free(ray: Any) -> str:
    """What the cluster has free now (the actors and decoding tasks wait for it), for a stall line."""
    try:
        free, total = ray.available_resources(), ray.cluster_resources()
    except Exception:  # a lost connection: the wait itself says the rest
        return "the cluster's resources cannot be read"
    parts = [f"{float(free.get(r, 0)):g} of {float(total.get(r, 0)):g} {r}" for r in ("CPU", "GPU")]
    return (
        f"free on the cluster: {', '.join(parts)} (see `ray status`); still waiting "
        "(--ray-stall-minutes sets when this is said)"
    )


class ExtractorShell:
    """What the driver and the decoding tasks need of an extractor, without its model: `key`,
    `head_names`, `model_id`, and `load_input` (run on a copy of the extractor holding only its
    plain attributes: sample rate, length limit, video settings ...)."""

    def __init__(self, extractor: FeatureExtractor):
        self.key = extractor.key
        self.head_names = list(extractor.head_names)
        self.model_id = getattr(extractor, "model_id", "model")
        self.sample_rate = extractor.sample_rate
        reader = object.__new__(type(extractor))
        reader.__dict__.update({k: v for k, v in vars(extractor).items() if _plain(v)})
        self._reader = reader

    def load_input(self, path: str) -> Any:
        return self._reader.load_input(path)


def _plain(value: Any) -> bool:
    """A scalar, or a list / tuple of scalars (what `load_input` may read: rates, limits, sizes)."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)


def _describe(recipe: LoadSpec) -> ExtractorShell:
    return ExtractorShell(load_recipe(recipe))


def _shell(ray: Any, recipe: LoadSpec, opts: RayOptions) -> ExtractorShell:
    """The extractor's shell, read by one Ray task that loads the model (with an actor's resources)."""
    describe = ray.remote(num_cpus=opts.cpus_per_actor, num_gpus=opts.gpus_per_actor or None)(_describe)
    try:
        shell: ExtractorShell = ray.get(describe.remote(recipe))
    except ray.exceptions.RayTaskError as exc:
        raise StoreError(f"cannot load model {recipe.label!r} on Ray: {exc.cause or exc}") from None
    return shell


class Decode:
    """Ray Data `map` function: a chunk of paths -> their hashes and decoded inputs (CPU task)."""

    def __init__(self, shell: ExtractorShell):
        self.shell = shell

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        chunk = pickle.loads(row["blob"])
        prepared = [
            prepare(self.shell, p, known) for p, known in zip(chunk["paths"], chunk["known"], strict=True)
        ]
        chunk["hashes"] = [p.hash for p in prepared]
        chunk["inputs"] = [p.input for p in prepared]
        chunk["reasons"] = [p.reason for p in prepared]
        chunk["durations"] = [p.duration for p in prepared]
        return {"id": row["id"], "blob": pickle.dumps(chunk, protocol=5)}


class Embed:
    """Ray Data `map_batches` class: one actor, one extractor loaded once; a batch holds one chunk
    and becomes (ok indices, features float32 (n_ok, K, d), [(index, reason)] failures)."""

    def __init__(self, recipe: LoadSpec, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.extractor = load_recipe(recipe)
        self.n_heads = len(self.extractor.head_names)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blobs = [self.embed(pickle.loads(b)) for b in batch["blob"]]
        return {"id": np.asarray(batch["id"]), "blob": np.asarray(blobs, dtype=object)}

    def embed(self, chunk: dict[str, Any]) -> bytes:
        reasons = list(chunk.pop("reasons"))
        good = [i for i, r in enumerate(reasons) if r is None]
        inputs = chunk.pop("inputs")
        feats = np.zeros((0, self.n_heads, 0), dtype=np.float32)
        ok: list[int] = []
        if good:
            feats, done, errors = extract_batch(self.extractor, [inputs[i] for i in good], self.n_heads)
            ok = [good[j] for j in done]
            for j, exc in errors:
                reasons[good[j]] = f"model error: {error_reason(exc)}"
        out = {**chunk, "ok": ok, "features": feats, "reasons": reasons, "pid": os.getpid()}
        return pickle.dumps(out, protocol=5)


def connect(address: str | None) -> bool:
    """Connect this process to Ray (unless it already is); True when it connected here."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


def _chunks(run: ExtractionRun, size: int) -> list[dict[str, Any]]:
    paths = [p for p, _ in run.pending]
    rows: list[dict[str, Any]] = []
    for start in range(0, len(paths), size):
        part = paths[start : start + size]
        chunk = {"paths": part, "known": [run.hashes.get(p) for p in part]}
        rows.append({"id": len(rows), "blob": pickle.dumps(chunk, protocol=5)})
    return rows


def build_dataset(run: ExtractionRun, shell: ExtractorShell, recipe: LoadSpec, opts: RayOptions) -> Any:
    """The Ray dataset of `run`'s pending clips: chunks -> decode tasks -> actor pool."""
    ray = require_ray()
    rows = _chunks(run, run.job.batch_size)
    _quiet(ray)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    # the decode tasks' memory request (a chunk of decoded audio) also keeps Ray Data from fusing
    # them into the actors: decoding stays on CPU tasks, overlapped with the model
    ds = ds.map(Decode(shell), num_cpus=opts.decode_cpus, memory=DECODE_MEMORY)
    # Ray Data creates actor pools with max_restarts=-1 and max_task_retries=-1: a dead actor is
    # restarted and its chunk run again (tests/test_ray.py kills one)
    return ds.map_batches(
        Embed,
        fn_constructor_args=(recipe, int(opts.cpus_per_actor or 1)),
        batch_size=1,
        batch_format="numpy",
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=opts.actors),
        num_cpus=opts.cpus_per_actor,
        num_gpus=opts.gpus_per_actor or None,
    )


def _quiet(ray: Any) -> None:
    """No Ray Data progress bars or start-up banner: the run reports progress itself."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _decoded(path: str, clip: Any, clip_hash: str | None, duration: float | None) -> Decoded:
    return Decoded(path, clip, clip_hash, None, None, more=False, duration=duration)


def drain(run: ExtractionRun, results: Iterator[dict[str, Any]], watch: StallWatch | None = None) -> int:
    """Write the chunk results streamed from the cluster through `run`; a clip already written
    (a chunk retried after an actor died) is skipped. Returns the number of such duplicates.
    `watch` is told of every chunk that arrives."""
    clips = dict(run.pending)
    written: set[str] = set()
    duplicates = 0
    for row in results:
        res = pickle.loads(row["blob"])
        paths, hashes = res["paths"], res["hashes"]
        durations = res.get("durations", [None] * len(paths))
        fresh = [i for i, p in enumerate(paths) if p not in written]
        duplicates += len(paths) - len(fresh)
        new = set(fresh)
        keep = [j for j, i in enumerate(res["ok"]) if i in new]  # rows of `features`
        items = [
            _decoded(paths[i], clips[paths[i]], hashes[i], durations[i]) for i in (res["ok"][j] for j in keep)
        ]
        if items:
            run.write(items, res["features"][keep])
        for i in fresh:
            if res["reasons"][i] is not None:
                run.fail(paths[i], hashes[i], res["reasons"][i])
        written.update(paths[i] for i in fresh)
        run.advance(len(fresh))
        if watch is not None:
            watch.tick(len(fresh))
    return duplicates


def extract_with_ray(
    recipe: LoadSpec,
    clips: Any,
    out: str | Path,
    *,
    options: RayOptions | None = None,
    batch_size: int = 8,
    dtype: str = "float16",
    limit: int | None = None,
    allow_failures: bool = True,
    progress: bool | ProgressCallback | None = True,
    extractor: FeatureExtractor | None = None,
    notify: Callable[[str], None] | None = None,
) -> ExtractReport:
    """`extract_to_store` on a Ray cluster: the features of `clips` not stored yet in `out`,
    computed by an actor pool (see the module docstring), written by this process.

    recipe: the model each actor loads (`calm.models.spec.LoadSpec`, the one description of a
    model and its options). `extractor`: the same extractor when it is
    already loaded here (its key and head names are read from it); otherwise one Ray task
    loads it once to read them. `notify` (default: a logged warning) gets one line saying what
    the run takes of the cluster, and a line each time no clip has finished for
    `options.stall_minutes`. Options the cluster cannot run at once are refused (StoreError)
    before anything starts. Everything else as `extract_to_store`.
    """
    ray = require_ray()
    opts = options or RayOptions()
    started = connect(opts.address)
    try:
        cluster = ray.cluster_resources()
        opts = opts.resolved(cluster)
        (notify or log.info)(opts.describe(cluster))
        stalled = notify or log.warning
        with StallWatch(opts.stall_minutes, lambda m: stalled(f"Ray: {m}"), lambda: _free(ray)) as watch:
            shell = ExtractorShell(extractor) if extractor is not None else _shell(ray, recipe, opts)
            job = Extraction(shell, out, batch_size=batch_size, dtype=dtype, progress=progress)
            with job.start(clips, limit=limit) as run:
                if run.pending:
                    drain(run, build_dataset(run, shell, recipe, opts).iter_rows(), watch)
    finally:
        if started:
            ray.shutdown()
    _check_failures(run.report, allow_failures)
    return run.report
