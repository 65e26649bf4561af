"""Qwen2.5-Omni's thinker (`Qwen2_5OmniThinkerForConditionalGeneration`), registered as
`qwen2.5-omni-7b` and `qwen2.5-omni-3b`. Only the thinker is loaded, never the talker or the
token-to-wave model: from a full Omni checkpoint its `thinker.` weights are mapped onto the thinker.

Two input kinds:
- audio only (default): the user message holds the audio, then the text prompt;
- audio-visual (`video=True`): a video file's frames, decoded with PyAV at `fps` frames per second
  and scaled to `frame_size`, plus its audio track, interleaved by the processor in 2 s chunks
  (`use_audio_in_video`). `load_input` then returns a `VideoClip` (frames + audio).

The processor is built explicitly (tokenizer, Whisper feature extractor, and this module's own
image/video patchers that reproduce Qwen2-VL's patch layout in numpy), so no torchvision or image
library is needed. It pads text on the left by default; positions are Qwen's multimodal M-RoPE,
computed by the model from the attention mask, so features do not depend on the padding side.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm.models.base import ExtractorError, model_revision, pretrained_kwargs
from calm.models.lalm import AUDIO_PLACEHOLDER, LALMExtractor, truncated_config

HUB_IDS = {"qwen2.5-omni-7b": "Qwen/Qwen2.5-Omni-7B", "qwen2.5-omni-3b": "Qwen/Qwen2.5-Omni-3B"}
DEFAULT_FPS = 2.0
DEFAULT_FRAME_SIZE = (224, 224)

# ---------------------------------------------------------------------------------------------
# Video: frames decoded with PyAV, patchified the way Qwen2-VL's vision encoder reads them.
# ---------------------------------------------------------------------------------------------

# CLIP normalisation used by Qwen2-VL / Qwen2.5-Omni's vision processors.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class VideoClip:
    """A decoded video for the audio-visual path: RGB frames at `fps` plus the mono audio track."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float
    audio: np.ndarray  # (n,) float32 at the model's sample rate


def frame_times(duration: float, fps: float, max_frames: int | None = None) -> np.ndarray:
    """Sampling instants 0, 1/fps, 2/fps, ... before `duration` (at least one frame)."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    n = max(1, int(np.ceil(duration * fps - 1e-9)))
    if max_frames is not None:
        n = min(n, max_frames)
    return np.arange(n) / fps


def read_frames(
    path: str | Path,
    *,
    fps: float = 2.0,
    size: tuple[int, int] = (224, 224),
    max_seconds: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """RGB frames (T, height, width, 3) uint8 of a video file, one every 1/fps seconds.

    Each sampling instant takes the last decoded frame shown at or before it; frames are scaled
    to `size` = (height, width) by libswscale (PyAV), so no image library is needed.
    """
    import av

    height, width = size
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise ValueError(f"{path}: cannot open video: {err}") from err
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        decoded: list[tuple[float, np.ndarray]] = []
        for frame in container.decode(stream):
            if frame.time is None:
                continue
            if max_seconds is not None and frame.time > max_seconds:
                break
            decoded.append(
                (float(frame.time), frame.reformat(width=width, height=height, format="rgb24").to_ndarray())
            )
    if not decoded:
        raise ValueError(f"{path}: no decodable video frames")
    starts = np.array([t for t, _ in decoded])
    duration = starts[-1] + (starts[-1] - starts[-2] if len(starts) > 1 else 1.0 / fps)
    if max_seconds is not None:
        duration = min(duration, max_seconds)
    times = frame_times(duration - starts[0], fps, max_frames) + starts[0]
    index = np.clip(np.searchsorted(starts, times + 1e-6, side="right") - 1, 0, len(decoded) - 1)
    return np.stack([decoded[i][1] for i in index])


def patchify(
    frames: np.ndarray, *, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> tuple[np.ndarray, list[int]]:
    """Qwen2-VL patches of RGB frames (T, H, W, 3) uint8: ((t*h*w, 3*tps*ps*ps) float32, [t, h, w]).

    Pixels are scaled to [0, 1] and CLIP-normalised; T is padded to a multiple of the temporal
    patch by repeating the last frame; H and W must be multiples of patch_size * merge_size.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {frames.shape}")
    t, h, w, c = frames.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"frame size {h}x{w} must be a multiple of {unit} (patch_size x merge_size)")
    x = ((frames.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2)
    if t % temporal_patch_size:
        x = np.concatenate([x, np.repeat(x[-1:], temporal_patch_size - t % temporal_patch_size, axis=0)])
    gt, gh, gw = x.shape[0] // temporal_patch_size, h // patch_size, w // patch_size
    x = x.reshape(
        gt,
        temporal_patch_size,
        c,
        gh // merge_size,
        merge_size,
        patch_size,
        gw // merge_size,
        merge_size,
        patch_size,
    )
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size)), [
        gt,
        gh,
        gw,
    ]


def load_video(
    path: str | Path,
    *,
    sample_rate: int = 16000,
    fps: float = DEFAULT_FPS,
    frame_size: tuple[int, int] = DEFAULT_FRAME_SIZE,
    max_seconds: float | None = None,
    max_frames: int | None = None,
) -> VideoClip:
    """Frames (see `read_frames`) and the mono audio track of a video file."""
    from calm.audio import load_audio

    frames = read_frames(path, fps=fps, size=frame_size, max_seconds=max_seconds, max_frames=max_frames)
    audio = load_audio(path, sample_rate, max_seconds=max_seconds)
    return VideoClip(frames=frames, fps=fps, audio=audio)


# ---------------------------------------------------------------------------------------------
# torchvision-free processor
# ---------------------------------------------------------------------------------------------


class _PatchGeometry:
    """Patch geometry (patch_size, temporal_patch_size, merge_size) of the patchers below, and the
    patchification of a batch of clips with it."""

    def __init__(self, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size

    def patch_batch(self, clips) -> tuple[torch.Tensor, torch.Tensor]:
        """The patches of every clip (T, H, W, 3) uint8, concatenated, and their [t, h, w] grids."""
        patches, grids = [], []
        for clip in clips:
            p, grid = patchify(
                np.asarray(clip),
                patch_size=self.patch_size,
                temporal_patch_size=self.temporal_patch_size,
                merge_size=self.merge_size,
            )
            patches.append(p)
            grids.append(grid)
        return torch.from_numpy(np.concatenate(patches)), torch.tensor(grids)


@functools.cache
def _vision_classes(processor_base: str = "qwen2_5_omni.Qwen2_5OmniProcessor"):
    """(video patcher, image patcher, processor) classes; the processor is a subclass of
    `transformers.models.<processor_base>` that accepts the patchers in place of torchvision ones."""
    import importlib

    from transformers.feature_extraction_utils import BatchFeature
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.video_processing_utils import VideoProcessorMixin

    module, _, name = processor_base.rpartition(".")
    base = getattr(importlib.import_module(f"transformers.models.{module}"), name)

    class OmniVideoPatcher(_PatchGeometry, VideoProcessorMixin):
        """Video processor for frames already decoded (T, H, W, 3) uint8 and sized by `read_frames`."""

        model_input_names = ["pixel_values_videos", "video_grid_thw"]

        def __call__(self, videos, **kwargs) -> BatchFeature:
            pixels, grids = self.patch_batch(videos)
            return BatchFeature({"pixel_values_videos": pixels, "video_grid_thw": grids})

    class OmniImagePatcher(_PatchGeometry, ImageProcessingMixin):
        """Image processor: an image (H, W, 3) uint8 is a one-frame video (sized by the caller)."""

        model_input_names = ["pixel_values", "image_grid_thw"]

        def __call__(self, images, **kwargs) -> BatchFeature:
            pixels, grids = self.patch_batch(np.asarray(image)[None] for image in images)
            return BatchFeature({"pixel_values": pixels, "image_grid_thw": grids})

    class OmniProcessor(base):
        """The Qwen omni processor `base` that accepts the torchvision-free patchers above."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name in ("image_processor", "video_processor"):
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    if name != "Qwen2_5OmniProcessor":
        OmniProcessor.__name__ = OmniProcessor.__qualname__ = f"NumpyVision{name}"
    return OmniVideoPatcher, OmniImagePatcher, OmniProcessor


def build_processor(
    tokenizer,
    feature_extractor,
    chat_template: str | None,
    vision_config=None,
    *,
    processor_base: str = "qwen2_5_omni.Qwen2_5OmniProcessor",
):
    """A Qwen2.5-Omni processor (or another Qwen omni processor, `processor_base` under
    `transformers.models`) from its parts, with this module's image and video patchers sized from
    the thinker's `vision_config` (patch_size, temporal_patch_size, spatial_merge_size)."""
    video_cls, image_cls, processor_cls = _vision_classes(processor_base)
    geometry = {
        "patch_size": int(getattr(vision_config, "patch_size", 14)),
        "temporal_patch_size": int(getattr(vision_config, "temporal_patch_size", 2)),
        "merge_size": int(getattr(vision_config, "spatial_merge_size", 2)),
    }
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ExtractorError(
            f"{processor_cls.__name__} needs a chat template (none in the tokenizer or processor config)"
        )
    return processor_cls(
        image_processor=image_cls(**geometry),
        video_processor=video_cls(**geometry),
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=template,
    )


# ---------------------------------------------------------------------------------------------
# Extractor
# ---------------------------------------------------------------------------------------------


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
            frame_size=self.frame_size,
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
        batch = batch.to(self.device)
        for name, value in batch.items():
            if torch.is_tensor(value) and value.is_floating_point():
                batch[name] = value.to(self.dtype)
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


def load_qwen2_5_omni(
    model_id: str = HUB_IDS["qwen2.5-omni-7b"],
    *,
    heads: str = "all",
    prompt: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    layers: Sequence[int] | int | None = None,
    attn_implementation: str | None = None,
    name: str | None = None,
    revision: str | None = None,
    padding_side: str | None = None,
    video: bool = False,
    fps: float = DEFAULT_FPS,
    frame_size: Sequence[int] = DEFAULT_FRAME_SIZE,
    max_frames: int | None = None,
    truncate_layers: bool = True,
    **options,
) -> Qwen25OmniExtractor:
    """Load the thinker of a Qwen2.5-Omni checkpoint (hub id or local directory; a full Omni
    checkpoint or a thinker-only one) as a `Qwen25OmniExtractor`; see `load_extractor`. With `layers`
    and `truncate_layers` only the decoder layers up to the last selected one are loaded."""
    from transformers import (
        AutoTokenizer,
        Qwen2_5OmniThinkerForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    if heads not in ("all", "decoder"):
        raise ExtractorError(f"heads={heads!r}: Qwen2.5-Omni has decoder heads only ('all' or 'decoder')")
    if options:
        raise ExtractorError(f"unknown options for {model_id}: {sorted(options)}")
    model_id = str(model_id)
    config, full = _thinker_config(model_id, revision)
    if truncate_layers:
        config, layers = truncated_config(config, layers)
    kwargs = {**pretrained_kwargs(dtype, attn_implementation, revision), "config": config}
    if full:
        kwargs["key_mapping"] = {r"^thinker\.": ""}  # load the thinker's weights only
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(model_id, **kwargs).to(device)
    hub = {"revision": revision} if revision else {}
    tokenizer = AutoTokenizer.from_pretrained(model_id, **hub)
    feature_extractor = WhisperFeatureExtractor.from_pretrained(model_id, **hub)
    processor = build_processor(
        tokenizer, feature_extractor, _chat_template(model_id, tokenizer, hub), config.vision_config
    )
    return Qwen25OmniExtractor(
        model,
        processor,
        model_id=name or model_id,
        prompt=prompt,
        layers=layers,
        revision=revision or model_revision(model),
        padding_side=padding_side,
        video=video,
        fps=fps,
        frame_size=frame_size,
        max_frames=max_frames,
    )


def _chat_template(model_id: str, tokenizer, hub: dict) -> str | None:
    """The chat template: the tokenizer's, else the processor's (chat_template.json / .jinja)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    import json

    from transformers.utils import cached_file

    for filename in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(model_id, filename, _raise_exceptions_for_missing_entries=False, **hub)
        if path:
            text = Path(path).read_text()
            return text if filename.endswith(".jinja") else json.loads(text)["chat_template"]
    return None
