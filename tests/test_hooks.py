"""Locating attention output projections and capturing per-head vectors (calm.models.hooks)."""

from __future__ import annotations

import pytest
import torch

from calm.models.hooks import (
    HeadCapture,
    HookError,
    at_positions,
    attention_sites,
    decoder_attention_sites,
    decoder_layers,
    last_token_positions,
    mean_over_lengths,
    select_layers,
)
from tests.helpers.tiny_models import tiny_qwen2_audio


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_audio()


def test_last_token_positions_right_left_and_no_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_positions(mask).tolist() == [2, 4, 4, 1]


def test_last_token_positions_rejects_an_empty_row():
    with pytest.raises(HookError, match="no real token"):
        last_token_positions(torch.tensor([[1, 1], [0, 0]]))


def test_select_layers():
    assert select_layers(4, None) == [0, 1, 2, 3]
    assert select_layers(4, 2) == [0, 1]
    assert select_layers(4, [3, -4, 3]) == [0, 3]
    for bad in (0, 5, [4], [-5], []):
        with pytest.raises(HookError):
            select_layers(4, bad)


def test_decoder_sites_are_the_text_decoder_not_the_audio_tower(tiny):
    model, _ = tiny
    sites = decoder_attention_sites(model)
    text_layers = model.model.language_model.layers
    assert decoder_layers(model) is text_layers
    assert [s.projection for s in sites] == [layer.self_attn.o_proj for layer in text_layers]
    audio_modules = {id(m) for m in model.model.audio_tower.modules()}
    assert not any(id(s.projection) in audio_modules for s in sites)


def test_head_dim_is_read_per_layer_not_derived_from_hidden_size(tiny):
    model, _ = tiny
    config = model.config.text_config
    assert config.hidden_size != config.num_attention_heads * config.head_dim  # 32 vs 4 x 12
    sites = decoder_attention_sites(model, layers=[1])
    assert [(s.layer, s.num_heads, s.head_dim) for s in sites] == [(1, 4, 12)]


def test_mean_over_lengths_averages_only_the_real_positions():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    out = mean_over_lengths(torch.tensor([1, 3]))(x)
    torch.testing.assert_close(out, torch.stack([x[0, :1].mean(0), x[1, :3].mean(0)]))


class _Toy(torch.nn.Module):
    """Three attention-like layers (o_proj on a 6-wide input = 2 heads x 3) plus a head."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for _ in range(3):
            layer = torch.nn.Module()
            layer.self_attn = torch.nn.Module()
            layer.self_attn.head_dim = 3
            layer.self_attn.o_proj = torch.nn.Linear(6, 6)
            self.layers.append(layer)
        self.head = torch.nn.Linear(6, 2)
        self.calls = []

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            self.calls.append(i)
            x = x + layer.self_attn.o_proj(torch.tanh(x))
        self.calls.append("head")
        return self.head(x)


def test_capture_values_order_and_early_stop():
    torch.manual_seed(0)
    toy = _Toy()
    x = torch.randn(2, 5, 6)
    sites = attention_sites(toy.layers, [0, 1])
    positions = torch.tensor([4, 2])

    # reference: inputs of each o_proj, recorded without stopping
    seen = []
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        for layer in toy.layers
    ]
    toy(x)
    for handle in handles:
        handle.remove()

    toy.calls.clear()
    features = HeadCapture(sites, at_positions(positions)).run(lambda: toy(x))
    assert toy.calls == [0, 1]  # stopped inside layer 1: layer 2 and the head never ran
    assert features.shape == (2, 4, 3)
    for k, layer in enumerate([0, 1]):
        expected = seen[layer][torch.arange(2), positions].reshape(2, 2, 3)
        torch.testing.assert_close(features[:, 2 * k : 2 * k + 2], expected)

    toy.calls.clear()
    full = HeadCapture(sites, at_positions(positions), stop=False).run(lambda: toy(x))
    assert toy.calls == [0, 1, 2, "head"]
    torch.testing.assert_close(full, features)


def test_capture_reports_sites_the_forward_never_reached():
    toy = _Toy()
    capture = HeadCapture(attention_sites(toy.layers, [2]), at_positions(torch.tensor([0])))
    with pytest.raises(HookError, match="never reached"):
        capture.run(lambda: None)


def test_capture_checks_the_head_split():
    toy = _Toy()
    sites = attention_sites(toy.layers, [0])
    wrong = [sites[0]._replace(num_heads=3)]
    with pytest.raises(HookError, match="expected 3 heads x 3"):
        HeadCapture(wrong, at_positions(torch.tensor([0]))).run(lambda: toy(torch.randn(1, 2, 6)))


def test_hooks_are_removed_after_the_run():
    toy = _Toy()
    HeadCapture(attention_sites(toy.layers), at_positions(torch.tensor([0]))).run(
        lambda: toy(torch.randn(1, 2, 6))
    )
    assert all(not layer.self_attn.o_proj._forward_pre_hooks for layer in toy.layers)
