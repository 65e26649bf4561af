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
that decoding (in worker threads) stays ahead of the model; and where the model's time goes in float32
and in the default dtype (torch's profiler over `extract` on --breakdown-clips decoded clips, by kind
of operator: attention kernel, matrix products, convolutions, the rest), each kind's ratio, and the
ratio the whole would reach if every kind sped up as the matrix products do (this CPU's ceiling for a
dtype change; with a kind that does not speed up, Amdahl's law bounds the whole below it).
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


#: Operator kinds of the breakdown: a profiler event's name -> kind (self time; the rest is "other").
OP_KINDS = {
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_attention_math": "attention",
    "aten::_scaled_dot_product_efficient_attention": "attention",
    "aten::_scaled_dot_product_flash_attention": "attention",
    "aten::addmm": "matmul",
    "aten::mm": "matmul",
    "aten::bmm": "matmul",
    "aten::baddbmm": "matmul",
    "aten::mkldnn_convolution": "convolution",
    "aten::convolution_overrideable": "convolution",
}
KINDS = ("attention", "matmul", "convolution", "other")


def op_breakdown(ext, waves: list, batch_size: int) -> dict[str, float]:
    """Seconds per clip of `ext.extract` by operator kind (profiler self time; the best of two
    profiled passes over `waves`, after one warm-up batch)."""
    from torch.profiler import ProfilerActivity, profile

    batches = [waves[i : i + batch_size] for i in range(0, len(waves), batch_size)]
    ext.extract(batches[0])
    best: dict[str, float] = {}
    for _ in range(2):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches:
                ext.extract(batch)
        kinds = dict.fromkeys(KINDS, 0.0)
        for event in prof.key_averages():
            kinds[OP_KINDS.get(event.key, "other")] += event.self_cpu_time_total / 1e6 / len(waves)
        if not best or sum(kinds.values()) < sum(best.values()):
            best = kinds
    return best


def print_breakdown(f32: dict[str, float], default: dict[str, float], auto_name: str, n: int) -> None:
    """The two breakdowns side by side, each kind's ratio, and the dtype change's ceiling."""
    t32, t16 = sum(f32.values()), sum(default.values())
    print(f"where the model's time goes (profiler self time of `extract`, ms per clip, {n} decoded clips):")
    print(f"{'kind':<12} {'float32':>8} {'share':>6} {auto_name:>8} {'share':>6}  float32/{auto_name}")
    for kind in KINDS:
        a, b = 1e3 * f32[kind], 1e3 * default[kind]
        ratio = f"{a / b:.2f}x" if b > 0 else "-"
        shares = f"{a:8.1f} {100 * a / (1e3 * t32):5.0f}% {b:8.1f} {100 * b / (1e3 * t16):5.0f}%"
        print(f"{kind:<12} {shares}  {ratio}")
    print(f"{'total':<12} {1e3 * t32:8.1f} {'':>6} {1e3 * t16:8.1f} {'':>6}  {t32 / t16:.2f}x")
    if default["matmul"] > 0 and default["attention"] > 0:
        mm = f32["matmul"] / default["matmul"]
        att = f32["attention"] / default["attention"]
        amdahl = t32 / (f32["attention"] / att + (t32 - f32["attention"]) / mm)
        print(
            f"matrix products run {mm:.2f}x faster in {auto_name}, the attention kernel {att:.2f}x: "
            f"were every kind as fast as the products, the whole would be {mm:.2f}x; with the attention "
            f"kernel as it is and everything else at the products' ratio, {amdahl:.2f}x"
        )


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all paths; the best is kept")
    parser.add_argument(
        "--breakdown-clips", type=int, default=8, help="clips profiled for the breakdown (0: none)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", default=None, help="ESC-10 folder (default: ../shared/data/esc10)")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 forced (emulated without AMX)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
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
    if args.breakdown_clips > 0:
        waves = [ext.load_input(clip.path) for clip in clips[: args.breakdown_clips]]
        f32_ops = op_breakdown(ext, waves, args.batch_size)
        print_breakdown(f32_ops, op_breakdown(auto, waves, args.batch_size), auto_name, len(waves))


if __name__ == "__main__":
    main()
