"""Pseudo-labels from the model's own sampled answers (METHOD.md item 8).

For every unlabelled clip, `M` answers are sampled, each at a temperature drawn from U(1, 2.5)
with a seeded generator; each answer is mapped to a class (`calm.answering.parse.match_answer`, the same
rule as zero-shot `generate`); the majority class is the pseudo-label, and the clip is kept when at
least half of the M rollouts agree with it. Unparseable answers count as rollouts that disagree.
The kept clips with their pseudo-labels are the support set of SAV or CALM.

The sampler is injectable: anything called as `sampler(inputs, temperatures)` with `temperatures`
of shape (len(inputs), M) that returns, per input, its M answer strings. `calm.answering.chat_lm.LALMSampler`
is the one backed by a model; tests script their own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from calm.answering.parse import match_answer
from calm.errors import ParameterError

__all__ = ["PseudoLabels", "Sampler", "draw_temperatures", "majority_vote", "pseudo_label"]

Sampler = Callable[[Sequence[object], np.ndarray], Sequence[Sequence[str]]]


def draw_temperatures(
    n: int, rollouts: int, low: float = 1.0, high: float = 2.5, seed: int = 0
) -> np.ndarray:
    """Temperatures of shape (n, rollouts), uniform in [low, high), reproducible from `seed`."""
    if not 0 < low <= high:
        raise ParameterError(f"need 0 < low <= high, got {low}, {high}")
    return np.random.default_rng(seed).uniform(low, high, size=(n, rollouts))


def majority_vote(votes: Sequence[str | None], classes: Sequence[str]) -> tuple[str | None, float]:
    """(majority class, fraction of ALL rollouts that voted for it); ties go to the earlier class.

    None votes (unparseable answers) never win but count in the denominator.
    """
    if not votes:
        raise ValueError("no votes")
    counts = Counter(v for v in votes if v is not None)
    if not counts:
        return None, 0.0
    order = {c: i for i, c in enumerate(classes)}
    winner = max(counts, key=lambda c: (counts[c], -order.get(c, len(order))))
    return winner, counts[winner] / len(votes)


@dataclass
class PseudoLabels:
    """Pseudo-labels of n clips.

    Attributes:
        labels: Majority class per clip (None when every answer was unparseable).
        agreement: Fraction of the clip's rollouts that agree with its majority class.
        kept: Whether the clip is kept (agreement >= min_agreement).
        answers: The raw sampled answers, (n, M).
        votes: The class each answer maps to (None when unparseable), (n, M).
        temperatures: The sampling temperatures, (n, M).
        classes: The class names.
    """

    labels: list[str | None]
    agreement: np.ndarray
    kept: np.ndarray
    answers: list[list[str]]
    votes: list[list[str | None]]
    temperatures: np.ndarray
    classes: tuple[str, ...]

    @property
    def n_unparsed(self) -> int:
        """Number of sampled answers that named no class."""
        return sum(v is None for row in self.votes for v in row)

    @property
    def kept_indices(self) -> np.ndarray:
        return np.flatnonzero(self.kept)

    def subset(self, indices: Sequence[int]) -> PseudoLabels:
        """The pseudo-labels of the clips at `indices`, in that order."""
        idx = [int(i) for i in indices]
        return PseudoLabels(
            labels=[self.labels[i] for i in idx],
            agreement=self.agreement[idx],
            kept=self.kept[idx],
            answers=[self.answers[i] for i in idx],
            votes=[self.votes[i] for i in idx],
            temperatures=self.temperatures[idx],
            classes=self.classes,
        )

    def kept_per_class(self) -> dict[str, int]:
        """How many clips were kept with each pseudo-label (every class listed, zeros included)."""
        counts = Counter(self.labels[i] for i in self.kept_indices)
        return {c: counts.get(c, 0) for c in self.classes}

    def accuracy(self, true_labels: Sequence[str], *, kept_only: bool = True) -> float:
        """Fraction of pseudo-labels that are right (a multi-label truth `a;b` accepts a or b)."""
        if len(true_labels) != len(self.labels):
            raise ValueError(f"{len(true_labels)} true labels for {len(self.labels)} clips")
        indices = self.kept_indices if kept_only else np.arange(len(self.labels))
        if len(indices) == 0:
            return float("nan")
        right = [
            self.labels[i] is not None and self.labels[i] in str(true_labels[i]).split(";")
            for i in map(int, indices)
        ]
        return float(np.mean(right))

    def report(self, true_labels: Sequence[str] | None = None) -> dict:
        """A JSON-serialisable summary: clips kept overall and per class, unparseable answers, accuracy."""
        out = {
            "clips": len(self.labels),
            "kept": int(self.kept.sum()),
            "rollouts": int(self.temperatures.shape[1]),
            "answers_unparsed": self.n_unparsed,
            "kept_per_class": self.kept_per_class(),
        }
        if true_labels is not None:
            out["accuracy_kept"] = self.accuracy(true_labels)
            out["accuracy_all"] = self.accuracy(true_labels, kept_only=False)
        return out


def pseudo_label(
    sampler: Sampler,
    inputs: Sequence[object],
    classes: Sequence[str],
    *,
    rollouts: int = 10,
    temperature_range: tuple[float, float] = (1.0, 2.5),
    min_agreement: float = 0.5,
    option_labels: Sequence[str] | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> PseudoLabels:
    """Sample `rollouts` answers per clip, vote, and keep the clips whose majority is >= `min_agreement`.

    Args:
        sampler: `sampler(batch_inputs, temperatures (b, rollouts)) -> b lists of rollouts answers`.
        inputs: One model input per clip (what the extractor's `load_input` returns).
        classes: Class names the answers are mapped to (the prompt's options, in their order, when
            `option_labels` is given).
        rollouts: M, the number of sampled answers per clip.
        temperature_range: (low, high) of the uniform temperature distribution.
        min_agreement: Keep a clip when at least this fraction of its rollouts name its majority class.
        option_labels: The prompt's option labels (`A`, `B`, ...), so that `B` maps to `classes[1]`.
        batch_size: Clips per sampler call.
        seed: Seed of the temperatures (the sampler seeds its own sampling).
    """
    if rollouts < 1:
        raise ParameterError(f"rollouts must be >= 1, got {rollouts}")
    if not 0 < min_agreement <= 1:
        raise ParameterError(f"min_agreement must be in (0, 1], got {min_agreement}")
    if batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {batch_size}")
    classes = tuple(classes)
    temperatures = draw_temperatures(len(inputs), rollouts, *temperature_range, seed=seed)
    answers: list[list[str]] = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        got = sampler(batch, temperatures[start : start + len(batch)])
        if len(got) != len(batch) or any(len(row) != rollouts for row in got):
            raise ValueError(f"sampler must return {rollouts} answers for each of the {len(batch)} inputs")
        answers.extend([str(a) for a in row] for row in got)
    votes = [[match_answer(a, classes, option_labels) for a in row] for row in answers]
    labels, agreement = [], []
    for row in votes:
        label, agree = majority_vote(row, classes)
        labels.append(label)
        agreement.append(agree)
    agreement_arr = np.asarray(agreement, dtype=float)
    kept = np.array([lab is not None for lab in labels], dtype=bool) & (
        agreement_arr >= min_agreement - 1e-12
    )
    return PseudoLabels(
        labels=labels,
        agreement=agreement_arr,
        kept=kept,
        answers=answers,
        votes=votes,
        temperatures=temperatures,
        classes=classes,
    )
