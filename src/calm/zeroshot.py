"""Zero-shot baseline: the audio-language model answers the question itself (METHOD.md item 9).

Three modes, all batched:

- `letters`: the prompt lists the classes as options A, B, C, ...; one forward pass per batch;
  the prediction is the option whose label token has the largest next-token logit at the end of
  the prompt (after the chat template's generation prompt). Deterministic.
- `likelihood`: the score of a class is the sum of the log-probabilities of its name's tokens as
  the answer. Prompt and audio run once per clip with the KV cache on; the cache is repeated once
  per class and all class names are scored in one further forward pass.
- `generate`: the model writes an answer (greedy by default, seeded sampling with
  `temperature > 0`), mapped to a class by `calm.answers.match_answer` (normalised exact match,
  option label, fuzzy match). Unparseable answers are counted in `n_unparsed`, predicted as None
  (always wrong), never dropped.

The model side is a `ChatLM`: a transformers model with its LM head, its tokenizer and a
`build_inputs(inputs, prompt_text)` that applies the chat template (audio, then the prompt text,
then the generation prompt) and returns left-padded model inputs. `as_chat_lm` makes one from an
LALM extractor of `calm.models`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from calm.answers import match_answer
from calm.prompts import Prompt, render_prompt

__all__ = ["ChatLM", "LALMSampler", "MODES", "ZeroShotResult", "as_chat_lm", "verbalise", "zero_shot"]

MODES = ("letters", "likelihood", "generate")


def verbalise(class_name: str) -> str:
    """How a class is written in an answer: `car_horn` -> `car horn`."""
    return class_name.replace("_", " ").strip()


@dataclass
class ChatLM:
    """What zero-shot and pseudo-labelling need from an audio-language model.

    Attributes:
        model: transformers model with an LM head (`model(**inputs).logits`), in eval mode.
        tokenizer: its tokenizer.
        build_inputs: `(inputs, prompt_text) -> dict of tensors` on the model's device, LEFT padded.
        forward_kwargs: extra keyword arguments of every forward / generate call.
        positions_from_mask: pass position ids counted over real tokens (1-D rotary models such as
            Qwen2-Audio); False lets the model compute them (Qwen2.5-Omni's M-RoPE).
    """

    model: Any
    tokenizer: Any
    build_inputs: Callable[[Sequence[Any], str], Mapping[str, torch.Tensor]]
    forward_kwargs: dict = field(default_factory=dict)
    positions_from_mask: bool = False

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def encode(self, inputs: Sequence[Any], prompt_text: str) -> dict[str, torch.Tensor]:
        enc = dict(self.build_inputs(inputs, prompt_text))
        mask = enc.get("attention_mask")
        if mask is None:
            raise ValueError("build_inputs must return an attention_mask")
        if not bool(mask[:, -1].all()):
            raise ValueError(
                "build_inputs must pad on the left (the last position must be real in every row)"
            )
        return enc

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def as_chat_lm(obj: Any) -> ChatLM:
    """A `ChatLM` from a `ChatLM` or an LALM extractor (attributes `model`, `processor` or
    `tokenizer`, `build_inputs(waves, prompt_text)` and optionally `forward_kwargs`)."""
    if isinstance(obj, ChatLM):
        return obj
    model = getattr(obj, "model", None)
    build = getattr(obj, "build_inputs", None)
    tokenizer = getattr(obj, "tokenizer", None) or getattr(getattr(obj, "processor", None), "tokenizer", None)
    if model is None or build is None or tokenizer is None:
        raise TypeError(
            f"{type(obj).__name__} is not an audio-language model extractor: zero-shot needs `model`, "
            "`build_inputs` and a tokenizer (Whisper extractors cannot answer questions)"
        )

    from calm.models.lalm import is_truncated

    if is_truncated(model):
        raise ValueError(
            f"{type(obj).__name__} was loaded with only the first decoder layers (layers=...): its LM "
            "head cannot answer; load it with truncate_layers=False for zero-shot or pseudo-labels"
        )

    def build_left(inputs: Sequence[Any], prompt_text: str):
        return build(inputs, prompt_text, padding_side="left")

    return ChatLM(
        model,
        tokenizer,
        build_left,
        dict(getattr(obj, "forward_kwargs", {}) or {}),
        bool(getattr(obj, "positions_from_mask", False)),
    )


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


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


def _forward(lm: ChatLM, enc: Mapping[str, torch.Tensor], **kwargs) -> Any:
    with torch.inference_mode():
        return lm.model(**enc, **lm.forward_kwargs, **kwargs)


def _accepts(model: Any, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def last_logits(lm: ChatLM, enc: Mapping[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, Any]:
    """(float32 next-token logits at the end of each left-padded prompt (n, V), model output)."""
    if _accepts(lm.model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    if lm.positions_from_mask:
        kwargs["position_ids"] = _positions(enc["attention_mask"])
    out = _forward(lm, enc, **kwargs)
    return out.logits[:, -1].float(), out


def _label_token_ids(lm: ChatLM, labels: Sequence[str]) -> list[int]:
    ids = []
    for label in labels:
        tokens = lm.token_ids(label)
        if len(tokens) != 1:
            raise ValueError(
                f"option label {label!r} is {len(tokens)} tokens for this tokenizer; `letters` needs "
                "single-token labels (use mode='likelihood' for many classes)"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError("option labels map to the same token")
    return ids


def _batches(items: Sequence[Any], size: int):
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
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
    positions = _positions(mask)[:, -length:]
    deltas = getattr(getattr(lm.model, "model", None), "rope_deltas", None)
    if deltas is not None:
        positions = positions + deltas.to(positions.device).repeat_interleave(repeats, dim=0)
        return positions[None].expand(3, -1, -1)
    return positions if lm.positions_from_mask else None


def _continuations(lm: ChatLM, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (C, L) of the class names, and their lengths (C,)."""
    tokens = [lm.token_ids(name) for name in names]
    if any(len(t) == 0 for t in tokens):
        raise ValueError("a class name is empty after tokenisation")
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
            cache_name = "cache" if _accepts(lm.model, "cache") else "past_key_values"
            extra = {cache_name: _repeat_cache(cache, n_classes), "use_cache": True}
            positions = _continuation_positions(lm, mask, length, n_classes)
            if positions is not None:
                extra["position_ids"] = positions
            rest = _forward(lm, {"input_ids": cont.repeat(b, 1).to(device), "attention_mask": mask}, **extra)
            logp = torch.log_softmax(rest.logits[:, :-1].float(), dim=-1).cpu()  # predicts tokens 1..L-1
            target = cont[:, 1:].repeat(b, 1)
            picked = logp.gather(-1, target[..., None])[..., 0] * valid[:, 1:].repeat(b, 1)
            score = score + picked.sum(dim=1).view(b, n_classes)
        rows.append(score.numpy())
    return np.concatenate(rows)


class _RowTemperature:
    """Logits processor dividing each row's scores by its own temperature (one per sequence)."""

    def __init__(self, temperatures: torch.Tensor):
        self.temperatures = temperatures

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperatures.to(scores.device, scores.dtype)[:, None]


def generate_answers(
    lm: ChatLM,
    inputs: Sequence[Any],
    prompt_text: str,
    temperatures: np.ndarray | None,
    *,
    max_new_tokens: int = 16,
    seed: int = 0,
) -> list[list[str]]:
    """Answers per input: greedy (temperatures None, one answer each) or sampled, one answer per
    column of `temperatures` (n, M), each at its own temperature, with plain softmax sampling
    (no top-k / top-p), seeded."""
    from transformers import LogitsProcessorList

    enc = lm.encode(inputs, prompt_text)
    width = enc["input_ids"].shape[1]
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": lm.pad_id}
    if temperatures is None:
        kwargs.update(do_sample=False, num_return_sequences=1)
        rollouts = 1
    else:
        temperatures = np.asarray(temperatures, dtype=np.float32)
        if temperatures.shape[0] != len(inputs) or np.any(temperatures <= 0):
            raise ValueError(
                f"temperatures must be positive with one row per input, got {temperatures.shape}"
            )
        rollouts = temperatures.shape[1]
        per_row = torch.from_numpy(temperatures.reshape(-1))  # generate repeats each input `rollouts` times
        kwargs.update(
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=rollouts,
            logits_processor=LogitsProcessorList([_RowTemperature(per_row)]),
        )
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = lm.model.generate(**enc, **lm.forward_kwargs, **kwargs)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    texts = lm.tokenizer.batch_decode(sequences[:, width:], skip_special_tokens=True)
    return [[t.strip() for t in texts[i * rollouts : (i + 1) * rollouts]] for i in range(len(inputs))]


class LALMSampler:
    """A `calm.pseudolabel` sampler backed by a model: `sampler(inputs, temperatures (b, M))`."""

    def __init__(self, model: Any, prompt_text: str, *, max_new_tokens: int = 16, seed: int = 0):
        self.lm = as_chat_lm(model)
        self.prompt_text = prompt_text
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self._calls = 0

    def __call__(self, inputs: Sequence[Any], temperatures: np.ndarray) -> list[list[str]]:
        self._calls += 1
        return generate_answers(
            self.lm,
            inputs,
            self.prompt_text,
            temperatures,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed * 100_003 + self._calls,
        )


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
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    classes = tuple(classes)
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError("classes must be non-empty and unique")
    lm = as_chat_lm(model)
    rendered = _resolve_prompt(prompt, mode, classes)
    if mode == "letters":
        if tuple(rendered.options) != classes:
            raise ValueError(
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
