"""Prompt templates as data: a named template plus class names gives the user text of a prompt.

The text goes after the audio in the user turn of the model's chat template (the model backends
place it; see `calm.models.lalm`). Templates:

- `caption` (the default): the paper's question without options. It never depends on the classes
  or on the clip, so features of test clips cannot carry their labels.
- `choices`: a label-free multiple-choice question listing all classes (or a fixed option set) in
  a fixed order, labelled A, B, C, ... The options are the same for every clip.
- `spoof`: the paper's two-option anti-spoofing question (fixed options `bonafide`, `spoofed`).
- `paper-4way`: the paper's four-option question that always contains the clip's TRUE class plus
  three distractors. It leaks the label into the features of test clips (a classifier can read the
  answer off the prompt); kept only to reproduce the paper, and rendering it warns.
"""

from __future__ import annotations

import random
import string
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from calm.errors import CalmError, CalmWarning, ParameterError

__all__ = [
    "DEFAULT_TEMPLATE",
    "LabelLeakWarning",
    "Prompt",
    "PromptTemplate",
    "TEMPLATES",
    "get_template",
    "option_labels",
    "render_prompt",
]

OPTION_MODES = ("none", "classes", "fixed", "true-plus-distractors")


class UnknownTemplate(CalmError, KeyError):
    """A prompt template name that `TEMPLATES` does not hold (a KeyError, printed without quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LabelLeakWarning(CalmWarning):
    """A prompt that contains the clip's true label (test features then carry the answer)."""


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template.

    Args:
        name: Name shown by `calm prompts` and accepted by `get_template`.
        question: The question text; the options follow it on the same line.
        options: Which options the prompt lists: `none`, `classes` (all classes, in the given
            order), `fixed` (`fixed_options`, whatever the classes), `true-plus-distractors` (the
            clip's true class plus `n_options - 1` other classes, shuffled per clip).
        description: One line for `calm prompts`.
        fixed_options: The options of a `fixed` template.
        n_options: Number of options of a `true-plus-distractors` template.
        leaks_labels: Whether the rendered text depends on the clip's true label.
    """

    name: str
    question: str
    options: str
    description: str
    fixed_options: tuple[str, ...] = ()
    n_options: int = 4
    leaks_labels: bool = False

    def __post_init__(self) -> None:
        if self.options not in OPTION_MODES:
            raise ValueError(
                f"template {self.name!r}: options must be one of {OPTION_MODES}, got {self.options!r}"
            )
        if self.options == "fixed" and not self.fixed_options:
            raise ValueError(f"template {self.name!r}: a 'fixed' template needs fixed_options")
        if self.leaks_labels != (self.options == "true-plus-distractors"):
            raise ValueError(
                f"template {self.name!r}: leaks_labels must be set exactly for true-plus-distractors"
            )


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: the user text, and the options it lists with their labels (A, B, ...)."""

    text: str
    options: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate(
            name="caption",
            question="What caption does the given audio belong to?",
            options="none",
            description="label-free default: the paper's question without options",
        ),
        PromptTemplate(
            name="choices",
            question="What caption does the given audio belong to?",
            options="classes",
            description="label-free multiple choice: every class, in a fixed order, labelled A, B, C, ...",
        ),
        PromptTemplate(
            name="spoof",
            question="Is this audio bonafide or spoofed?",
            options="fixed",
            fixed_options=("bonafide", "spoofed"),
            description="the paper's anti-spoofing question with the fixed options bonafide / spoofed",
        ),
        PromptTemplate(
            name="paper-4way",
            question="What caption does the given audio belong to?",
            options="true-plus-distractors",
            n_options=4,
            leaks_labels=True,
            description="LEAKS LABELS: the paper's 4 options always containing the clip's true class",
        ),
    )
}

DEFAULT_TEMPLATE = "caption"


def get_template(name: str) -> PromptTemplate:
    """The template called `name` (see `TEMPLATES`)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UnknownTemplate(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}") from None


def option_labels(n: int) -> tuple[str, ...]:
    """Labels of n options: A..Z, then AA, AB, ... (spreadsheet order)."""
    if n < 0:
        raise ParameterError(f"n must be >= 0, got {n}")
    labels = []
    for i in range(n):
        label, k = "", i
        while True:
            label = string.ascii_uppercase[k % 26] + label
            k = k // 26 - 1
            if k < 0:
                break
        labels.append(label)
    return tuple(labels)


def format_options(question: str, options: Sequence[str]) -> Prompt:
    """`question A. x B. y ...` in the paper's format, with the options and their labels."""
    options = tuple(options)
    labels = option_labels(len(options))
    parts = [question, *(f"{label}. {option}" for label, option in zip(labels, options, strict=True))]
    return Prompt(text=" ".join(parts), options=options, labels=labels)


def _distractor_options(
    true_class: str, classes: Sequence[str], n_options: int, seed: int | str
) -> list[str]:
    others = [c for c in classes if c != true_class]
    if len(others) < n_options - 1:
        raise ParameterError(f"need at least {n_options} classes for {n_options} options, got {len(classes)}")
    rng = random.Random(f"{seed}")
    options = [true_class, *rng.sample(others, n_options - 1)]
    rng.shuffle(options)
    return options


def render_prompt(
    template: str | PromptTemplate,
    classes: Sequence[str] | None = None,
    *,
    true_class: str | None = None,
    seed: int | str = 0,
) -> Prompt:
    """Render a template into the user text of a prompt.

    Args:
        template: A template name or a `PromptTemplate`.
        classes: Class names, in the order the options are listed (`choices`) or drawn from
            (`paper-4way`). Not needed by `caption` and `spoof`.
        true_class: The clip's label; only `paper-4way` uses it (and warns that it leaks labels).
        seed: Seed of the per-clip shuffle of `paper-4way` (use e.g. the clip's path).
    """
    t = get_template(template) if isinstance(template, str) else template
    if t.options == "none":
        return Prompt(text=t.question)
    if t.options == "fixed":
        return format_options(t.question, t.fixed_options)
    if not classes:
        raise ParameterError(f"template {t.name!r} lists classes: pass the class names")
    if len(set(classes)) != len(classes):
        raise ParameterError(f"template {t.name!r}: class names must be unique")
    if t.options == "classes":
        return format_options(t.question, classes)
    if true_class is None:
        raise ParameterError(f"template {t.name!r} needs the clip's true class")
    if true_class not in classes:
        raise ParameterError(f"true class {true_class!r} is not one of the classes")
    options = _distractor_options(true_class, classes, t.n_options, seed)
    warnings.warn(
        f"prompt template {t.name!r} puts the clip's true class into the prompt: test features then "
        "carry the label (use 'caption' or 'choices' for honest evaluation)",
        LabelLeakWarning,
        stacklevel=2,
    )
    return format_options(t.question, options)
