"""Frozen models as per-head feature extractors.

`load_extractor(name)` accepts a registered name (`MODELS`), a hub id or a local directory.
Registered names map to a hub id (or an embedded model) and a backend; unregistered ids are
dispatched on their config's `model_type` (`BACKENDS`), and types without a backend of their own
go to the generic LALM path (`GENERIC_BACKEND`, `calm.models.generic`). Backend modules are imported lazily so
that `import calm.models` stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from calm.models.base import Extractor, ExtractorError, HeadName, resolve_dtype

__all__ = [
    "Extractor",
    "ExtractorError",
    "HeadName",
    "MODELS",
    "BACKENDS",
    "GENERIC_BACKEND",
    "load_extractor",
    "register_model",
]


class ModelEntry(NamedTuple):
    """A registered model name: the checkpoint to load and the backend loader ("module:function")."""

    checkpoint: str | None
    loader: str


MODELS: dict[str, ModelEntry] = {
    "whisper-tiny.en": ModelEntry(None, "calm.models.whisper:load_embedded_whisper"),
    "qwen2-audio": ModelEntry("Qwen/Qwen2-Audio-7B-Instruct", "calm.models.qwen2_audio:load_qwen2_audio"),
    "qwen2.5-omni-7b": ModelEntry("Qwen/Qwen2.5-Omni-7B", "calm.models.qwen2_5_omni:load_qwen2_5_omni"),
    "qwen2.5-omni-3b": ModelEntry("Qwen/Qwen2.5-Omni-3B", "calm.models.qwen2_5_omni:load_qwen2_5_omni"),
}

# config.model_type -> backend loader, for hub ids and local directories that are not registered
BACKENDS: dict[str, str] = {
    "whisper": "calm.models.whisper:load_whisper",
    "qwen2_audio": "calm.models.qwen2_audio:load_qwen2_audio",
    "qwen2_5_omni": "calm.models.qwen2_5_omni:load_qwen2_5_omni",
    "qwen2_5_omni_thinker": "calm.models.qwen2_5_omni:load_qwen2_5_omni",
}

# every other model type: an LALM whose processor has a chat template (calm.models.generic)
GENERIC_BACKEND = "calm.models.generic:load_generic"

DEFAULT_MODEL = "whisper-tiny.en"


def register_model(name: str, checkpoint: str | None, loader: str) -> None:
    """Register a short model name (used by backends defined elsewhere)."""
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
    model: str = DEFAULT_MODEL,
    *,
    heads: str = "all",
    prompt: str | None = None,
    device: str = "cpu",
    dtype=None,
    layers: Sequence[int] | int | None = None,
    attn_implementation: str | None = None,
    **options,
) -> Extractor:
    """Load a frozen model as a per-head feature extractor.

    Args:
        model: a registered name (`whisper-tiny.en`, `qwen2-audio`, ... see `MODELS`), a hub id or
            a local checkpoint directory.
        heads: head source: `all`, `encoder` or `decoder` for Whisper; LALMs have decoder heads
            only (`all` and `decoder` mean the same).
        prompt: text prompt (LALMs: the user text after the audio; Whisper: previous-text context).
        device: torch device.
        dtype: None (float32 on CPU, bfloat16/float16 on GPU), a torch dtype or a name.
        layers: None (all), an int L (the first L layers) or a list of layer indices.
        attn_implementation: passed to `from_pretrained` (`eager`, `sdpa`, ...).
        **options: backend options (e.g. Whisper's `encoder_length`, `min_encoder_seconds`; LALMs'
            `truncate_layers`, default True: with `layers` given, load only the text decoder
            layers up to the last selected one, see `calm.models.lalm.truncated_config`), and
            `long`: `truncate` (default: clips longer than the model's window are cut, with a
            warning) or `windows` (features averaged over consecutive windows,
            `calm.models.windows`).
    """
    long = options.pop("long", "truncate")
    if long not in ("truncate", "windows"):
        raise ExtractorError(f"long={long!r}: use 'truncate' or 'windows'")
    extractor = _load(
        model,
        heads=heads,
        prompt=prompt,
        device=device,
        dtype=dtype,
        layers=layers,
        attn_implementation=attn_implementation,
        **options,
    )
    if long == "windows":
        from calm.models.windows import WindowedExtractor

        return WindowedExtractor(extractor)
    return extractor


def _load(model, *, heads, prompt, device, dtype, layers, attn_implementation, **options) -> Extractor:
    common = dict(
        heads=heads,
        prompt=prompt,
        device=device,
        dtype=resolve_dtype(dtype, device),
        layers=layers,
        attn_implementation=attn_implementation,
        **options,
    )
    if model in MODELS:
        entry = MODELS[model]
        loader = _resolve_loader(entry.loader)
        if entry.checkpoint is None:
            return loader(**common)
        return loader(entry.checkpoint, name=model, **common)
    loader = BACKENDS.get(_model_type(str(model)), GENERIC_BACKEND)
    return _resolve_loader(loader)(str(model), **common)
