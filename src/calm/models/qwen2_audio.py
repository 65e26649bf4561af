"""Qwen2-Audio (`Qwen2AudioForConditionalGeneration`), registered as `qwen2-audio`.

The user message holds the audio, then the text prompt; the chat template's generation prompt
is appended and features are read at its last token (METHOD.md). The processor pads audio
features to 30 s and expects 128 mel bins; its audio tower masks the padding, so a clip's
features do not depend on the other clips of its batch. Qwen2's rotary positions are 1-D, so
position ids are computed from the attention mask and left padding gives the same features as
right padding.
"""

from __future__ import annotations

from calm.models.lalm import LALM_OPTIONS, LALMExtractor, load_lalm
from calm.models.spec import LoadSpec, backend_options

HUB_ID = "Qwen/Qwen2-Audio-7B-Instruct"


class Qwen2AudioExtractor(LALMExtractor):
    positions_from_mask = True


@backend_options(**LALM_OPTIONS)
def load_qwen2_audio(spec: LoadSpec) -> Qwen2AudioExtractor:
    """A `Qwen2AudioExtractor` for `spec.model_id` (hub id or local directory); see `load_extractor`."""
    from transformers import Qwen2AudioForConditionalGeneration

    return load_lalm(  # type: ignore[return-value]
        spec, extractor_cls=Qwen2AudioExtractor, model_cls=Qwen2AudioForConditionalGeneration
    )
