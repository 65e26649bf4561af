"""Mapping a model's free-text answer to one of the classes (shared by zero-shot and pseudo-labels).

Order of the rules, first hit wins:
1. normalised exact match: lower case, `_`/`-` as spaces, punctuation dropped, spaces collapsed;
2. option label: `B`, `B.`, `(B)`, `B) dog`, `Answer: B` when the prompt listed labelled options;
3. fuzzy match: exactly one class name occurs as a whole phrase in the answer, else the closest
   class name by `difflib` ratio if it reaches `cutoff`.
Anything else is unparseable (`None`); callers count those, they never drop them silently.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

__all__ = ["match_answer", "normalise"]

_PUNCT = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")
_LABEL = re.compile(
    r"^\s*((?:the\s+)?answer(?:\s+is)?\s*[:\-]?\s*)?(\()?([A-Z]{1,2})([.):]|\s*$)", re.IGNORECASE
)


def normalise(text: str) -> str:
    """Lower case, `_`/`-`/punctuation as spaces, single spaces, stripped."""
    return _SPACES.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def _option_label(answer: str, labels: Sequence[str]) -> int | None:
    match = _LABEL.match(answer)
    if match is None:
        return None
    prefix, paren, found, end = match.groups()
    # A lower-case letter followed by more words is too ambiguous ("a dog barks").
    if found.islower() and not (prefix or paren or end.strip() or answer.strip() == found):
        return None
    upper = found.upper()
    return labels.index(upper) if upper in labels else None


def match_answer(
    answer: str,
    classes: Sequence[str],
    labels: Sequence[str] | None = None,
    *,
    cutoff: float = 0.8,
) -> str | None:
    """The class that `answer` names, or None when it names none.

    Args:
        answer: The model's decoded answer.
        classes: The class names. When `labels` is given, `classes[i]` is the option labelled
            `labels[i]` (so pass the options of the prompt, in their order).
        labels: Option labels shown in the prompt (`A`, `B`, ...), or None.
        cutoff: Minimum `difflib` similarity of the fuzzy match.
    """
    if labels is not None and len(labels) != len(classes):
        raise ValueError(f"{len(labels)} option labels for {len(classes)} classes")
    norm = normalise(answer)
    names = [normalise(c) for c in classes]
    if norm and norm in names:
        return classes[names.index(norm)]
    if labels:
        index = _option_label(answer, labels)
        if index is not None:
            return classes[index]
    if not norm:
        return None
    contained = [i for i, name in enumerate(names) if name and re.search(rf"\b{re.escape(name)}\b", norm)]
    if len(contained) == 1:
        return classes[contained[0]]
    if len(contained) > 1:
        # Prefer the longest name when it contains all the others ("dog" inside "dog bark").
        longest = max(contained, key=lambda i: len(names[i]))
        if all(names[i] in names[longest] for i in contained):
            return classes[longest]
        return None
    close = difflib.get_close_matches(norm, names, n=1, cutoff=cutoff)
    return classes[names.index(close[0])] if close else None
