"""The model-side baselines of `calm evaluate`: zero-shot answers and pseudo-labels of dataset clips.

Both take a loaded LALM extractor (`calm.load_extractor`) and clip paths, load each clip with
`extractor.load_input`, and ask the model the label-free multiple-choice question of the `choices`
prompt template (every class, in the given order, labelled A, B, C, ...):

- `zero_shot_clips`: `calm.answering.zeroshot.zero_shot` (modes `letters`, `likelihood` with the `caption`
  question and the class names as answers, `generate`).
- `pseudo_label_clips`: `calm.answering.pseudolabel.pseudo_label` with
  `calm.answering.chat_lm.LALMSampler`: M sampled answers per clip at temperatures from
  U(1, 2.5), majority vote, kept at >= 50 % agreement.

Results are cached per clip in a JSON file (`cache=`), keyed by everything that changes an answer
(the extractor's key, mode, prompt, classes, rollouts, ...): a clip is asked once per run directory,
and a rerun or a run with more seeds only asks the clips it has not seen. A cache written for other
settings is ignored and replaced. Clips are processed in chunks, the cache being saved after each.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calm._files import atomic_write_json
from calm.answering.pseudolabel import PseudoLabels
from calm.errors import ParameterError
from calm.models.base import FeatureExtractor
from calm.prompts import Prompt, render_prompt

__all__ = ["ZeroShotClips", "pseudo_label_clips", "zero_shot_clips", "zero_shot_prompt"]

CACHE_VERSION = 1
Progress = Callable[[int, int], None]


def zero_shot_prompt(mode: str, classes: Sequence[str]) -> Prompt:
    """The question of a zero-shot mode: `choices` (letters, generate) or `caption` (likelihood)."""
    return render_prompt("caption" if mode == "likelihood" else "choices", classes)


def _read_cache(path: Path | None, key: dict) -> dict[str, dict]:
    if path is None or not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except ValueError:
        return {}
    return dict(doc.get("clips", {})) if doc.get("key") == key else {}


def _write_cache(path: Path | None, key: dict, clips: dict[str, dict]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "clips": clips}, indent=None)


def _chunks(items: Sequence[str], size: int):
    if size < 1:
        raise ParameterError(f"chunk size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _run_cached(
    paths: Sequence[str],
    key: dict,
    cache: str | Path | None,
    compute: Callable[[list[str], list[Any]], list[dict]],
    load_input: Callable[[str], Any],
    chunk: int,
    progress: Progress | None,
) -> list[dict]:
    """Per-path entries, computing (chunk by chunk, saving after each) those the cache lacks."""
    cache = Path(cache) if cache is not None else None
    entries = _read_cache(cache, key)
    todo = list(dict.fromkeys(p for p in paths if p not in entries))
    done = 0
    for part in _chunks(todo, chunk):
        inputs = [load_input(p) for p in part]
        entries.update(zip(part, compute(part, inputs), strict=True))
        _write_cache(cache, key, entries)
        done += len(part)
        if progress is not None:
            progress(done, len(todo))
    return [entries[p] for p in paths]


@dataclass
class ZeroShotClips:
    """Zero-shot answers of clips, in the order of the paths asked.

    Attributes:
        predictions: class per clip (None: a `generate` answer that named no class).
        scores: (n, C) class scores (`letters`, `likelihood`), None for `generate`.
        answers: the decoded answers (`generate`), else None.
        prompt: the question asked.
        n_unparsed: number of clips whose answer named no class.
    """

    predictions: list[str | None]
    scores: np.ndarray | None
    answers: list[str] | None
    prompt: str

    @property
    def n_unparsed(self) -> int:
        return sum(p is None for p in self.predictions)


def zero_shot_clips(
    extractor: FeatureExtractor,
    paths: Sequence[str],
    classes: Sequence[str],
    *,
    mode: str = "letters",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    cache: str | Path | None = None,
    chunk: int = 64,
    progress: Progress | None = None,
) -> ZeroShotClips:
    """The model's own answer for each clip (`calm.answering.zeroshot.zero_shot`), cached per clip."""
    from calm.answering.zeroshot import MODES, zero_shot

    if mode not in MODES:
        raise ParameterError(f"zero-shot mode must be one of {MODES}, got {mode!r}")
    classes = list(classes)
    prompt = zero_shot_prompt(mode, classes)
    key = {
        "version": CACHE_VERSION,
        "kind": "zero-shot",
        "extractor": extractor.key,
        "mode": mode,
        "prompt": prompt.text,
        "classes": classes,
        "max_new_tokens": max_new_tokens,
    }

    def compute(part: list[str], inputs: list[Any]) -> list[dict]:
        res = zero_shot(
            extractor,
            inputs,
            classes,
            mode=mode,
            prompt=prompt,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
        return [
            {
                "prediction": res.predictions[i],
                "scores": None if res.scores is None else [float(v) for v in res.scores[i]],
                "answer": None if res.answers is None else res.answers[i],
            }
            for i in range(len(part))
        ]

    entries = _run_cached(paths, key, cache, compute, extractor.load_input, chunk, progress)
    scores = None if mode == "generate" else np.array([e["scores"] for e in entries], dtype=np.float64)
    answers = [e["answer"] for e in entries] if mode == "generate" else None
    return ZeroShotClips([e["prediction"] for e in entries], scores, answers, prompt.text)


def _chunk_seed(seed: int, paths: Sequence[str]) -> int:
    """A chunk's sampling seed: the run's seed and the chunk's clips, so reruns repeat it."""
    return (int(seed) * 1_000_003 + zlib.crc32("\n".join(paths).encode())) % (2**31)


def pseudo_label_clips(
    extractor: FeatureExtractor,
    paths: Sequence[str],
    classes: Sequence[str],
    *,
    rollouts: int = 10,
    temperature_range: tuple[float, float] = (1.0, 2.5),
    min_agreement: float = 0.5,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    cache: str | Path | None = None,
    chunk: int = 32,
    progress: Progress | None = None,
) -> PseudoLabels:
    """Pseudo-labels of the clips (METHOD.md item 8), aligned with `paths`, cached per clip.

    Temperatures and sampling are seeded per chunk from `seed` and the chunk's paths.
    """
    classes = tuple(classes)
    prompt = render_prompt("choices", classes)
    key = {
        "version": CACHE_VERSION,
        "kind": "pseudo-labels",
        "extractor": extractor.key,
        "prompt": prompt.text,
        "classes": list(classes),
        "rollouts": rollouts,
        "temperature_range": list(temperature_range),
        "min_agreement": min_agreement,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
    }

    def compute(part: list[str], inputs: list[Any]) -> list[dict]:
        return _pseudo_label_entries(
            extractor, prompt, inputs, classes, _chunk_seed(seed, part), key, batch_size=batch_size
        )

    entries = _run_cached(paths, key, cache, compute, extractor.load_input, chunk, progress)
    return _pseudo_labels_of(entries, rollouts, classes)


def _pseudo_label_entries(
    extractor: FeatureExtractor,
    prompt: Prompt,
    inputs: list[Any],
    classes: tuple[str, ...],
    chunk_seed: int,
    key: dict,
    *,
    batch_size: int,
) -> list[dict]:
    """The cache entries of one chunk of clips: `rollouts` sampled answers each, seeded by the chunk."""
    from calm.answering.chat_lm import LALMSampler
    from calm.answering.pseudolabel import pseudo_label

    sampler = LALMSampler(extractor, prompt.text, max_new_tokens=key["max_new_tokens"], seed=chunk_seed)
    res = pseudo_label(
        sampler,
        inputs,
        classes,
        rollouts=key["rollouts"],
        temperature_range=tuple(key["temperature_range"]),
        min_agreement=key["min_agreement"],
        option_labels=prompt.labels,
        batch_size=batch_size,
        seed=chunk_seed,
    )
    return [
        {
            "label": res.labels[i],
            "agreement": float(res.agreement[i]),
            "kept": bool(res.kept[i]),
            "answers": res.answers[i],
            "votes": res.votes[i],
            "temperatures": [float(t) for t in res.temperatures[i]],
        }
        for i in range(len(inputs))
    ]


def _pseudo_labels_of(entries: list[dict], rollouts: int, classes: tuple[str, ...]) -> PseudoLabels:
    return PseudoLabels(
        labels=[e["label"] for e in entries],
        agreement=np.array([e["agreement"] for e in entries], dtype=float),
        kept=np.array([e["kept"] for e in entries], dtype=bool),
        answers=[list(e["answers"]) for e in entries],
        votes=[list(e["votes"]) for e in entries],
        temperatures=np.array([e["temperatures"] for e in entries], dtype=float).reshape(
            len(entries), rollouts
        ),
        classes=classes,
    )
