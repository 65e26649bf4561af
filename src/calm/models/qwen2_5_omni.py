"""Qwen2.5-Omni's thinker (`Qwen2_5OmniThinkerForConditionalGeneration`), registered as
`qwen2.5-omni-7b` and `qwen2.5-omni-3b`. Only the thinker is loaded, never the talker or the
token-to-wave model: from a full Omni checkpoint its `thinker.` weights are mapped onto the thinker.

Two input kinds:
- audio only (default): the user message holds the audio, then the text prompt;
- audio-visual (`video=True`): a video file's frames, decoded with PyAV at `fps` frames per second
  and scaled to `frame_size`, plus its audio track, interleaved by the processor in 2 s chunks
  (`use_audio_in_video`). `load_input` then returns a `VideoClip` (frames + audio).

The processor is built explicitly (tokenizer, Whisper feature extractor, and the numpy image /
video patchers of `calm.models.processors`), so no torchvision or image library is needed; video
files are decoded by `calm.video`. It pads text on the left by default; positions are Qwen's
multimodal M-RoPE, computed by the model from the attention mask, so features do not depend on
the padding side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from calm.models.base import ExtractorError, model_revision
from calm.models.lalm import (
    AUDIO_PLACEHOLDER,
    LALM_OPTIONS,
    LALMExtractor,
    check_decoder_heads,
    truncated_config,
)
from calm.models.processors import build_processor, chat_template
from calm.models.spec import LoadSpec, backend_options
from calm.video import DEFAULT_FPS, DEFAULT_FRAME_SIZE, VideoClip, load_video

HUB_IDS = {"qwen2.5-omni-7b": "Qwen/Qwen2.5-Omni-7B", "qwen2.5-omni-3b": "Qwen/Qwen2.5-Omni-3B"}
#: the LALM options, and the audio-visual ones: `video`, `fps`, `frame_size` (height, width), `max_frames`
OMNI_OPTIONS = {
    **LALM_OPTIONS,
    "video": False,
    "fps": DEFAULT_FPS,
    "frame_size": DEFAULT_FRAME_SIZE,
    "max_frames": None,
}


class Qwen25OmniExtractor(LALMExtractor):
    """Qwen2.5-Omni thinker; audio only, or audio-visual when `video=True`.

    Frames are scaled to `frame_size` (height, width; multiples of 28) and sampled at `fps`.
    """

    positions_from_mask = False  # M-RoPE: the model computes positions from the attention mask

    def __init__(
        self,
        model,
        processor,
        *,
        video: bool = False,
        fps: float = DEFAULT_FPS,
        frame_size: Sequence[int] = DEFAULT_FRAME_SIZE,
        max_frames: int | None = None,
        **kwargs,
    ):
        options = dict(kwargs.pop("options", None) or {})
        frame_size = tuple(int(s) for s in frame_size)
        if video:
            unit = processor.video_processor.patch_size * processor.video_processor.merge_size
            if len(frame_size) != 2 or frame_size[0] % unit or frame_size[1] % unit:
                raise ExtractorError(f"frame_size={frame_size}: give (height, width), multiples of {unit}")
            if fps <= 0:
                raise ExtractorError(f"fps must be > 0, got {fps}")
            options.update(video=True, fps=float(fps), frame_size=list(frame_size), max_frames=max_frames)
        super().__init__(model, processor, options=options, **kwargs)
        self.video, self.fps, self.frame_size, self.max_frames = (
            bool(video),
            float(fps),
            frame_size,
            max_frames,
        )

    def conversation(self, prompt_text: str) -> list[dict]:
        if not self.video:
            return super().conversation(prompt_text)
        return [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": AUDIO_PLACEHOLDER},
                    {"type": "text", "text": prompt_text},
                ],
            }
        ]

    def load_input(self, path) -> Any:
        if not self.video:
            return super().load_input(path)
        return load_video(
            path,
            sample_rate=self.sample_rate,
            fps=self.fps,
            frame_size=(self.frame_size[0], self.frame_size[1]),  # (height, width), checked in __init__
            max_seconds=self.max_seconds,
            max_frames=self.max_frames,
        )

    def build_inputs(self, inputs, prompt_text: str | None = None, *, padding_side: str | None = None):
        """Model inputs for waveforms (audio only) or `VideoClip`s (audio-visual)."""
        if not self.video:
            return super().build_inputs(inputs, prompt_text, padding_side=padding_side)
        if not inputs:
            raise ExtractorError("build_inputs needs at least one clip")
        if not all(isinstance(clip, VideoClip) for clip in inputs):
            raise ExtractorError("the audio-visual extractor takes VideoClip inputs (see load_input)")
        text = self.chat_text(prompt_text)
        batch = self.processor(
            text=[text] * len(inputs),
            videos=[clip.frames for clip in inputs],
            audio=[np.asarray(clip.audio, dtype=np.float32).reshape(-1) for clip in inputs],
            audio_from_video_indices=list(range(len(inputs))),
            load_audio_from_video=True,
            videos_kwargs={"fps": self.fps},
            return_tensors="pt",
            padding=True,
            padding_side=padding_side or self.padding_side,
            sampling_rate=self.sample_rate,
        )
        batch = self.to_model(batch)
        batch["use_audio_in_video"] = True
        return batch


def _thinker_config(model_id: str, revision: str | None):
    """(thinker config, whether the checkpoint is a full Omni model whose weights are `thinker.*`)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_id, **({"revision": revision} if revision else {}))
    if config.model_type == "qwen2_5_omni":
        return config.thinker_config, True
    if config.model_type == "qwen2_5_omni_thinker":
        return config, False
    raise ExtractorError(f"{model_id} is a {config.model_type!r} model, not Qwen2.5-Omni")


@backend_options(**OMNI_OPTIONS)
def load_qwen2_5_omni(spec: LoadSpec) -> Qwen25OmniExtractor:
    """Load the thinker of a Qwen2.5-Omni checkpoint (hub id or local directory; a full Omni
    checkpoint or a thinker-only one) as a `Qwen25OmniExtractor`; see `load_extractor`. With `layers`
    and the option `truncate_layers` only the decoder layers up to the last selected one are loaded."""
    from transformers import (
        AutoTokenizer,
        Qwen2_5OmniThinkerForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    check_decoder_heads(spec, "Qwen2.5-Omni has")
    options = spec.options
    config, full = _thinker_config(spec.model_id, spec.revision)
    layers = spec.layer_list()
    if options["truncate_layers"]:
        config, layers = truncated_config(config, layers)
    kwargs = {**spec.pretrained_kwargs(), "config": config}
    if full:
        kwargs["key_mapping"] = {r"^thinker\.": ""}  # load the thinker's weights only
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(spec.model_id, **kwargs)
    # transformers types its decorated `PreTrainedModel.to` as taking the model as first argument
    model = model.to(spec.device)  # type: ignore[arg-type]
    hub = spec.hub_kwargs()
    tokenizer = AutoTokenizer.from_pretrained(spec.model_id, **hub)
    feature_extractor = WhisperFeatureExtractor.from_pretrained(spec.model_id, **hub)
    template = chat_template(spec.model_id, tokenizer, hub)
    processor = build_processor(tokenizer, feature_extractor, template, config.vision_config)
    return Qwen25OmniExtractor(
        model,
        processor,
        model_id=spec.label,
        prompt=spec.prompt,
        layers=layers,
        revision=spec.revision or model_revision(model),
        padding_side=options["padding_side"],
        video=options["video"],
        fps=options["fps"],
        frame_size=options["frame_size"],
        max_frames=options["max_frames"],
    )
