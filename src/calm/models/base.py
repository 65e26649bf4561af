"""The extractor contract: a frozen model plus a prompt, turned into per-head feature vectors.

An `Extractor` reads audio clips and returns, for each clip, one vector per attention head:
an array of shape (n, K, d) with K = len(head_names) in layer-major order (see
docs/architecture.md). Backends subclass it and implement `extract`; those that run a torch
module subclass `TorchExtractor` (its device and dtype, and moving inputs onto them).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from calm.errors import CalmError


class HeadName(NamedTuple):
    """One attention head: its layer, its index inside the layer, and where it lives.

    `source` is `decoder` for the text decoder of an audio-language model; Whisper uses
    `encoder`, `decoder_self` and `decoder_cross`.
    """

    layer: int
    head: int
    source: str


class ExtractorError(CalmError, ValueError):
    """A model or an option that the extractor cannot work with."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: x86 with AMX-BF16 or AVX512-BF16,
    or Arm with the BF16 extension (BFMMLA), as torch's cpuinfo reports them, and oneDNN able to use
    them (``torch.ops.mkldnn._is_mkldnn_bf16_supported``). Elsewhere bf16 is emulated and slower
    than float32. ``CALM_CPU_BF16=0`` / ``1`` overrides the detection."""
    forced = os.environ.get("CALM_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        caps = torch.cpu.get_capabilities()
        native = bool(caps.get("amx_bf16") or caps.get("avx512_bf16") or caps.get("bf16"))
        return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without cpuinfo or oneDNN
        return False


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The `auto` dtype: on CPU bfloat16 where the CPU has native bf16 matrix units
    (:func:`cpu_has_native_bf16`), float32 elsewhere; on CUDA bfloat16 when the card supports it,
    else float16."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """Parse `dtype` ("float32", "bf16", torch.float16, None = the device default)."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    try:
        return aliases[str(dtype).lower()]
    except KeyError:
        raise ExtractorError(f"unknown dtype {dtype!r}; use one of {sorted(aliases)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pretrained_kwargs(
    dtype: torch.dtype, attn_implementation: str | None = None, revision: str | None = None
) -> dict[str, Any]:
    """Keyword arguments of a model's `from_pretrained`: `dtype`, and `attn_implementation` and the
    hub `revision` when given."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if revision:
        kwargs["revision"] = revision
    return kwargs


def model_revision(model) -> str | None:
    """The hub commit of a loaded checkpoint, or None for local directories."""
    return getattr(model.config, "_commit_hash", None)


@runtime_checkable
class ClipSource(Protocol):
    """What the feature store needs of an extractor to read clips and label their rows, without its
    model (a Ray driver holds only this): the features' identity `key`, `head_names`, `model_id`,
    `load_input` (thread-safe; the store calls it from worker threads) and the `sample_rate` of
    the waveforms it gives (the store checks their length)."""

    model_id: str
    head_names: list[HeadName]
    sample_rate: int

    @property
    def key(self) -> dict[str, Any]:
        """JSON-serialisable identity of the features (equal keys: equal features)."""
        ...

    def load_input(self, path: Any) -> Any:
        """Read one clip for `extract`."""
        ...


@runtime_checkable
class FeatureExtractor(ClipSource, Protocol):
    """What the store, the classifiers' front ends and the evaluation need of an extractor: the
    structural type of `Extractor` (any object with these members works, e.g. a test double).
    Attributes as documented on `Extractor`."""

    max_seconds: float | None

    def extract(self, inputs: Sequence[Any]) -> np.ndarray:
        """Features of a batch of loaded inputs: float32 array (n, K, d)."""
        ...


class Extractor(ABC):
    """A frozen model as a per-head feature extractor.

    Attributes:
        model_id: hub id, local directory or registered name of the model.
        sample_rate: the rate (Hz) `load_input` resamples audio to.
        max_seconds: clips longer than this are truncated by `load_input` (None: no limit).
        head_names: one `HeadName` per row of the K axis of `extract`'s output.
    """

    model_id: str
    sample_rate: int
    max_seconds: float | None
    head_names: list[HeadName]

    @property
    @abstractmethod
    def key(self) -> dict[str, Any]:
        """JSON-serialisable identity of the features: model id and revision, prompt, heads, dtype,
        options. Two extractors with equal keys produce the same features."""

    def load_input(self, path) -> Any:
        """Read one clip for `extract` (thread-safe; the store calls it from worker threads)."""
        from calm.audio import load_audio  # lazy: keeps model code importable on its own

        return load_audio(path, self.sample_rate, max_seconds=self.max_seconds)

    @abstractmethod
    def extract(self, inputs: Sequence[Any]) -> np.ndarray:
        """Features of a batch of loaded inputs: float32 array (n, K, d)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, heads={len(self.head_names)})"


class TorchExtractor(Extractor):
    """An extractor around a frozen torch module `model`: its device and dtype, and inputs moved
    onto them. Whisper, the LALMs (and any encoder-only backend) share this."""

    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to_model(self, batch):
        """`batch` (a tensor, or a BatchFeature / dict of them) on the model's device, floating
        tensors in the model's dtype; integer tensors (ids, masks) keep theirs."""
        if torch.is_tensor(batch):
            batch = batch.to(self.device)
            return batch.to(self.dtype) if batch.is_floating_point() else batch
        batch = (
            batch.to(self.device)
            if hasattr(batch, "to")
            else {k: _to(v, self.device) for k, v in batch.items()}
        )
        for name, value in batch.items():
            if torch.is_tensor(value) and value.is_floating_point():
                batch[name] = value.to(self.dtype)
        return batch


def _to(value, device: torch.device):
    return value.to(device) if torch.is_tensor(value) else value
