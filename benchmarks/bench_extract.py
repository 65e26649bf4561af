"""Extraction speed: `calm extract`'s path against the naive way, on ESC-10 with whisper-tiny.en.

    python benchmarks/bench_extract.py [--clips 40] [--batch-size 8] [--repeats 1] [--device cpu] [--data DIR]
                                       [--bf16]

The default compute dtype is `auto` (bf16 on CPUs with native bf16 matrix units, AMX-BF16 or
AVX512-BF16, float32 elsewhere; calm.models.base.cpu_has_native_bf16): the run reports the default
(auto) path and float32 side by side, and with --bf16 also bf16 forced (emulated, slower, on CPUs
without those units).

All in one run, on the same clips and the same loaded model:
- naive: batch size 1, audio decoded in the main thread, the full model forward
  (`WhisperForConditionalGeneration(input_features, decoder_input_ids)`, computing logits) with
  forward pre-hooks on every attention output projection keeping their whole inputs;
- calm, default: `extract_to_store` (decoding in worker threads overlapped with the model,
  hooks at the needed positions only, no LM head, early stop, shards written to a store) with
  the encoder on 30 s as Whisper was trained, at batch size 1 and at --batch-size;
- calm, `encoder_length="clip"`: the encoder on each clip's own length, and with a 10 s minimum
  (`min_encoder_seconds=10`); see calm.models.whisper for the measured accuracy cost.
Also: audio decoding alone (single thread), and its share of the default path's wall time, to show
that decoding (in worker threads) stays ahead of the model.
Prints clips/s for each (wall clock, and per CPU-second of all this process's threads, which is
robust to other load on a shared machine) and the ratios to the naive way. Model loading is not
timed.
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


def esc10_root(arg: str | None) -> Path:
    root = (
        Path(arg)
        if arg
        else Path(os.environ.get("CALM_TEST_DATA", ROOT.parent / "shared" / "data")) / "esc10"
    )
    if not root.is_dir():
        sys.exit(f"ESC-10 not found at {root}: pass --data DIR or set CALM_TEST_DATA")
    return root


def pick_clips(root: Path, n: int) -> list:
    """n clips spread evenly over the dataset (so every class is represented)."""
    from calm.data import load_dataset

    clips = load_dataset(f"esc10:{root}").clips
    if n >= len(clips):
        return list(clips)
    return [clips[i] for i in np.linspace(0, len(clips) - 1, n).round().astype(int)]


class Timer:
    """Wall-clock and CPU (all threads of this process) clips/s of the block it wraps."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.speeds = (self.n / wall, self.n / cpu)


def time_naive(ext, clips) -> tuple[float, float]:
    """clips/s of batch-1 full forwards (with logits) keeping every attention output projection input."""
    from calm.audio import load_audio

    model = ext.model
    kept: list[torch.Tensor] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, args: kept.append(args[0].detach().clone()))
        for name, module in model.named_modules()
        if name.endswith("out_proj")
    ]
    prompt = torch.tensor([ext.prompt_ids], device=ext.device)

    def one(clip) -> None:
        wave = load_audio(clip.path, ext.sample_rate, max_seconds=ext.max_seconds)
        feats = ext.feature_extractor(wave, sampling_rate=ext.sample_rate, return_tensors="pt").input_features
        with torch.no_grad():
            out = model(input_features=feats.to(ext.device, ext.dtype), decoder_input_ids=prompt)
        assert out.logits.shape[-1] == model.config.vocab_size
        kept.clear()

    try:
        one(clips[0])  # warm-up
        with Timer(len(clips)) as t:
            for clip in clips:
                one(clip)
        return t.speeds
    finally:
        for h in hooks:
            h.remove()


def time_store(
    ext, clips, batch_size: int, workers: int | None
) -> tuple[tuple[float, float], tuple[int, ...]]:
    from calm.store import extract_to_store, load_features

    ext.extract([ext.load_input(clips[0].path)])  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        with Timer(len(clips)) as t:
            report = extract_to_store(ext, clips, tmp, batch_size=batch_size, progress=False, workers=workers)
        if report.failed:
            raise SystemExit(f"extraction failed: {report.failed}")
        shape = load_features(tmp)[0].shape
    return t.speeds, shape


def time_decoding(clips, rate: int, max_seconds: float | None) -> tuple[float, float]:
    from calm.audio import load_audio

    with Timer(len(clips)) as t:
        for clip in clips:
            load_audio(clip.path, rate, max_seconds=max_seconds)
    return t.speeds


def variant(ext, **options):
    from calm.models.whisper import WhisperExtractor

    return WhisperExtractor(
        ext.model,
        ext.feature_extractor,
        ext.tokenizer,
        model_id=ext.model_id,
        revision=ext.revision,
        heads=ext.heads,
        prompt=ext.prompt,
        **options,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all paths; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", default=None, help="ESC-10 folder (default: ../shared/data/esc10)")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 forced (emulated without AMX)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from calm.models import load_extractor
    from calm.models.base import cpu_has_native_bf16

    clips = pick_clips(esc10_root(args.data), args.clips)
    t0 = time.perf_counter()
    auto = load_extractor("whisper-tiny.en", device=args.device)  # the default: dtype auto
    ext = load_extractor("whisper-tiny.en", device=args.device, dtype="float32")
    auto_name = str(auto.dtype).removeprefix("torch.")
    print(
        f"whisper-tiny.en on {args.device} ({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs), "
        f"{len(clips)} ESC-10 clips, {len(ext.head_names)} heads; "
        f"model loaded in {time.perf_counter() - t0:.1f} s; "
        f"native bf16 on this CPU: {cpu_has_native_bf16()}, so dtype auto = {auto_name}"
    )
    default = f"calm default (auto = {auto_name}, 30 s encoder), batch {args.batch_size}"
    configs = [
        ("calm float32 (30 s encoder), batch 1", ext, 1),
        (default, auto, args.batch_size),
        (f"calm float32 (30 s encoder), batch {args.batch_size}", ext, args.batch_size),
        (
            f"calm encoder_length=clip (auto = {auto_name}), batch {args.batch_size}",
            variant(auto, encoder_length="clip"),
            args.batch_size,
        ),
        (
            f"calm encoder_length=clip min 10 s (auto = {auto_name}), batch {args.batch_size}",
            variant(auto, encoder_length="clip", min_encoder_seconds=10.0),
            args.batch_size,
        ),
    ]
    if args.bf16:
        bf16 = load_extractor("whisper-tiny.en", device=args.device, dtype="bf16")
        configs.append((f"calm bf16 forced (30 s encoder), batch {args.batch_size}", bf16, args.batch_size))
    best: dict[str, tuple[float, float]] = {}

    def keep(label: str, speeds: tuple[float, float]) -> None:
        old = best.get(label, (0.0, 0.0))
        best[label] = (max(old[0], speeds[0]), max(old[1], speeds[1]))

    shape = None
    for _ in range(args.repeats):  # rounds interleave the paths, so drifting load hits them alike
        keep("audio decoding alone (1 thread)", time_decoding(clips, ext.sample_rate, ext.max_seconds))
        keep("naive: batch 1, full forward with logits", time_naive(ext, clips))
        for label, e, bs in configs:
            speeds, shape = time_store(e, clips, bs, args.workers)
            keep(label, speeds)
    rows = list(best.items())
    naive = best["naive: batch 1, full forward with logits"]
    print(f"features per clip: {shape[1:]}; best of {args.repeats} round(s)")
    width = max(len(r[0]) for r in rows)
    print("clips/s by wall clock, and per CPU-second (all threads: robust to other load on the machine)")
    print(f"{'path':<{width}}  clips/s  x naive  clips/CPU-s  x naive")
    for label, (wall, cpu) in rows:
        print(f"{label:<{width}}  {wall:7.2f}  {wall / naive[0]:6.2f}x  {cpu:11.2f}  {cpu / naive[1]:6.2f}x")
    decode = best["audio decoding alone (1 thread)"][0]
    f32 = best[f"calm float32 (30 s encoder), batch {args.batch_size}"][0]
    print(
        f"default (auto = {auto_name}) / float32 at batch {args.batch_size}: {best[default][0] / f32:.2f}x; "
        f"audio decoding alone would take {100 * best[default][0] / decode:.0f} % of the default path's "
        "wall time (one thread; the store decodes in worker threads, overlapped with the model)"
    )


if __name__ == "__main__":
    main()
