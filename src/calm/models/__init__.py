"""Frozen models as per-head feature extractors.

`load_extractor(name)` accepts a registered name (`MODELS`), a hub id or a local directory.
Registered names map to a hub id (or an embedded model) and a backend; unregistered ids are
dispatched on their config's `model_type` (`BACKENDS`), and types without a backend of their own
go to the generic LALM path (`GENERIC_BACKEND`, `calm.models.generic`). Backend modules are imported
lazily so that `import calm.models` stays light.

`load_extractor` builds one frozen `LoadSpec` (`calm.models.spec`) and calls the backend loader
with it: `loader(spec) -> Extractor`. A loader declares the options it accepts with
`@backend_options(name=default, ...)`; unknown options are refused here, once, naming the
accepted ones.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from calm.models.base import Extractor, ExtractorError, HeadName, TorchExtractor
from calm.models.encoders import ENCODER_BACKENDS, ENCODER_MODELS
from calm.models.spec import LoadSpec, backend_options, check_options, declared_options

__all__ = [
    "Extractor",
    "ExtractorError",
    "HeadName",
    "LoadSpec",
    "TorchExtractor",
    "backend_options",
    "MODELS",
    "BACKENDS",
    "GENERIC_BACKEND",
    "load_extractor",
    "register_model",
]


class ModelEntry(NamedTuple):
    """A registered model name: the checkpoint to load (None: the loader knows it) and the backend
    loader ("module:function", called as `loader(spec: LoadSpec)`)."""

    checkpoint: str | None
    loader: str


MODELS: dict[str, ModelEntry] = {
    "whisper-tiny.en": ModelEntry(None, "calm.models.whisper:load_embedded_whisper"),
    "qwen2-audio": ModelEntry("Qwen/Qwen2-Audio-7B-Instruct", "calm.models.qwen2_audio:load_qwen2_audio"),
    "qwen2.5-omni-7b": ModelEntry("Qwen/Qwen2.5-Omni-7B", "calm.models.qwen2_5_omni:load_qwen2_5_omni"),
    "qwen2.5-omni-3b": ModelEntry("Qwen/Qwen2.5-Omni-3B", "calm.models.qwen2_5_omni:load_qwen2_5_omni"),
    # encoder-only models (calm.models.encoders)
    **{name: ModelEntry(*entry) for name, entry in ENCODER_MODELS.items()},
}

# config.model_type -> backend loader, for hub ids and local directories that are not registered
BACKENDS: dict[str, str] = {
    "whisper": "calm.models.whisper:load_whisper",
    "qwen2_audio": "calm.models.qwen2_audio:load_qwen2_audio",
    "qwen2_5_omni": "calm.models.qwen2_5_omni:load_qwen2_5_omni",
    "qwen2_5_omni_thinker": "calm.models.qwen2_5_omni:load_qwen2_5_omni",
    # AST, wav2vec2, HuBERT, WavLM, data2vec-audio, CLAP (audio tower)
    **ENCODER_BACKENDS,
}

# every other model type: an LALM whose processor has a chat template (calm.models.generic)
GENERIC_BACKEND = "calm.models.generic:load_generic"

DEFAULT_MODEL = "whisper-tiny.en"


def register_model(name: str, checkpoint: str | None, loader: str) -> None:
    """Register a short model name (used by backends defined elsewhere). The loader ("module:function")
    is called as `loader(spec: LoadSpec)`; it declares its options with `backend_options`."""
    MODELS[name] = ModelEntry(checkpoint, loader)


def _resolve_loader(spec: str):
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def _model_type(model: str) -> str:
    """`model_type` of a hub id or local directory's config (no weights are read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError) as err:
        where = "local directory" if Path(model).exists() else "hub id"
        raise ExtractorError(f"cannot read the config of {where} {model!r}: {err}") from err


def load_extractor(
    model: str | LoadSpec = DEFAULT_MODEL,
    *,
    heads: str = "all",
    prompt: str | None = None,
    device: str = "cpu",
    dtype=None,
    layers: Sequence[int] | int | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    long: str = "truncate",
    **options,
) -> Extractor:
    """Load a frozen model as a per-head feature extractor.

    Args:
        model: a registered name (`whisper-tiny.en`, `qwen2-audio`, ... see `MODELS`), a hub id or
            a local checkpoint directory; or a whole `LoadSpec` (then no other argument is given:
            the spec holds them).
        heads: head source: `all`, `encoder` or `decoder` for Whisper; LALMs have decoder heads
            only (`all` and `decoder` mean the same).
        prompt: text prompt (LALMs: the user text after the audio; Whisper: previous-text context).
        device: torch device.
        dtype: None or "auto" (CPU: bfloat16 where the CPU has native bf16 matrix units, else float32;
            GPU: bfloat16, else float16), a torch dtype or a name.
        layers: None (all), an int L (the first L layers) or a list of layer indices.
        attn_implementation: passed to `from_pretrained` (`eager`, `sdpa`, ...).
        revision: hub revision to load (None: the default branch).
        long: `truncate` (default: clips longer than the model's window are cut, with a warning)
            or `windows` (features averaged over consecutive windows, `calm.models.windows`).
        **options: backend options, checked against the backend's declaration (e.g. Whisper's
            `encoder_length`, `min_encoder_seconds`; LALMs' `padding_side` and `truncate_layers`,
            default True: with `layers` given, load only the text decoder layers up to the last
            selected one, see `calm.models.lalm.truncated_config`; Qwen2.5-Omni's `video`, `fps`,
            `frame_size`, `max_frames`).
    """
    if isinstance(model, LoadSpec):
        return load_extractor(model.label, **model.load_kwargs())
    loader, spec = resolve(
        model,
        heads=heads,
        prompt=prompt,
        device=device,
        dtype=dtype,
        layers=layers,
        attn_implementation=attn_implementation,
        revision=revision,
        long=long,
    )
    backend = f"{model} ({loader.__module__}:{loader.__name__})"
    spec = dataclasses.replace(spec, options=check_options(options, declared_options(loader), backend))
    extractor = loader(spec)
    if spec.long == "windows":
        from calm.models.windows import WindowedExtractor

        return WindowedExtractor(extractor)
    return extractor


def resolve(model: str, **fields):
    """(backend loader, `LoadSpec` without options) for a registered name, hub id or directory."""
    if model in MODELS:
        entry = MODELS[model]
        spec = LoadSpec(entry.checkpoint or model, name=model, **fields)
        return _resolve_loader(entry.loader), spec
    spec = LoadSpec(str(model), **fields)
    return _resolve_loader(BACKENDS.get(_model_type(spec.model_id), GENERIC_BACKEND)), spec
