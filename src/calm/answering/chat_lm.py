"""The model side of zero-shot answers and pseudo-labels: a `ChatLM` adapter over an audio-language model.

A `ChatLM` is a transformers model with its LM head, its tokenizer and a
`build_inputs(inputs, prompt_text)` that applies the chat template (audio, then the prompt text,
then the generation prompt) and returns left-padded model inputs. `as_chat_lm` makes one from an
LALM extractor of `calm.models`. On top of it: the next-token logits at the end of a prompt
(`last_logits`), answer generation, greedy or sampled at one temperature per row
(`generate_answers`), and `LALMSampler`, the sampler `calm.answering.pseudolabel` draws answers from.
Scoring the classes from these logits is `calm.answering.zeroshot`'s job.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from calm.models.base import ExtractorError

__all__ = [
    "ChatLM",
    "LALMSampler",
    "accepts_argument",
    "as_chat_lm",
    "forward",
    "generate_answers",
    "last_logits",
    "mask_positions",
]


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
        raise ExtractorError(
            f"{type(obj).__name__} was loaded with only the first decoder layers (layers=...): its LM "
            "head cannot answer; load it with truncate_layers=False for zero-shot or pseudo-labels"
        )

    def build_left(inputs: Sequence[Any], prompt_text: str) -> Mapping[str, torch.Tensor]:
        return build(inputs, prompt_text, padding_side="left")

    return ChatLM(
        model,
        tokenizer,
        build_left,
        dict(getattr(obj, "forward_kwargs", {}) or {}),
        bool(getattr(obj, "positions_from_mask", False)),
    )


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (n, T) counted over the real tokens of a left-padded attention mask (n, T)."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def forward(lm: ChatLM, enc: Mapping[str, torch.Tensor], **kwargs: Any) -> Any:
    """One forward pass of the model, without gradients, with the `ChatLM`'s extra arguments."""
    with torch.inference_mode():
        return lm.model(**enc, **lm.forward_kwargs, **kwargs)


def accepts_argument(model: Any, name: str) -> bool:
    """Whether `model.forward` takes a keyword argument `name`."""
    return name in inspect.signature(model.forward).parameters


def last_logits(lm: ChatLM, enc: Mapping[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, Any]:
    """(float32 next-token logits at the end of each left-padded prompt (n, V), model output)."""
    if accepts_argument(lm.model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    if lm.positions_from_mask:
        kwargs["position_ids"] = mask_positions(enc["attention_mask"])
    out = forward(lm, enc, **kwargs)
    return out.logits[:, -1].float(), out


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
    """A `calm.answering.pseudolabel` sampler backed by a model: `sampler(inputs, temperatures (b, M))`."""

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
