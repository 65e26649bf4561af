"""Zero-shot baseline: the audio-language model answers the question itself (METHOD.md item 9).

Three modes, all batched:

- `letters`: the prompt lists the classes as options A, B, C, ...; one forward pass per batch;
  the prediction is the option whose label token has the largest next-token logit at the end of
  the prompt (after the chat template's generation prompt). Deterministic.
- `likelihood`: the score of a class is the sum of the log-probabilities of its name's tokens as
  the answer. Prompt and audio run once per clip with the KV cache on; the cache is repeated once
  per class and all class names are scored in one further forward pass.
- `generate`: the model writes an answer (greedy by default, seeded sampling with
  `temperature > 0`), mapped to a class by `calm.answering.parse.match_answer` (normalised exact match,
  option label, fuzzy match). Unparseable answers are counted in `n_unparsed`, predicted as None
  (always wrong), never dropped.

The model side (`ChatLM`, `as_chat_lm`, `LALMSampler`, generation) lives in `calm.answering.chat_lm`; this
module turns its logits and answers into class predictions, and re-exports those names.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from calm.answering.chat_lm import (
    ChatLM,
    LALMSampler,
    accepts_argument,
    as_chat_lm,
    forward,
    generate_answers,
    last_logits,
    mask_positions,
)
from calm.answering.parse import match_answer
from calm.errors import ParameterError
from calm.prompts import Prompt, render_prompt

__all__ = ["ChatLM", "LALMSampler", "MODES", "ZeroShotResult", "as_chat_lm", "verbalise", "zero_shot"]

MODES = ("letters", "likelihood", "generate")


def verbalise(class_name: str) -> str:
    """How a class is written in an answer: `car_horn` -> `car horn`."""
    return class_name.replace("_", " ").strip()


@dataclass
class ZeroShotResult:
    """Zero-shot predictions of n clips.

    Attributes:
        predictions: predicted class per clip (None: `generate` answer that named no class).
        scores: (n, C) class scores (logits of option labels, or summed log-probabilities), None
            for `generate`.
        n_unparsed: number of `generate` answers that named no class (0 for the other modes).
        answers: the decoded answers of `generate` (None for the other modes).
        classes: the class names, in the order of the score columns.
        prompt: the prompt text used.
    """

    predictions: list[str | None]
    scores: np.ndarray | None
    n_unparsed: int
    answers: list[str] | None
    classes: tuple[str, ...]
    prompt: str

    def accuracy(self, true_labels: Sequence[str]) -> float:
        """Fraction of clips predicted right (unparsed answers count as wrong)."""
        if len(true_labels) != len(self.predictions):
            raise ValueError(f"{len(true_labels)} true labels for {len(self.predictions)} predictions")
        return float(
            np.mean([p is not None and p == t for p, t in zip(self.predictions, true_labels, strict=True)])
        )


def _label_token_ids(lm: ChatLM, labels: Sequence[str]) -> list[int]:
    ids = []
    for label in labels:
        tokens = lm.token_ids(label)
        if len(tokens) != 1:
            raise ParameterError(
                f"option label {label!r} is {len(tokens)} tokens for this tokenizer; `letters` needs "
                "single-token labels (use mode='likelihood' for many classes)"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ParameterError("option labels map to the same token")
    return ids


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def letter_scores(lm: ChatLM, inputs: Sequence[Any], prompt: Prompt, batch_size: int) -> np.ndarray:
    """(n, C) next-token logits of the option labels at the end of the prompt."""
    label_ids = torch.tensor(_label_token_ids(lm, prompt.labels))
    rows = []
    for batch in _batches(inputs, batch_size):
        logits, _ = last_logits(lm, lm.encode(batch, prompt.text))
        rows.append(logits[:, label_ids.to(logits.device)].cpu().numpy())
    return np.concatenate(rows)


def _repeat_cache(cache: Any, repeats: int) -> Any:
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(repeats)
        return cache
    raise TypeError(f"cannot repeat a {type(cache).__name__} over classes")


def _continuation_positions(lm: ChatLM, mask: torch.Tensor, length: int, repeats: int) -> torch.Tensor | None:
    """Position ids of the class-name tokens that follow a cached prompt, or None (model default).

    Multimodal rotary models (Qwen2.5-Omni) keep per-row `rope_deltas` from the prompt's forward:
    text positions continue at (real tokens so far) + delta on all three M-RoPE axes."""
    positions = mask_positions(mask)[:, -length:]
    deltas = getattr(getattr(lm.model, "model", None), "rope_deltas", None)
    if deltas is not None:
        positions = positions + deltas.to(positions.device).repeat_interleave(repeats, dim=0)
        return positions[None].expand(3, -1, -1)
    return positions if lm.positions_from_mask else None


def _continuations(lm: ChatLM, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (C, L) of the class names, and their lengths (C,)."""
    tokens = [lm.token_ids(name) for name in names]
    if any(len(t) == 0 for t in tokens):
        raise ParameterError("a class name is empty after tokenisation")
    length = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), length), lm.pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.tensor(t)
    return ids, torch.tensor([len(t) for t in tokens])


def likelihood_scores(
    lm: ChatLM, inputs: Sequence[Any], prompt_text: str, names: Sequence[str], batch_size: int
) -> np.ndarray:
    """(n, C) summed log-probabilities of each class name as the answer; prompt and audio run once
    per clip (KV cache), then all names of all clips in the batch in one forward pass."""
    cont, lengths = _continuations(lm, names)
    n_classes, length = cont.shape
    steps = torch.arange(length)
    valid = (steps[None, :] < lengths[:, None]).float()  # (C, L)
    rows = []
    for batch in _batches(inputs, batch_size):
        enc = lm.encode(batch, prompt_text)
        first_logits, out = last_logits(lm, enc, use_cache=True)
        first = torch.log_softmax(first_logits, dim=-1)[:, cont[:, 0].to(first_logits.device)].cpu()  # (b, C)
        score = first
        if length > 1:
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            if cache is None:
                raise TypeError(f"{type(lm.model).__name__} returned no KV cache")
            b = len(batch)
            device = enc["attention_mask"].device
            mask = torch.cat(
                [
                    enc["attention_mask"].repeat_interleave(n_classes, dim=0),
                    valid.repeat(b, 1).to(device=device, dtype=enc["attention_mask"].dtype),
                ],
                dim=1,
            )
            cache_name = "cache" if accepts_argument(lm.model, "cache") else "past_key_values"
            extra = {cache_name: _repeat_cache(cache, n_classes), "use_cache": True}
            positions = _continuation_positions(lm, mask, length, n_classes)
            if positions is not None:
                extra["position_ids"] = positions
            rest = forward(lm, {"input_ids": cont.repeat(b, 1).to(device), "attention_mask": mask}, **extra)
            logp = torch.log_softmax(rest.logits[:, :-1].float(), dim=-1).cpu()  # predicts tokens 1..L-1
            target = cont[:, 1:].repeat(b, 1)
            picked = logp.gather(-1, target[..., None])[..., 0] * valid[:, 1:].repeat(b, 1)
            score = score + picked.sum(dim=1).view(b, n_classes)
        rows.append(score.numpy())
    return np.concatenate(rows)


def _resolve_prompt(prompt: str | Prompt | None, mode: str, classes: Sequence[str]) -> Prompt:
    if isinstance(prompt, Prompt):
        return prompt
    if prompt is None:
        return render_prompt("choices" if mode in ("letters", "generate") else "caption", classes)
    return Prompt(text=prompt)


def zero_shot(
    model: Any,
    inputs: Sequence[Any],
    classes: Sequence[str],
    *,
    mode: str = "letters",
    prompt: str | Prompt | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
) -> ZeroShotResult:
    """Let the model classify `inputs` without training.

    Args:
        model: a `ChatLM` or an LALM extractor (`calm.load_extractor("qwen2-audio")`).
        inputs: loaded clips (what the extractor's `load_input` returns).
        classes: class names.
        mode: `letters`, `likelihood` or `generate` (see the module docstring).
        prompt: a rendered `Prompt` (its options must be the classes, for `letters`), plain text,
            or None: the `choices` template for `letters` / `generate`, `caption` for `likelihood`.
        batch_size: clips per forward pass.
        max_new_tokens: answer length of `generate`.
        temperature: 0 = greedy `generate`; > 0 samples at that temperature (seeded).
        seed: sampling seed of `generate`.
    """
    if mode not in MODES:
        raise ParameterError(f"mode must be one of {MODES}, got {mode!r}")
    classes = tuple(classes)
    if len(set(classes)) != len(classes) or not classes:
        raise ParameterError("classes must be non-empty and unique")
    lm = as_chat_lm(model)
    rendered = _resolve_prompt(prompt, mode, classes)
    if mode == "letters":
        if tuple(rendered.options) != classes:
            raise ParameterError(
                "mode 'letters' needs a prompt whose options are the classes (template 'choices')"
            )
        scores = letter_scores(lm, inputs, rendered, batch_size)
        predictions = [classes[i] for i in scores.argmax(axis=1)]
        return ZeroShotResult(predictions, scores, 0, None, classes, rendered.text)
    if mode == "likelihood":
        scores = likelihood_scores(lm, inputs, rendered.text, [verbalise(c) for c in classes], batch_size)
        predictions = [classes[i] for i in scores.argmax(axis=1)]
        return ZeroShotResult(predictions, scores, 0, None, classes, rendered.text)
    answers: list[str] = []
    for k, batch in enumerate(_batches(inputs, batch_size)):
        temps = None if temperature <= 0 else np.full((len(batch), 1), temperature, dtype=np.float32)
        got = generate_answers(lm, batch, rendered.text, temps, max_new_tokens=max_new_tokens, seed=seed + k)
        answers.extend(row[0] for row in got)
    option_classes = rendered.options if rendered.options else classes
    labels = rendered.labels if rendered.options else None
    predictions = [match_answer(a, option_classes, labels) for a in answers]
    predictions = [p if p in classes else None for p in predictions]
    n_unparsed = sum(p is None for p in predictions)
    return ZeroShotResult(predictions, None, n_unparsed, answers, classes, rendered.text)
