"""The Ray engine's overhead: clips/s of `--engine ray` against `--engine local` on the same clips.

    python benchmarks/bench_ray.py [--clips 80] [--batch-size 8] [-o encoder_length=clip] [--data DIR]
    python benchmarks/bench_ray.py --gpu      # GPU actors (one per GPU), on a machine that has GPUs

Both engines extract the same ESC-10 clips with whisper-tiny.en into fresh stores, one after the
other in this process. The local engine gets the model already loaded; the Ray engine runs on a
local cluster started before timing (its actors load the model inside the timed run, as they do
in real use). Printed, for each: wall-clock clips/s of the whole run, and the steady rate (clips
after the first batch / seconds after it: what the engine sustains once the model is loaded);
then the ratios ray / local (target: the wall ratio >= 0.8 on one machine; the Ray engine's
results reach the driver in bursts once its actor has loaded the model, so its "steady" rate
overstates it and only the wall ratio compares like with like). CPU mode: the
single actor gets as many torch threads as the local engine has (all cores); the cluster gets
one logical CPU more than the machine so the decoding tasks can run beside it.
The machine's load average is printed too: other processes sharing the cores move both figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_extract import esc10_root, pick_clips  # noqa: E402


class Rate:
    """A progress callback recording when each event came; `steady()` is the rate after the first batch."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.points: list[tuple[float, int]] = []

    def __call__(self, event) -> None:
        self.points.append((time.perf_counter(), event.done))

    def steady(self) -> float:
        done = [(t, n) for t, n in self.points if n > 0]
        if len(done) < 2:
            return float("nan")
        (t1, n1), (t2, n2) = done[0], done[-1]
        return (n2 - n1) / (t2 - t1) if t2 > t1 else float("nan")


def run_local(model: str, kwargs: dict, clips: list, batch_size: int, out: Path) -> dict:
    from calm.models import load_extractor
    from calm.store import extract_to_store

    t = time.perf_counter()
    extractor = load_extractor(model, **kwargs)
    load_s = time.perf_counter() - t
    rate = Rate()
    report = extract_to_store(extractor, clips, out, batch_size=batch_size, progress=rate)
    wall = time.perf_counter() - rate.t0
    assert report.stored == len(clips), report.summary()
    return {"wall": len(clips) / wall, "steady": rate.steady(), "seconds": wall, "load": load_s}


def run_ray(model: str, kwargs: dict, clips: list, batch_size: int, out: Path, opts) -> dict:
    from calm.models.spec import LoadSpec
    from calm.store.distributed import extract_with_ray

    rate = Rate()
    spec = LoadSpec.from_options(model, kwargs)
    report = extract_with_ray(spec, clips, out, options=opts, batch_size=batch_size, progress=rate)
    wall = time.perf_counter() - rate.t0
    assert report.stored == len(clips), report.summary()
    return {"wall": len(clips) / wall, "steady": rate.steady(), "seconds": wall}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--data", default=None, help="ESC-10 root (default: ../shared/data/esc10)")
    ap.add_argument("--gpu", action="store_true", help="GPU actors, one per GPU (model on cuda)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    import ray

    from calm.commands.options import parse_options
    from calm.store.distributed import RayOptions

    kwargs = dict(parse_options(tuple(args.option)))
    cores = os.cpu_count() or 1
    if args.gpu:
        kwargs["device"] = "cuda"
        ray.init(include_dashboard=False, log_to_driver=False)
        opts = RayOptions(address=None, cpus_per_actor=1)  # one actor per GPU
    else:
        ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False)
        opts = RayOptions(actors=1, cpus_per_actor=cores, decode_cpus=0.5)
    clips = pick_clips(esc10_root(args.data), args.clips)
    print(f"{len(clips)} ESC-10 clips, {args.model} {kwargs or ''}, batch {args.batch_size}, {cores} cores")
    print(f"torch threads (local engine): {torch.get_num_threads()}; load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        local = run_local(args.model, kwargs, clips, args.batch_size, Path(tmp) / "local")
        print(
            f"local: {local['wall']:.2f} clips/s wall ({local['seconds']:.1f} s), "
            f"steady {local['steady']:.2f} clips/s; model load {local['load']:.1f} s (not timed)"
        )
        far = run_ray(args.model, kwargs, clips, args.batch_size, Path(tmp) / "ray", opts)
        print(
            f"ray:   {far['wall']:.2f} clips/s wall ({far['seconds']:.1f} s, actor start and model load "
            f"included), steady {far['steady']:.2f} clips/s"
        )
        from calm.store import load_features

        same = np.array_equal(
            np.asarray(load_features(Path(tmp) / "local")[0]), np.asarray(load_features(Path(tmp) / "ray")[0])
        )
    ray.shutdown()
    steady, wall = far["steady"] / local["steady"], far["wall"] / local["wall"]
    print(f"ratio ray/local: steady {steady:.2f}, wall {wall:.2f}; stores bitwise equal: {same}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
