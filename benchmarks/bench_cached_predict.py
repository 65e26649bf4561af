"""Benchmark (not a test): `AudioClassifier(cache=...).predict` on files whose features are stored.

Fits whisper-tiny.en + SAV on one ESC-10 clip per class with a feature cache, then predicts
`--clips` other ESC-10 files through the same cache and prints, for those files:

  first predict    the files are new: decoded, checked and extracted once each, by the store
  cached predict   the same files again: features read back from the store (median of `--repeats`)
  decode alone     `extractor.load_input` of every file (median of `--repeats`): what a cached
                   predict cost on top when it decoded every file for its length check
  decodes          files decoded during one cached predict (0: none) and during the first one

Run it against an older checkout (PYTHONPATH=OLD/src) to see the cached predict that decoded
every file; the ratio (cached + decode) / cached is the speedup of not decoding.

    python benchmarks/bench_cached_predict.py --clips 50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def esc10_files(root: Path, clips: int) -> tuple[list[str], list[str], list[str]]:
    """(support files: one per class, their labels, `clips` query files spread over the classes)."""
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    per_class = [sorted(str(f) for f in c.glob("*.ogg")) for c in classes]
    support = [files[0] for files in per_class]
    labels = [c.name.split(" - ", 1)[-1] for c in classes]
    rest = [files[1:] for files in per_class]
    query = [f for i in range(max(map(len, rest))) for files in rest if i < len(files) for f in [files[i]]]
    return support, labels, query[:clips]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/esc10"), help="the ESC-10 folder")
    parser.add_argument("--clips", type=int, default=50, help="query files (default 50)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    args = parser.parse_args()

    import torch

    import calm.audio
    from calm.audio_classifier import AudioClassifier

    torch.set_num_threads(1)
    decoded: list[str] = []
    real = calm.audio.load_audio

    def counting(path, *a, **k):  # type: ignore[no-untyped-def]
        decoded.append(str(path))
        return real(path, *a, **k)

    calm.audio.load_audio = counting  # every extractor's load_input decodes through it
    support, labels, query = esc10_files(args.data, args.clips)
    with tempfile.TemporaryDirectory(prefix="calm-bench-cache-") as cache:
        clf = AudioClassifier("whisper-tiny.en", "sav", cache=cache).fit(support, labels)
        decoded.clear()
        t = time.perf_counter()
        first = clf.predict(query)
        first_s, first_decodes = time.perf_counter() - t, len(decoded)
        cached, decodes = [], []
        for _ in range(args.repeats):
            decoded.clear()
            t = time.perf_counter()
            again = clf.predict(query)
            cached.append(time.perf_counter() - t)
            decodes.append(len(decoded))
            assert list(again) == list(first)
        extractor = clf._get_extractor()
        alone = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for f in query:
                extractor.load_input(f)
            alone.append(time.perf_counter() - t)
    c, d = statistics.median(cached), statistics.median(alone)
    print(f"files              {len(query)}")
    print(f"first predict      {first_s:8.3f} s  ({first_decodes} decodes)")
    print(f"cached predict     {c:8.3f} s  ({max(decodes)} decodes; median of {args.repeats})")
    print(f"decode alone       {d:8.3f} s  (median of {args.repeats})")
    print(f"(cached + decode) / cached  x{(c + d) / c:.1f}")


if __name__ == "__main__":
    main()
