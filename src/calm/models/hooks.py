"""Capture per-head attention outputs with forward pre-hooks on attention output projections.

A head's feature is its attention output, i.e. the input of the layer's output projection
(`o_proj` / `out_proj`) split into heads. The projections are located through the model's text
decoder (`get_decoder()`), never by matching names across the whole model: audio encoders and
talkers have modules with the same names.

`HeadCapture` registers one pre-hook per projection, keeps only a reduced view of its input (the
last real prompt token, or a masked mean over positions), and stops the forward pass by raising
a private exception once every requested projection has been seen, so layers after the last
needed one, the final norm and the LM head never run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from calm.errors import CalmError

_ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
_OUTPUT_PROJECTION_NAMES = ("o_proj", "out_proj", "dense", "o")
_LAYER_LIST_NAMES = ("layers", "layer", "h", "blocks")


class HookError(CalmError, RuntimeError):
    """The model's structure does not match what the hooks need."""


class AttentionSite(NamedTuple):
    """One attention block to capture: the output projection and how to split its input."""

    layer: int
    projection: nn.Module
    num_heads: int
    head_dim: int
    source: str


def _get_decoder(model: nn.Module) -> nn.Module | None:
    """`model.get_decoder()` where the model has one (transformers models), else None."""
    get = getattr(model, "get_decoder", None)
    return get() if callable(get) else None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The layer list of the model's text decoder, found through `get_decoder()`."""
    found = _get_decoder(model)
    decoder = model if found is None else found
    for _ in range(3):  # get_decoder() may return a wrapper whose own decoder holds the layers
        for name in _LAYER_LIST_NAMES:
            layers = getattr(decoder, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
        inner = _get_decoder(decoder)
        if inner is None or inner is decoder:
            break
        decoder = inner
    raise HookError(
        f"cannot find the decoder layers of {type(model).__name__}: get_decoder() returned "
        f"{type(decoder).__name__} without a non-empty `layers` list"
    )


def attention_module(layer: nn.Module, name: str | None = None) -> nn.Module:
    """The attention block of a decoder layer (`name`, else the usual self-attention names)."""
    for candidate in (name,) if name else _ATTENTION_NAMES:
        module = getattr(layer, candidate, None)
        if isinstance(module, nn.Module):
            return module
    raise HookError(f"{type(layer).__name__} has no attention module named {name or _ATTENTION_NAMES}")


def output_projection(attention: nn.Module) -> nn.Linear:
    """The output projection (`o_proj`, `out_proj`, ...) of an attention block."""
    for name in _OUTPUT_PROJECTION_NAMES:
        module = getattr(attention, name, None)
        if isinstance(module, nn.Linear):
            return module
    raise HookError(
        f"{type(attention).__name__} has no output projection named one of {_OUTPUT_PROJECTION_NAMES}"
    )


def head_geometry(attention: nn.Module, projection: nn.Linear) -> tuple[int, int]:
    """(num_heads, head_dim) of one attention block, read from the block itself.

    head_dim comes from the block (`head_dim`, else its config); the number of heads is the
    projection's input width divided by head_dim, so hidden size != heads x head_dim is fine.
    """
    width = projection.in_features
    head_dim = getattr(attention, "head_dim", None)
    if head_dim is None:
        config = getattr(attention, "config", None)
        head_dim = getattr(config, "head_dim", None)
        heads = getattr(attention, "num_heads", None) or getattr(config, "num_attention_heads", None)
        if head_dim is None and heads:
            head_dim = width // heads
    if not head_dim or width % int(head_dim):
        raise HookError(
            f"cannot split the {width}-wide input of {type(attention).__name__}'s output projection "
            f"into heads (head_dim={head_dim})"
        )
    return width // int(head_dim), int(head_dim)


def select_layers(n_layers: int, layers: Sequence[int] | int | None) -> list[int]:
    """Validated, sorted layer indices. `layers` is None (all), an int L (the first L layers) or
    a list of indices (negative ones count from the end)."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        if not 1 <= layers <= n_layers:
            raise HookError(f"layers={layers} but the model has {n_layers} layers")
        return list(range(layers))
    chosen = sorted({i + n_layers if i < 0 else i for i in layers})
    if not chosen or chosen[0] < 0 or chosen[-1] >= n_layers:
        raise HookError(f"layers={list(layers)} out of range for a model with {n_layers} layers")
    return chosen


def attention_sites(
    layer_list: Sequence[nn.Module] | nn.ModuleList,
    layers: Sequence[int] | int | None = None,
    *,
    attention: str | None = None,
    source: str = "decoder",
) -> list[AttentionSite]:
    """One `AttentionSite` per selected layer of `layer_list`, head geometry read per layer."""
    sites = []
    for index in select_layers(len(layer_list), layers):
        block = attention_module(layer_list[index], attention)
        projection = output_projection(block)
        num_heads, head_dim = head_geometry(block, projection)
        sites.append(AttentionSite(index, projection, num_heads, head_dim, source))
    return sites


def decoder_attention_sites(
    model: nn.Module, layers: Sequence[int] | int | None = None
) -> list[AttentionSite]:
    """Self-attention sites of the text decoder of `model` (an LALM or any causal LM)."""
    return attention_sites(decoder_layers(model), layers, source="decoder")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left-padded rows get the positions of unpadded ones."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask == 1) token of each row; right and left padding both work."""
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise HookError("a sequence in the batch has no real token (all-zero attention mask row)")
    length = mask.shape[1]
    return length - 1 - mask.flip(1).int().argmax(dim=1)


def at_positions(positions: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reducer: row i keeps position positions[i] of a (n, T, width) tensor."""

    def reduce(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != positions.shape[0] or positions.max() >= x.shape[1]:
            raise HookError(
                f"hooked tensor of shape {tuple(x.shape)} does not match the attention mask "
                f"({positions.shape[0]} rows, last position {int(positions.max())})"
            )
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, positions.to(x.device)]

    return reduce


def mean_over_lengths(lengths: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reducer: row i averages the first lengths[i] positions of a (n, T, width) tensor."""

    def reduce(x: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(x.shape[1], device=x.device)
        weights = (steps[None, :] < lengths.to(x.device)[:, None]).to(torch.float32)
        summed = torch.einsum("nt,ntw->nw", weights, x.float())
        return summed / weights.sum(dim=1, keepdim=True)

    return reduce


class _StopForward(Exception):
    """Raised inside a hook once every requested projection has been captured."""


class HeadCapture:
    """Forward pre-hooks that record per-head vectors at the given sites.

    Use as a context manager around one forward pass, or through `run`:

        capture = HeadCapture(sites, at_positions(last_token_positions(mask)))
        features = capture.run(lambda: model(**inputs, use_cache=False))   # (n, K, d)

    K is sum of the sites' head counts, in the order of `sites`. With `stop=True` (default) the
    forward pass is interrupted as soon as the last site has been captured.
    """

    def __init__(
        self,
        sites: Sequence[AttentionSite],
        reduce: Callable[[torch.Tensor], torch.Tensor],
        *,
        stop: bool = True,
    ):
        if not sites:
            raise HookError("no attention sites to capture")
        self.sites = list(sites)
        self.reduce = reduce
        self.stop = stop
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, index: int, site: AttentionSite):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            expected = site.num_heads * site.head_dim
            if x.shape[-1] != expected:
                raise HookError(
                    f"layer {site.layer} ({site.source}): output projection input has width "
                    f"{x.shape[-1]}, expected {site.num_heads} heads x {site.head_dim}"
                )
            reduced = self.reduce(x)
            self._captured[index] = reduced.reshape(reduced.shape[0], site.num_heads, site.head_dim)
            if self.stop and len(self._captured) == len(self.sites):
                raise _StopForward

        return hook

    def __enter__(self) -> HeadCapture:
        self._captured.clear()
        for index, site in enumerate(self.sites):
            self._handles.append(
                site.projection.register_forward_pre_hook(self._hook(index, site), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def features(self) -> torch.Tensor:
        """Captured vectors as float32 (n, K, d), sites in the order given."""
        missing = [f"{s.source} layer {s.layer}" for i, s in enumerate(self.sites) if i not in self._captured]
        if missing:
            raise HookError(f"the forward pass never reached: {', '.join(missing)}")
        dims = {s.head_dim for s in self.sites}
        if len(dims) > 1:
            raise HookError(
                f"selected layers have different head_dim {sorted(dims)}; choose layers with one head_dim"
            )
        return torch.cat([self._captured[i].float() for i in range(len(self.sites))], dim=1)

    def run(self, forward: Callable[[], object]) -> torch.Tensor:
        """Call `forward()` with the hooks in place (stopping early) and return `features()`."""
        with self:
            try:
                forward()
            except _StopForward:
                pass
        return self.features()
