"""Processors and chat templates: finding a checkpoint's chat template, loading its processor, and
building Qwen omni processors without torchvision.

The torchvision-free build pairs the checkpoint's tokenizer and Whisper feature extractor with
this module's image / video patchers, which reproduce Qwen2-VL's patch layout in numpy
(`patchify`), so no torchvision or image library is needed (the audio paths never see pixels;
the audio-visual path of `calm.models.qwen2_5_omni` feeds frames from `calm.video`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from calm.models.base import ExtractorError

# CLIP normalisation used by Qwen2-VL / Qwen2.5-Omni's vision processors.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

#: model type (without `_thinker`) -> processor class under `transformers.models` that can be
#: built with numpy image / video patchers when torchvision is missing
NUMPY_VISION_PROCESSORS = {"qwen3_omni_moe": "qwen3_omni_moe.Qwen3OmniMoeProcessor"}


def chat_template(model_id: str, tokenizer, hub: dict) -> str | None:
    """The chat template: the tokenizer's, else the processor's (chat_template.json / .jinja)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    from transformers.utils import cached_file

    for filename in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(model_id, filename, _raise_exceptions_for_missing_entries=False, **hub)
        if path:
            text = Path(path).read_text()
            return text if filename.endswith(".jinja") else json.loads(text)["chat_template"]
    return None


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

    tokenizer = AutoTokenizer.from_pretrained(model_id, **hub)
    return build_processor(
        tokenizer,
        WhisperFeatureExtractor.from_pretrained(model_id, **hub),
        chat_template(model_id, tokenizer, hub),
        getattr(config, "vision_config", None),
        processor_base=processor_base,
    )


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

        # transformers types the mixin's call as an image processor's; this one takes decoded frames
        def __call__(self, videos, **kwargs) -> BatchFeature:  # type: ignore[override]
            pixels, grids = self.patch_batch(videos)
            return BatchFeature({"pixel_values_videos": pixels, "video_grid_thw": grids})

    class OmniImagePatcher(_PatchGeometry, ImageProcessingMixin):
        """Image processor: an image (H, W, 3) uint8 is a one-frame video (sized by the caller)."""

        model_input_names = ["pixel_values", "image_grid_thw"]

        def __call__(self, images, **kwargs) -> BatchFeature:
            pixels, grids = self.patch_batch(np.asarray(image)[None] for image in images)
            return BatchFeature({"pixel_values": pixels, "image_grid_thw": grids})

    class OmniProcessor(base):  # type: ignore[valid-type, misc]  # a base class chosen at run time
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
