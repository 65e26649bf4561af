"""Soundscapes for the detection evaluation: real foreground clips placed on a looped real
background at sampled times and SNRs, written as audio plus annotations, reproducible from a seed.

`generate(foreground, backgrounds, out_dir, seed=..., count=..., spec=SoundscapeSpec())` writes
`soundscape_NN.wav` (16-bit PCM at `spec.sample_rate`), `soundscape_NN.txt` (the reference events,
one `onset<TAB>offset<TAB>label` line each: the DCASE / sed_eval annotation format) and
`soundscape_NN.json` (the full specification: background file, every event's source file, source
span, onset, duration and SNR), and returns the `Soundscape`s. Soundscape i of a seed depends on
(seed, i) only, so the same seed gives the same files, and more soundscapes extend the list.

The parameters are scaper's event specification (Salamon et al. 2017): a background file looped to
the soundscape's duration, a number of events drawn uniformly from `n_events`, each with a label
drawn uniformly, a source file of that label, onset uniform over the soundscape, duration the
source's own (at most `max_event` s) and an SNR in dB over the background drawn uniformly from
`snr`. Two differences, both deliberate: levels are RMS, not LUFS; and events never overlap (at
least `min_gap` s apart), since a single-label detector reports one class at a time. scaper itself
is not used: it needs soxbindings, which ships no wheel for current Python on Linux and whose
source build needs libsox's headers (and scaper's other path, the sox binary, is absent too).

Foreground clips are cut to their sounding part first (`trim_db`): ESC-50 / ESC-10 clips are padded
with silence to 5 s, and an annotation that covered the padding would not match the audio.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from calm.audio import load_audio
from calm.errors import ParameterError

__all__ = ["Reference", "Soundscape", "SoundscapeSpec", "generate", "read_reference", "sounding_span"]

FRAME_SECONDS = 0.01  # frame length of the silence trimming


@dataclass(frozen=True)
class SoundscapeSpec:
    """How soundscapes are drawn (see the module docstring); levels in dB."""

    duration: float = 30.0
    n_events: tuple[int, int] = (3, 6)  # inclusive range of events per soundscape
    snr: tuple[float, float] = (6.0, 24.0)  # event RMS over background RMS, uniform
    max_event: float = 5.0  # seconds; longer sources are cut
    min_gap: float = 0.5  # seconds of background at least between two events
    background_db: float = -30.0  # background RMS in dB full scale
    sample_rate: int = 16000
    trim_db: float = 40.0  # foreground frames this far below the loudest frame are padding

    def check(self) -> None:
        """Raise `ParameterError` for a specification that cannot be drawn from."""
        lo, hi = self.n_events
        if not 0 <= lo <= hi:
            raise ParameterError(f"n_events must be a range 0 <= low <= high, got {self.n_events}")
        if self.snr[0] > self.snr[1]:
            raise ParameterError(f"snr must be a range low <= high dB, got {self.snr}")
        if not (self.duration > 0 and self.max_event > 0 and self.min_gap >= 0 and self.sample_rate > 0):
            raise ParameterError(
                "duration, max_event and sample_rate must be positive and min_gap non-negative, got "
                f"{self.duration}, {self.max_event}, {self.sample_rate}, {self.min_gap}"
            )


class Reference(NamedTuple):
    """One annotated event of a soundscape (seconds from its start)."""

    onset: float
    offset: float
    label: str


@dataclass(frozen=True)
class Soundscape:
    """A written soundscape: its audio file, annotation file and reference events."""

    audio: Path
    annotation: Path
    duration: float
    events: tuple[Reference, ...]


def sounding_span(wave: np.ndarray, rate: int, trim_db: float) -> tuple[int, int]:
    """(start, end) samples of `wave` without the leading and trailing frames quieter than the
    loudest frame by more than `trim_db` dB (the whole clip when nothing is that quiet)."""
    n = max(1, round(FRAME_SECONDS * rate))
    frames = len(wave) // n
    if frames == 0:
        return 0, len(wave)
    rms = np.sqrt(np.mean(wave[: frames * n].reshape(frames, n).astype(np.float64) ** 2, axis=1))
    loud = np.flatnonzero(rms > rms.max() * 10 ** (-trim_db / 20))
    if len(loud) == 0:
        return 0, len(wave)
    return int(loud[0] * n), int(min(len(wave), (loud[-1] + 1) * n))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


class _Sources:
    """Decoded clips at the soundscape rate, each decoded once (foregrounds cut to their sound)."""

    def __init__(self, spec: SoundscapeSpec):
        self.spec = spec
        self.cache: dict[tuple[str, bool], tuple[np.ndarray, int]] = {}

    def get(self, path: Path, trim: bool) -> tuple[np.ndarray, int]:
        """(waveform, offset in samples of its first sample in the file)."""
        key = (str(path), trim)
        if key not in self.cache:
            wave = load_audio(path, self.spec.sample_rate)
            start, end = (
                sounding_span(wave, self.spec.sample_rate, self.spec.trim_db) if trim else (0, len(wave))
            )
            self.cache[key] = (wave[start:end], start)
        return self.cache[key]


def _free(onset: float, length: float, placed: Sequence[dict[str, Any]], gap: float) -> bool:
    return all(
        onset + length + gap <= e["onset"] or e["onset"] + e["duration"] + gap <= onset for e in placed
    )


def _plan(
    rng: np.random.Generator,
    spec: SoundscapeSpec,
    foreground: Mapping[str, Sequence[Path]],
    backgrounds: Sequence[Path],
    sources: _Sources,
) -> dict[str, Any]:
    """One soundscape's specification: its background and events (see the module docstring)."""
    rate = spec.sample_rate
    labels = sorted(foreground)
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    events: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(spec.n_events[0], spec.n_events[1] + 1))):
        label = labels[int(rng.integers(len(labels)))]
        source = foreground[label][int(rng.integers(len(foreground[label])))]
        snr = float(rng.uniform(*spec.snr))
        wave, skip = sources.get(source, trim=True)
        length = round(min(len(wave) / rate, spec.max_event, spec.duration), 3)
        for _ in range(50):  # rejection sampling of a free onset; the event is dropped if none is found
            onset = round(float(rng.uniform(0.0, spec.duration - length)), 3)
            if _free(onset, length, events, spec.min_gap):
                events.append(
                    {
                        "label": label,
                        "source": str(source),
                        "source_time": round(skip / rate, 3),
                        "onset": onset,
                        "duration": length,
                        "snr": round(snr, 2),
                    }
                )
                break
    events.sort(key=lambda e: e["onset"])
    return {"background": str(background), "duration": spec.duration, "events": events}


def _render(plan: Mapping[str, Any], spec: SoundscapeSpec, sources: _Sources) -> np.ndarray:
    """The soundscape's samples: the looped background at `background_db`, each event at its SNR."""
    rate, n = spec.sample_rate, round(spec.duration * spec.sample_rate)
    bg, _ = sources.get(Path(plan["background"]), trim=False)
    if _rms(bg) == 0:
        raise ParameterError(f"{plan['background']}: a silent background cannot set the events' SNR")
    mix = np.resize(bg, n).astype(np.float64)  # np.resize repeats the clip: a looped background
    mix *= 10 ** (spec.background_db / 20) / _rms(mix)
    level = _rms(mix)
    for e in plan["events"]:
        wave, _ = sources.get(Path(e["source"]), trim=True)
        start, count = round(e["onset"] * rate), round(e["duration"] * rate)
        piece = wave[: min(count, n - start)].astype(np.float64)
        if _rms(piece) > 0:
            mix[start : start + len(piece)] += piece * level * 10 ** (e["snr"] / 20) / _rms(piece)
    peak = float(np.abs(mix).max())
    return (mix * (0.99 / peak if peak > 0.99 else 1.0)).astype(np.float32)


def _write(stem: Path, plan: Mapping[str, Any], wave: np.ndarray, spec: SoundscapeSpec) -> Soundscape:
    import soundfile as sf

    from calm._files import atomic_write_text

    refs = tuple(
        Reference(e["onset"], round(e["onset"] + e["duration"], 3), e["label"]) for e in plan["events"]
    )
    audio, annotation = stem.with_suffix(".wav"), stem.with_suffix(".txt")
    sf.write(audio, wave, spec.sample_rate, subtype="PCM_16")
    atomic_write_text(annotation, "".join(f"{r.onset:.3f}\t{r.offset:.3f}\t{r.label}\n" for r in refs))
    doc = {"spec": asdict(spec), **plan}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(doc, indent=1) + "\n")
    return Soundscape(audio, annotation, spec.duration, refs)


def generate(
    foreground: Mapping[str, Sequence[str | Path]],
    backgrounds: Sequence[str | Path],
    out_dir: str | Path,
    *,
    seed: int,
    count: int,
    spec: SoundscapeSpec | None = None,
) -> list[Soundscape]:
    """Write `count` soundscapes drawn with `seed` into `out_dir` (see the module docstring).

    `foreground`: label -> its source clips; `backgrounds`: background clips. Raises
    `ParameterError` for an empty label or background list or a bad `spec`, `AudioError` naming a
    clip that cannot be decoded."""
    spec = spec or SoundscapeSpec()
    spec.check()
    fg = {str(label): sorted(Path(p) for p in paths) for label, paths in foreground.items()}
    empty = sorted(label for label, paths in fg.items() if not paths)
    if not fg or empty:
        raise ParameterError(f"every foreground label needs source clips; none for {empty or 'any label'}")
    bgs = sorted(Path(p) for p in backgrounds)
    if not bgs:
        raise ParameterError("soundscapes need at least one background clip")
    if count < 1:
        raise ParameterError(f"count must be at least 1, got {count}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = _Sources(spec)
    made = []
    for i in range(count):
        rng = np.random.default_rng([int(seed), i])
        plan = _plan(rng, spec, fg, bgs, sources)
        made.append(_write(out / f"soundscape_{i:02d}", plan, _render(plan, spec, sources), spec))
    return made


def read_reference(path: str | Path) -> list[Reference]:
    """The events of an annotation file (`onset<TAB>offset<TAB>label` lines)."""
    refs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            refs.append(Reference(float(parts[0]), float(parts[1]), parts[2]))
        except (IndexError, ValueError):
            raise ParameterError(f"{path}:{n}: expected onset<TAB>offset<TAB>label, got {line!r}") from None
    return refs
