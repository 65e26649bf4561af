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
(the numpy patchers of `calm.models.processors`; this path feeds audio only).
"""

from __future__ import annotations

from calm.models.base import ExtractorError
from calm.models.lalm import LALM_OPTIONS, LALMExtractor, load_lalm
from calm.models.processors import NUMPY_VISION_PROCESSORS, load_processor
from calm.models.spec import LoadSpec, backend_options

#: transformers auto classes tried in order; the first whose mapping knows the config is used.
AUTO_CLASSES = (
    "AutoModelForMultimodalLM",
    "AutoModelForImageTextToText",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForSeq2SeqLM",
    "AutoModelForCausalLM",
)


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


@backend_options(**LALM_OPTIONS)
def load_generic(spec: LoadSpec) -> GenericLALMExtractor:
    """A `GenericLALMExtractor` for `spec.model_id` (hub id or local directory); see `load_extractor`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec.model_id, **spec.hub_kwargs())
    extra = {}
    thinker = getattr(config, "thinker_config", None)
    if thinker is not None:  # a full Omni checkpoint: the thinker only, from its `thinker.*` weights
        extra = {"config": thinker, "key_mapping": {r"^thinker\.": ""}}
        config = thinker
    return load_lalm(  # type: ignore[return-value]
        spec,
        extractor_cls=GenericLALMExtractor,
        model_cls=model_class(config),
        load_processor=lambda path, **hub: load_processor(path, config, **hub),
        **extra,
    )


__all__ = ["AUTO_CLASSES", "NUMPY_VISION_PROCESSORS", "GenericLALMExtractor", "load_generic", "model_class"]
