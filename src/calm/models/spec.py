"""What to load and how: the frozen `LoadSpec` that `load_extractor` builds once and hands to a
backend loader, and the check of backend options against what a backend declares.

A backend loader is a function `loader(spec: LoadSpec) -> Extractor` decorated with
`@backend_options(name=default, ...)`: the options it accepts and their defaults. `load_extractor`
checks the user's `**options` against that declaration once (`check_options`) and passes the
completed mapping in `spec.options`; the loader reads `spec.options[name]`, never `**kwargs`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from calm.models.base import ExtractorError, pretrained_kwargs, resolve_dtype

LONG_MODES = ("truncate", "windows")

F = TypeVar("F", bound=Callable[..., Any])


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
