"""Any other audio-language model in transformers whose processor has a chat template (Voxtral,
Audio Flamingo 3, Granite Speech, Qwen3-Omni thinker, Phi-4-multimodal, Gemma 3n, ...), by hub id
or local directory, through the shared LALM path (`calm.models.lalm`).

The model loads with `AutoModelForMultimodalLM` and its own processor; the conversation is the
shared one (a user message with the audio, then the prompt text, then the generation prompt).
Positions are left to the model (it computes them from the attention mask when it needs to), so
features are read with right padding, which never moves real tokens. Audio is padded the way the
model's own processor pads it (Whisper-style encoders with fixed positions, e.g. Audio Flamingo 3,
need 30 s windows); only the text is padded to the batch's longest prompt. `load_extractor`
sends every model type without its own backend here. Which architectures were tested, and how,
is in docs/backends.md.

Omni checkpoints whose config has a `thinker_config` (Qwen3-Omni-MoE) load only the thinker, with
the checkpoint's `thinker.*` weights, never the talker. A processor that needs torchvision only
for its image / video processors is built without it when `NUMPY_VISION_PROCESSORS` knows it
(the numpy patchers of `calm.models.qwen2_5_omni`; this path feeds audio only).
"""

from __future__ import annotations

from calm.models.base import ExtractorError
from calm.models.lalm import LALMExtractor, load_lalm

#: transformers auto classes tried in order; the first whose mapping knows the config is used.
AUTO_CLASSES = (
    "AutoModelForMultimodalLM",
    "AutoModelForImageTextToText",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForSeq2SeqLM",
    "AutoModelForCausalLM",
)

#: model type (without `_thinker`) -> processor class under `transformers.models` that can be
#: built with numpy image / video patchers when torchvision is missing
NUMPY_VISION_PROCESSORS = {"qwen3_omni_moe": "qwen3_omni_moe.Qwen3OmniMoeProcessor"}


class GenericLALMExtractor(LALMExtractor):
    """The shared LALM extractor: conversation and positions as in `calm.models.lalm`; audio
    padded by the processor's own default."""

    audio_padding = None


def model_class(config):
    """The transformers class with an LM head for `config`, from the first auto class that knows it."""
    import transformers

    for name in AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is not None and type(config) in mapping:
            return mapping[type(config)]
    raise ExtractorError(f"no transformers model class with an LM head for model type {config.model_type!r}")


def load_processor(model_id: str, config, **hub):
    """`AutoProcessor.from_pretrained(model_id)`, or, when that fails for want of torchvision and
    the model type is in `NUMPY_VISION_PROCESSORS`, the same processor built from the checkpoint's
    tokenizer, Whisper feature extractor and chat template with numpy image / video patchers."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_id, **hub)
    except ImportError as err:
        processor_base = NUMPY_VISION_PROCESSORS.get(config.model_type.removesuffix("_thinker"))
        if "torchvision" not in str(err).lower() or processor_base is None:
            raise
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from calm.models.qwen2_5_omni import _chat_template, build_processor

    tokenizer = AutoTokenizer.from_pretrained(model_id, **hub)
    return build_processor(
        tokenizer,
        WhisperFeatureExtractor.from_pretrained(model_id, **hub),
        _chat_template(model_id, tokenizer, hub),
        getattr(config, "vision_config", None),
        processor_base=processor_base,
    )


def load_generic(model_id: str, *, revision: str | None = None, **kwargs) -> GenericLALMExtractor:
    """A `GenericLALMExtractor` for `model_id` (hub id or local directory); see `load_extractor`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_id), **({"revision": revision} if revision else {}))
    thinker = getattr(config, "thinker_config", None)
    if thinker is not None:  # a full Omni checkpoint: the thinker only, from its `thinker.*` weights
        kwargs.update(config=thinker, key_mapping={r"^thinker\.": ""})
        config = thinker
    return load_lalm(
        str(model_id),
        extractor_cls=GenericLALMExtractor,
        model_cls=model_class(config),
        revision=revision,
        load_processor=lambda path, **hub: load_processor(path, config, **hub),
        **kwargs,
    )
