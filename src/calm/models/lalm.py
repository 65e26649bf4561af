"""The shared path for audio-language models (LALMs): processor + chat template -> inputs ->
per-head features of the text decoder at the last prompt token.

A backend only says how one clip and a prompt become a conversation (`conversation`) and which
extra processor arguments it needs (`processor_kwargs`); batching, padding, dtype/device and the
hooked forward pass are shared. The zero-shot and pseudo-label code reuses `model`, `processor`
and `build_inputs` to run `generate` or read logits on exactly the inputs the features see.

The chat template's generation prompt is appended, so the last prompt token is the one right
before the answer would start (METHOD.md, "Features").
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from calm.models.base import Extractor, ExtractorError, HeadName, dtype_name
from calm.models.hooks import HeadCapture, at_positions, decoder_attention_sites, last_token_positions

DEFAULT_PROMPT = "What is the sound in this audio?"
AUDIO_PLACEHOLDER = "clip"  # chat templates test for an `audio` key; the waveform goes to the processor


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left-padded rows get the positions of unpadded ones."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class LALMExtractor(Extractor):
    """Per-head features of an LALM's text decoder at the last prompt token.

    Attributes besides the `Extractor` contract: `model` (the loaded model, eval mode),
    `processor` (its processor, with chat template), `prompt` (user text after the audio),
    `sites` (hooked attention blocks).
    """

    #: pass position ids computed from the attention mask (right for plain 1-D rotary positions;
    #: backends with multimodal positions, e.g. M-RoPE, leave it False and the model computes them)
    positions_from_mask: bool = False
    #: padding side used for feature extraction; right padding never moves real tokens
    padding_side: str = "right"

    def __init__(
        self,
        model,
        processor,
        *,
        model_id: str,
        prompt: str | None = None,
        layers: Sequence[int] | int | None = None,
        revision: str | None = None,
        padding_side: str | None = None,
        options: dict[str, Any] | None = None,
    ):
        if getattr(processor, "chat_template", None) is None:
            raise ExtractorError(f"the processor of {model_id} has no chat template")
        feature_extractor = getattr(processor, "feature_extractor", None)
        if feature_extractor is None:
            raise ExtractorError(f"the processor of {model_id} has no audio feature extractor")
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        self.revision = revision
        self.prompt = DEFAULT_PROMPT if prompt is None else prompt
        if padding_side is not None:
            if padding_side not in ("left", "right"):
                raise ExtractorError(f"padding_side={padding_side!r}: use 'left' or 'right'")
            self.padding_side = padding_side
        self.options = dict(options or {})
        self.sample_rate = int(feature_extractor.sampling_rate)
        chunk = getattr(feature_extractor, "chunk_length", None)
        self.max_seconds = float(chunk) if chunk else None
        self.sites = decoder_attention_sites(model, layers)
        self.layers = [site.layer for site in self.sites]
        self.head_names = [
            HeadName(site.layer, head, "decoder") for site in self.sites for head in range(site.num_heads)
        ]

    # ------------------------------------------------------------------ backend hooks

    def conversation(self, prompt_text: str) -> list[dict]:
        """The chat for one clip: a user message holding the audio, then the text prompt."""
        return [
            {
                "role": "user",
                "content": [
                    {"type": "audio", "audio": AUDIO_PLACEHOLDER},
                    {"type": "text", "text": prompt_text},
                ],
            }
        ]

    def processor_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for `processor(...)`."""
        return {"sampling_rate": self.sample_rate}

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of every forward / generate call (e.g. `use_audio_in_video`)."""
        return {}

    # ------------------------------------------------------------------ inputs

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def chat_text(self, prompt_text: str | None = None) -> str:
        """The rendered chat (with generation prompt) for one clip, before audio-token expansion."""
        text = self.processor.apply_chat_template(
            self.conversation(self.prompt if prompt_text is None else prompt_text),
            add_generation_prompt=True,
            tokenize=False,
        )
        return text[0] if isinstance(text, list) else text

    def build_inputs(
        self,
        waves: Sequence[np.ndarray],
        prompt_text: str | None = None,
        *,
        padding_side: str | None = None,
    ):
        """Batched model inputs for `waves` (1-D float arrays at `sample_rate`) and one prompt
        (default: the extractor's): a BatchFeature on the model's device, floating tensors in the
        model's dtype. Works for features, `generate` and logits alike."""
        waves = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
        if not waves:
            raise ExtractorError("build_inputs needs at least one clip")
        text = self.chat_text(prompt_text)
        inputs = self.processor(
            text=[text] * len(waves),
            audio=waves,
            return_tensors="pt",
            padding=True,
            padding_side=padding_side or self.padding_side,
            **self.processor_kwargs(),
        )
        inputs = inputs.to(self.device)
        for name, value in inputs.items():
            if torch.is_tensor(value) and value.is_floating_point():
                inputs[name] = value.to(self.dtype)
        return inputs

    # ------------------------------------------------------------------ features

    @property
    def key(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "revision": self.revision,
            "prompt": self.prompt,
            "heads": "decoder",
            "layers": self.layers,
            "dtype": dtype_name(self.dtype),
            "options": self.options,
        }

    def _forward_module(self, inputs) -> torch.nn.Module:
        """The base model (no LM head) when its forward takes every input by name, else the full
        model; the hooks stop either before the LM head."""
        base = getattr(self.model, "base_model", self.model)
        if base is self.model:
            return self.model
        parameters = inspect.signature(base.forward).parameters
        return base if all(name in parameters for name in inputs) else self.model

    def forward_features(self, inputs, *, stop: bool = True) -> np.ndarray:
        """Per-head features (n, K, d) float32 of prepared inputs (see `build_inputs`)."""
        inputs = dict(inputs)
        mask = inputs["attention_mask"]
        if self.positions_from_mask and "position_ids" not in inputs:
            inputs["position_ids"] = position_ids_from_mask(mask)
        module = self._forward_module(inputs)
        capture = HeadCapture(self.sites, at_positions(last_token_positions(mask)), stop=stop)
        with torch.inference_mode():
            features = capture.run(lambda: module(**inputs, **self.forward_kwargs, use_cache=False))
        return features.cpu().numpy()

    def extract(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        return self.forward_features(self.build_inputs(inputs))


def model_revision(model) -> str | None:
    """The hub commit of a loaded checkpoint, or None for local directories."""
    return getattr(model.config, "_commit_hash", None)


def load_lalm(
    model_id: str,
    *,
    extractor_cls: type[LALMExtractor] = LALMExtractor,
    model_cls=None,
    heads: str = "all",
    prompt: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    layers: Sequence[int] | int | None = None,
    attn_implementation: str | None = None,
    name: str | None = None,
    revision: str | None = None,
    padding_side: str | None = None,
    **options,
) -> LALMExtractor:
    """Load an LALM (hub id or local directory) with its processor as a `extractor_cls`.

    `model_cls` defaults to `AutoModelForMultimodalLM`. Unknown `options` are an error here;
    backends consume their own before calling this.
    """
    from transformers import AutoModelForMultimodalLM, AutoProcessor

    if heads not in ("all", "decoder"):
        raise ExtractorError(
            f"heads={heads!r}: audio-language models have decoder heads only ('all' or 'decoder')"
        )
    if options:
        raise ExtractorError(f"unknown options for {model_id}: {sorted(options)}")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if revision:
        kwargs["revision"] = revision
    model = (model_cls or AutoModelForMultimodalLM).from_pretrained(str(model_id), **kwargs).to(device)
    processor = AutoProcessor.from_pretrained(str(model_id), **({"revision": revision} if revision else {}))
    return extractor_cls(
        model,
        processor,
        model_id=name or str(model_id),
        prompt=prompt,
        layers=layers,
        revision=revision or model_revision(model),
        padding_side=padding_side,
    )
