"""What to load and how: `LoadSpec`, the one description of a model and its options, and the checks
that go with it (backend options against a backend's declaration; an extractor against the key a
classifier or store was made with).

`LoadSpec` is what `load_extractor` builds and hands to a backend loader, what `EvalConfig.model`
and the Ray actors load (`load_extractor(spec)`), and what a classifier file records: `to_metadata()`
/ `LoadSpec.from_metadata(meta)` write and read the metadata fields (`model`, `revision`, `prompt`,
`heads`, `layers`, `dtype`, `device`, `attn_implementation`, `long`, `options`; files written before
some of them existed still load), `LoadSpec.from_key(key)` reads a store key's model part.
`check_key(stored, extractor, model=)` is the one comparison of an extractor with a stored key:
a difference is a `ModelMismatchError` saying how to refit.

A backend loader is a function `loader(spec: LoadSpec) -> Extractor` decorated with
`@backend_options(name=default, ...)`: the options it accepts and their defaults. `load_extractor`
checks the user's `**options` against that declaration once (`check_options`) and passes the
completed mapping in `spec.options`; the loader reads `spec.options[name]`, never `**kwargs`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from calm.errors import CalmError
from calm.models.base import ExtractorError, dtype_name, pretrained_kwargs, resolve_dtype

LONG_MODES = ("truncate", "windows")

F = TypeVar("F", bound=Callable[..., Any])
#: the metadata fields of a classifier file that describe its model (`LoadSpec.to_metadata`)
METADATA_FIELDS = (
    "model",
    "revision",
    "prompt",
    "heads",
    "layers",
    "dtype",
    "device",
    "attn_implementation",
    "long",
    "options",
)


class ModelMismatchError(CalmError, ValueError):
    """The model to load is not the one a classifier was fitted on (or none is named)."""


@dataclass(frozen=True)
class LoadSpec:
    """Everything a backend needs to load one model as an extractor.

    Attributes:
        model_id: what to load: a hub id or a local checkpoint directory (for a registered model
            without a checkpoint, e.g. the embedded Whisper, its registered name).
        name: the registered name the features are labelled with (`Extractor.model_id`), or
            None to label them with `model_id`.
        revision: hub revision to load (None: the default branch; the loaded commit is read
            back from the model).
        heads: head source (`all`, `encoder`, `decoder`; which apply depends on the backend).
        prompt: text prompt (None: the backend's default).
        device: torch device.
        dtype: the resolved torch dtype (None / "auto" / a name is resolved against `device`).
        layers: None (all), an int L (the first L layers) or a tuple of layer indices.
        attn_implementation: passed to `from_pretrained` (`eager`, `sdpa`, ...).
        long: `truncate` or `windows` (see `calm.models.windows`).
        options: backend options, checked and completed with the backend's defaults.
    """

    model_id: str
    name: str | None = None
    revision: str | None = None
    heads: str = "all"
    prompt: str | None = None
    device: str = "cpu"
    dtype: Any = None
    layers: Sequence[int] | int | None = None
    attn_implementation: str | None = None
    long: str = "truncate"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.long not in LONG_MODES:
            raise ExtractorError(f"long={self.long!r}: use 'truncate' or 'windows'")
        object.__setattr__(self, "model_id", str(self.model_id))
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        if self.layers is not None and not isinstance(self.layers, int):
            object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "options", dict(self.options))

    @property
    def label(self) -> str:
        """The model id the features are labelled with: `name`, else `model_id`."""
        return self.name or self.model_id

    def hub_kwargs(self) -> dict[str, Any]:
        """`revision=` for the `from_pretrained` of configs, tokenizers and processors, when given."""
        return {"revision": self.revision} if self.revision else {}

    def pretrained_kwargs(self, *, revision: bool = True) -> dict[str, Any]:
        """Keyword arguments of a model's `from_pretrained` (dtype, attention, revision)."""
        return pretrained_kwargs(self.dtype, self.attn_implementation, self.revision if revision else None)

    def layer_list(self) -> list[int] | int | None:
        """`layers` as the extractors take it (a list of indices, an int or None)."""
        return list(self.layers) if isinstance(self.layers, Sequence) else self.layers

    # -- the description as arguments, metadata and text -------------------------------------------

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `calm.load_extractor(spec.label, **kwargs)` (options spread)."""
        return dict(
            heads=self.heads,
            prompt=self.prompt,
            device=self.device,
            dtype=self.dtype,
            layers=self.layer_list(),
            attn_implementation=self.attn_implementation,
            revision=self.revision,
            long=self.long,
            **self.options,
        )

    def to_metadata(self) -> dict[str, Any]:
        """The model's fields of a classifier file's metadata (JSON-ready; `from_metadata` reads them)."""
        return {
            "model": self.label,
            "revision": self.revision,
            "prompt": self.prompt,
            "heads": self.heads,
            "layers": self.layer_list(),
            "dtype": dtype_name(self.dtype),
            "device": self.device,
            "attn_implementation": self.attn_implementation,
            "long": self.long,
            "options": json.loads(json.dumps(self.options, default=str)),
        }

    @classmethod
    def from_options(cls, model: str, options: Mapping[str, Any] | None = None, **fields: Any) -> LoadSpec:
        """A spec from `load_extractor`-style keyword arguments: `options` (e.g. an
        `AudioClassifier`'s `model_options` or `-o KEY=VALUE` pairs) may mix spec fields (`prompt`,
        `heads`, `layers`, `dtype`, `long`, ...) and backend options; `fields` win over both."""
        merged = {**(options or {}), **fields}
        backend = {k: v for k, v in merged.items() if k not in _FIELD_NAMES}
        return cls(str(model), options=backend, **{k: v for k, v in merged.items() if k in _FIELD_NAMES})

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, Any], *, device: str = "cpu", model: str | None = None
    ) -> LoadSpec:
        """The model a classifier file names, loaded on `device`; `model` replaces the model only.

        Reads every layout written so far: `calm fit` / `AudioClassifier.save` files before `long`,
        `dtype`, `device` and `attn_implementation` were recorded (`long` then comes from the stored
        key) and `AudioClassifier` files carrying `model_options`. The stored dtype is kept when
        `device` is of the kind it was fitted on (cpu, cuda, ...), else the device's default is used.
        """
        named = metadata.get("model")
        if not (model or named):
            raise ModelMismatchError(
                "the classifier's metadata names no model: fit it with `calm fit` or "
                "`calm.AudioClassifier`, or give the model with --model"
            )
        key = _extractor_key(metadata)
        fields: dict[str, Any] = {
            "heads": metadata.get("heads") or "all",
            "prompt": metadata.get("prompt"),
            "layers": metadata.get("layers"),
            "revision": metadata.get("revision"),
            "attn_implementation": metadata.get("attn_implementation"),
            "long": metadata.get("long") or key.get("long") or "truncate",
            "dtype": metadata.get("dtype"),
            **(metadata.get("model_options") or {}),  # older AudioClassifier files
        }
        fitted_on = metadata.get("device")
        if fitted_on is not None and torch.device(fitted_on).type != torch.device(device).type:
            fields["dtype"] = None  # another kind of device: its default dtype
        if model and model != named:
            fields["revision"] = None  # an override names its own weights
        fields["device"] = device
        return cls.from_options(str(model or named), {**(metadata.get("options") or {}), **fields})

    @classmethod
    def from_key(cls, key: Mapping[str, Any], *, device: str = "cpu") -> LoadSpec:
        """The model a store key's extractor part describes (`{"extractor": ...}` or the part itself);
        its `revision` only labels the weights (e.g. `sha256:...`), so it is checked, not loaded."""
        ext = dict(key.get("extractor", key))
        return cls(
            str(ext.get("model") or ext.get("model_id")),
            heads=ext.get("heads") or "all",
            prompt=ext.get("prompt"),
            layers=ext.get("layers"),
            dtype=ext.get("dtype"),
            device=device,
            long=ext.get("long") or "truncate",
            options=ext.get("options") or {},
        )

    def describe(self, source: str = "metadata") -> str:
        """One line for the user: the model, where its name came from, the device and the options."""
        where = {"metadata": "named by the classifier", "override": "given with --model"}.get(source, source)
        shown = {
            k: v
            for k, v in self.to_metadata().items()
            if k not in ("model", "device") and v not in (None, {}, "all", "truncate")
        }
        return f"model {self.label} ({where}) on {self.device}" + (f", {json.dumps(shown)}" if shown else "")


_FIELD_NAMES = {f.name for f in dataclasses.fields(LoadSpec)} - {"model_id", "name", "options"}


def _extractor_key(metadata: Mapping[str, Any]) -> dict[str, Any]:
    stored = metadata.get("extraction_key") or {}
    return dict(stored.get("extractor", stored)) if isinstance(stored, Mapping) else {}


def check_key(
    stored: Mapping[str, Any] | None, extractor_key: Mapping[str, Any], *, model: str, override: bool = False
) -> None:
    """Refuse an extractor whose key differs from the `stored` one (the compute dtype aside).

    `stored`: a classifier's metadata (its `extraction_key`), a store key or an extractor key; None
    or empty: nothing to check. An `override` (`--model` / `model=`) may name the same weights
    differently (a local copy of a hub model): the model name is then not compared when both keys
    carry the same non-empty revision. Raises `ModelMismatchError` saying how to refit.
    """
    if not stored:
        return
    stored = _extractor_key(stored) if "extraction_key" in stored or "extractor" in stored else dict(stored)
    if not stored:
        return
    stored = json.loads(json.dumps(stored, default=str))
    now = json.loads(json.dumps(dict(extractor_key), default=str))
    same_weights = override and stored.get("revision") and stored.get("revision") == now.get("revision")
    ignore = {"dtype"} | ({"model"} if same_weights else set())
    diff = sorted(k for k in set(stored) | set(now) if k not in ignore and stored.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{k}: fitted on {stored.get(k)!r}, now {now.get(k)!r}" for k in diff)
        raise ModelMismatchError(
            f"model {model} gives different features from the ones the classifier was fitted on "
            f"({shown}). Refit on this model's features: `calm extract --model {model} "
            f"--data KIND:ROOT --out STORE` (same --prompt/--heads/--layers/-o options), then "
            f"`calm fit STORE --out MODEL.safetensors`, or `AudioClassifier(...).fit` again"
            + (
                "; or drop --model to use the model it was fitted on."
                if override
                else " (the model changed since the classifier was fitted, e.g. a new hub revision)."
            )
        )


def backend_options(**defaults: Any) -> Callable[[F], F]:
    """Declare the options a backend loader accepts, with their defaults."""

    def declare(loader: F) -> F:
        loader.options = dict(defaults)  # type: ignore[attr-defined]
        return loader

    return declare


def declared_options(loader: Callable[..., Any]) -> dict[str, Any]:
    """The options `loader` declared with `backend_options` (none when it declared nothing)."""
    return dict(getattr(loader, "options", {}))


def check_options(options: Mapping[str, Any], accepted: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """`options` completed with the `accepted` defaults; an unknown option is an ExtractorError
    naming it and the accepted ones."""
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        known = ", ".join(sorted(accepted)) or "none"
        raise ExtractorError(f"unknown option(s) {unknown} for {backend}; it accepts: {known}")
    return {**accepted, **options}
