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

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from calm.models.base import ExtractorError, HeadName, TorchExtractor, dtype_name, model_revision
from calm.models.hooks import (
    HeadCapture,
    at_positions,
    decoder_attention_sites,
    last_token_positions,
    position_ids_from_mask,
    select_layers,
)
from calm.models.spec import LoadSpec, backend_options

__all__ = ["LALMExtractor", "load_lalm", "position_ids_from_mask", "padding_kwargs", "truncated_config"]

DEFAULT_PROMPT = "What is the sound in this audio?"
AUDIO_PLACEHOLDER = "clip"  # chat templates test for an `audio` key; the waveform goes to the processor


def padding_kwargs(
    extra: dict[str, Any], *, padding_side: str, audio_padding: bool | str | None = True
) -> dict[str, Any]:
    """Keyword arguments of `processor(...)`: `extra` plus padding, per modality when needed.

    `audio_padding=True` (and no audio `padding` in `extra["audio_kwargs"]`) gives one flat
    `padding=True, padding_side=...` that the processor applies to text and audio alike (audio
    features padded to the longest clip of the batch). Otherwise the text padding goes into
    `text_kwargs` only, and the audio is padded by `extra["audio_kwargs"]["padding"]`, else by
    `audio_padding` when it is not None, else by the processor's own default (Whisper-style
    extractors: 30 s windows, which encoders with fixed positions need).
    """
    kwargs = dict(extra)
    audio = dict(kwargs.pop("audio_kwargs", None) or {})
    if audio_padding is True and "padding" not in audio:
        if audio:
            kwargs["audio_kwargs"] = audio
        return {"padding": True, "padding_side": padding_side, **kwargs}
    text = {"padding": True, "padding_side": padding_side, **(kwargs.pop("text_kwargs", None) or {})}
    if audio_padding is not None:
        audio.setdefault("padding", audio_padding)
    for name in ("padding", "padding_side"):
        if name in kwargs:
            raise ExtractorError(
                f"give {name!r} in text_kwargs / audio_kwargs, not as a flat processor argument"
            )
    return {**kwargs, "text_kwargs": text, **({"audio_kwargs": audio} if audio else {})}


class LALMExtractor(TorchExtractor):
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
    #: audio padding (see `padding_kwargs`): True pads audio features to the batch's longest clip
    #: together with the text; None leaves the processor's default; a string is the audio `padding`
    audio_padding: bool | str | None = True

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
            **padding_kwargs(
                self.processor_kwargs(),
                padding_side=padding_side or self.padding_side,
                audio_padding=self.audio_padding,
            ),
        )
        return self.to_model(inputs)

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


#: per-layer lists in text configs, shortened together with `num_hidden_layers`
PER_LAYER_CONFIG_LISTS = ("layer_types", "intermediate_size", "activation_sparsity_pattern")


def truncated_config(config, layers: Sequence[int] | int | None):
    """(config, layer indices) for loading only the decoder layers that `layers` needs.

    The indices are `layers` resolved against the full text decoder (negative ones count from
    its end). The config is a copy whose text config keeps layers 0..max(indices) (per-layer
    lists shortened too), or `config` itself when nothing can be dropped, `layers` is None, or
    the decoder shares KV caches across layers (Gemma 3n), where dropping layers changes the
    kept ones. A decoder layer depends only on the layers before it, so the kept layers' heads
    are exactly those of the full model; the LM head then sees a shortened decoder, so use such
    a model for features only.
    """
    if layers is None:
        return config, None
    text = config.get_text_config()
    total = int(text.num_hidden_layers)
    chosen = select_layers(total, layers)
    keep = chosen[-1] + 1
    if keep == total or getattr(text, "num_kv_shared_layers", None):
        return config, chosen
    config = copy.deepcopy(config)
    text = config.get_text_config()
    text.num_hidden_layers = keep
    text.calm_truncated_from = total  # marks a features-only model (see `is_truncated`)
    for name in PER_LAYER_CONFIG_LISTS:
        value = getattr(text, name, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(text, name, type(value)(value[:keep]))
    return config, chosen


def is_truncated(model) -> bool:
    """Whether `model` was loaded with fewer decoder layers than its checkpoint has."""
    return getattr(model.config.get_text_config(), "calm_truncated_from", None) is not None


#: options of the LALM backends (`qwen2-audio`, the generic path): `padding_side` of feature
#: extraction (None: the extractor's default) and `truncate_layers` (see `truncated_config`)
LALM_OPTIONS = {"padding_side": None, "truncate_layers": True}


def check_decoder_heads(spec: LoadSpec, what: str = "audio-language models have") -> None:
    """LALMs have decoder heads only: `heads` must be `all` or `decoder`."""
    if spec.heads not in ("all", "decoder"):
        raise ExtractorError(f"heads={spec.heads!r}: {what} decoder heads only ('all' or 'decoder')")


@backend_options(**LALM_OPTIONS)
def load_lalm(
    spec: LoadSpec,
    *,
    extractor_cls: type[LALMExtractor] = LALMExtractor,
    model_cls=None,
    config=None,
    key_mapping: dict[str, str] | None = None,
    load_processor=None,
) -> LALMExtractor:
    """Load the LALM `spec.model_id` (hub id or local directory) with its processor as an
    `extractor_cls`.

    `model_cls` defaults to `AutoModelForMultimodalLM`. With `spec.layers` given and the option
    `truncate_layers` (default True) only the text decoder layers up to the last selected one are
    built and loaded (see `truncated_config`): less memory and time, same features, but the
    model's LM head is then unusable (no zero-shot / generation with it). `config` replaces the
    checkpoint's config (e.g. the thinker config of a full Omni checkpoint, with `key_mapping`
    for its weights); `load_processor(model_id, **hub)` replaces `AutoProcessor.from_pretrained`.
    """
    from transformers import AutoConfig, AutoModelForMultimodalLM, AutoProcessor

    check_decoder_heads(spec)
    hub = spec.hub_kwargs()
    kwargs = spec.pretrained_kwargs()
    if config is not None:
        kwargs["config"] = config
    if key_mapping:
        kwargs["key_mapping"] = key_mapping
    layers = spec.layer_list()
    if spec.options.get("truncate_layers", True) and layers is not None:
        kwargs["config"], layers = truncated_config(
            config or AutoConfig.from_pretrained(spec.model_id, **hub), layers
        )
    model = (model_cls or AutoModelForMultimodalLM).from_pretrained(spec.model_id, **kwargs).to(spec.device)
    processor = (load_processor or AutoProcessor.from_pretrained)(spec.model_id, **hub)
    return extractor_cls(
        model,
        processor,
        model_id=spec.label,
        prompt=spec.prompt,
        layers=layers,
        revision=spec.revision or model_revision(model),
        padding_side=spec.options.get("padding_side"),
    )
