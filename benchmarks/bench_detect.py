"""`calm detect` on a long synthetic recording: peak memory and the real-time factor.

    python benchmarks/bench_detect.py [--minutes 60] [--rate 16000] [--window 1.0] [--hop 0.5]
        [--model whisper-tiny.en] [--encoder-length clip] [--baseline-windows 200] [--keep DIR]
        [--threads N]

Makes a --minutes long FLAC (written block by block: noise with 2 s tone bursts of two classes,
a 500 Hz "low" and a 3 kHz "high", every 30 s), fits a CALM on 3 short clips per class plus a
"noise" class with `calm.AudioClassifier(--model, model_options={"encoder_length": ...})` and saves
it, then runs `calm detect MODEL FILE --background noise --json OUT` in a child process, timed.
Prints, for the child: wall seconds, the real-time factor (audio seconds / wall seconds; the
issue's bar: at least 20x with encoder_length=clip), its peak resident memory (ru_maxrss of the
child, which includes the model and torch; the bar: under 1.5 GiB), the number of events found
against the bursts written, and the real-time factor of the detection alone (as `calm detect`
reports it: decoding included, model loading not), and audio seconds per CPU-second of the child
(robust to other load on a shared machine). The baseline, measured in the same run on the
same loaded model: the model alone (`extract` + the classifier) on --baseline-windows windows, as
windows per second and the real-time factor it would give (hop seconds of audio per window), so
the overhead of decoding, windowing and smoothing is the ratio of the two. Also the file's size and
the memory the decoded file would need as float32 at the model's rate (what streaming avoids).
--threads sets torch's threads (OMP_NUM_THREADS) for this process and the child: 1 by default, so
a shared machine's load disturbs it less; a user's `calm detect` uses every core (torch's
default), which `--threads 0` measures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RATE = 16000
FREQS = {"low": 500.0, "high": 3000.0}
BURST_EVERY, BURST_SECONDS = 30.0, 2.0


def tone(freq: float, n: int, rate: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)


def write_recording(path: Path, minutes: float, rate: int) -> int:
    """A FLAC of noise with a burst every BURST_EVERY s (classes alternating); returns the bursts."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    labels = list(FREQS)
    total = int(minutes * 60 / BURST_EVERY)
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as f:
        for i in range(total):
            block = (0.02 * rng.standard_normal(int(BURST_EVERY * rate))).astype(np.float32)
            a = int(10 * rate)
            block[a : a + int(BURST_SECONDS * rate)] += tone(
                FREQS[labels[i % 2]], int(BURST_SECONDS * rate), rate
            )
            f.write(block)
    return total


def fit(model: str, encoder_length: str, out: Path):
    import calm

    rng = np.random.default_rng(1)
    clips, labels = [], []
    for label, freq in [*FREQS.items(), ("noise", 0.0)]:
        for k in range(3):
            x = (0.02 * rng.standard_normal(RATE)).astype(np.float32)
            clips.append((x + (tone(freq * (1 + 0.02 * k), RATE, RATE) if freq else 0), RATE))
            labels.append(label)
    clf = calm.AudioClassifier(model, "calm", model_options={"encoder_length": encoder_length}, device="cpu")
    clf.fit(clips, labels)
    clf.save(out)
    return clf


def baseline(clf, n: int, window: float) -> float:
    """Windows per second of the model and classifier alone (no decoding, no windowing)."""
    from calm.inference import Predictor

    predictor = Predictor(clf.classifier_, clf._get_extractor())
    rng = np.random.default_rng(2)
    waves = [(0.02 * rng.standard_normal(int(window * RATE))).astype(np.float32) for _ in range(n)]
    predictor.forward(waves[:4])
    t0 = time.perf_counter()
    for i in range(0, n, 16):
        predictor.forward(waves[i : i + 16])
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=16000, help="sample rate of the recording")
    parser.add_argument("--window", type=float, default=1.0)
    parser.add_argument("--hop", type=float, default=0.5)
    parser.add_argument("--model", default="whisper-tiny.en")
    parser.add_argument("--encoder-length", default="clip", choices=["clip", "full"])
    parser.add_argument("--baseline-windows", type=int, default=200)
    parser.add_argument("--keep", default=None, help="write the recording and outputs here (kept)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 0: torch's default (all cores)"
    )
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    else:
        os.environ.pop("OMP_NUM_THREADS", None)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-detect-"))
    work.mkdir(parents=True, exist_ok=True)
    rec, model_file, out = work / "long.flac", work / "tones.safetensors", work / "events.json"
    bursts = write_recording(rec, args.minutes, args.rate)
    seconds = args.minutes * 60
    clf = fit(args.model, args.encoder_length, model_file)
    per_second = baseline(clf, args.baseline_windows, args.window)
    cmd = [
        sys.executable,
        "-m",
        "calm.cli",
        "detect",
        str(model_file),
        str(rec),
        "--window",
        str(args.window),
        "--hop",
        str(args.hop),
        "--background",
        "noise",
        "--json",
        str(out),
        "--quiet",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss * 1024  # Linux: KiB
    cpu = usage.ru_utime + usage.ru_stime
    doc = json.loads(out.read_text())[0]
    events = doc["events"]
    labels = [e["label"] for e in events]
    print(
        f"recording: {seconds / 60:g} min at {args.rate} Hz, {rec.stat().st_size / 2**20:.1f} MiB FLAC, "
        f"{seconds * RATE * 4 / 2**30:.2f} GiB as float32 at {RATE} Hz if decoded whole"
    )
    threads = os.environ.get("OMP_NUM_THREADS", f"torch's default ({os.cpu_count()} CPUs)")
    print(f"command: {' '.join(cmd[2:])}; torch threads: {threads}")
    print(
        f"calm detect: {wall:.1f} s wall (model loading included), {seconds / wall:.1f}x real time; "
        f"detection alone {doc['realtime_factor']:.1f}x; peak RSS {peak / 2**30:.2f} GiB"
    )
    print(
        f"calm detect CPU: {cpu:.1f} CPU-seconds, {seconds / cpu:.1f} audio seconds per CPU-second "
        f"(robust to other load; with one thread about the wall-clock factor on an idle core)"
    )
    print(
        f"baseline (model + classifier alone): {per_second:.1f} windows/s = "
        f"{per_second * args.hop:.1f}x real time at hop {args.hop:g} s; "
        f"detect reaches {seconds / wall / (per_second * args.hop):.2f} of it"
    )
    print(
        f"events: {len(events)} found, {bursts} bursts written "
        f"({labels.count('low')} low, {labels.count('high')} high)"
    )
    ok = {True: "PASS", False: "FAIL"}
    print(
        f"bars: RTF >= 20x wall {ok[seconds / wall >= 20]}, per CPU-second {ok[seconds / cpu >= 20]}; "
        f"peak < 1.5 GiB {ok[peak < 1.5 * 2**30]}"
    )


if __name__ == "__main__":
    main()
