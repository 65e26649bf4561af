"""Encoder-only backends (calm.models.encoders) on tiny random models built from configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm.models import BACKENDS, MODELS, load_extractor
from calm.models.base import ExtractorError, HeadName
from calm.models.encoders import (
    ASTExtractor,
    ClapExtractor,
    Wav2Vec2Family,
    ast_real_columns,
    conv_frames,
    encoder_layers,
)
from tests.helpers.tiny_encoders import save_encoder, tiny_ast, tiny_clap, tiny_wav2vec2_family

BUILDERS = {
    "ast": tiny_ast,
    "wav2vec2": tiny_wav2vec2_family,
    "wav2vec2-group": lambda: tiny_wav2vec2_family(norm="group"),
    "hubert": lambda: tiny_wav2vec2_family("hubert"),
    "wavlm": lambda: tiny_wav2vec2_family("wavlm"),
    "data2vec-audio": lambda: tiny_wav2vec2_family("data2vec-audio"),
    "clap": tiny_clap,
}
CLASSES = {"ast": ASTExtractor, "clap": ClapExtractor}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {name: save_encoder(*build(), root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def extractors(checkpoints):
    return {name: load_extractor(str(d), attn_implementation="eager") for name, d in checkpoints.items()}


def _waves(lengths=(4000, 9000, 16000), seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_dispatch_by_model_type_and_key(name, extractors, checkpoints):
    ex = extractors[name]
    assert isinstance(ex, CLASSES.get(name, Wav2Vec2Family))
    model_type = name.removesuffix("-group").replace("ast", "audio-spectrogram-transformer")
    assert model_type in BACKENDS and ex.key["model_type"] == model_type
    assert ex.key["model"] == str(checkpoints[name]) and ex.key["heads"] == "encoder"
    assert ex.key["prompt"] is None and ex.key["dtype"] == "float32"
    heads_per_layer = [2, 4, 4] if name == "clap" else [4, 4]
    assert ex.head_names == [
        HeadName(layer, h, "encoder") for layer, n in enumerate(heads_per_layer) for h in range(n)
    ]
    assert ex.extract([]).shape == (0, sum(heads_per_layer), 8)
    feats = ex.extract(_waves())
    assert feats.shape == (3, sum(heads_per_layer), 8) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and not np.allclose(feats[0], feats[1])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_padding_never_changes_a_clip(name, extractors):
    """A batch with longer (and equal-length) clips gives each clip its single-clip features."""
    ex = extractors[name]
    waves = _waves((4000, 16000, 4000, 7001))
    batched = ex.extract(waves)
    for wave, row in zip(waves, batched, strict=True):
        np.testing.assert_allclose(row, ex.extract([wave])[0], atol=1e-5)


def _core(ex, layer: int):
    """(attention core with the value projection, its value projection) of one layer."""
    if isinstance(ex, ClapExtractor):
        blocks = [b for stage in ex.model.audio_encoder.layers for b in stage.blocks]
        core = blocks[layer].attention.self
        return core, core.value
    core = encoder_layers(ex.model)[layer].attention
    return core, core.v_proj


def _reference(ex, wave: np.ndarray, layer: int) -> np.ndarray:
    """Layer `layer`'s head outputs of one clip recomputed as attention weights x values, then
    averaged over the clip's real positions: (heads, head_dim)."""
    core, value = _core(ex, layer)
    seen: dict[str, torch.Tensor] = {}

    def grab_input(module, args, kwargs) -> None:
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    def grab_weights(module, args, out) -> None:
        seen["w"] = out[1]

    pre = core.register_forward_pre_hook(grab_input, with_kwargs=True)
    post = core.register_forward_hook(grab_weights)
    try:
        with torch.no_grad():
            if isinstance(ex, ClapExtractor):
                fe = ex.feature_extractor(
                    [wave],
                    sampling_rate=ex.sample_rate,
                    padding="repeatpad",
                    truncation="rand_trunc",  # unfused: one mel (clips under 10 s are never cut)
                    return_tensors="pt",
                )
                ex.model(
                    input_features=fe["input_features"],
                    is_longer=torch.zeros(1, 1, dtype=torch.bool),
                    output_attentions=True,
                )
            elif isinstance(ex, ASTExtractor):
                fe = ex.feature_extractor([wave], sampling_rate=ex.sample_rate, return_tensors="pt")
                ex.model(input_values=fe["input_values"])
            else:
                fe = ex.feature_extractor([wave], sampling_rate=ex.sample_rate, return_tensors="pt")
                ex.model(input_values=fe["input_values"])
    finally:
        pre.remove()
        post.remove()
    h, weights = seen["h"], seen["w"]  # (windows, T, width), (windows, heads, T, T)
    heads = weights.shape[1]
    with torch.no_grad():
        v = value(h).view(h.shape[0], h.shape[1], heads, -1).transpose(1, 2)
    context = (weights @ v).transpose(1, 2)  # (windows, T, heads, head_dim)
    if isinstance(ex, ASTExtractor):
        columns = ast_real_columns(len(wave), 100, 16, 10)
        grid = context[0, 2:].reshape(ex.freq_rows, ex.time_columns, heads, -1)
        return grid[:, :columns].reshape(-1, heads, grid.shape[-1]).mean(0).numpy()
    return context.reshape(-1, heads, context.shape[-1]).mean(0).numpy()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_head_outputs_equal_weights_times_values(name, extractors):
    ex = extractors[name]
    layer = 1
    rows = [i for i, h in enumerate(ex.head_names) if h.layer == layer]
    for wave in _waves((4000, 16000)):
        np.testing.assert_allclose(ex.extract([wave])[0][rows], _reference(ex, wave, layer), atol=1e-5)


def test_ast_real_columns_and_window():
    assert ast_real_columns(4000, 100, 16, 10) == 3  # 23 fbank frames: columns starting at 0, 10, 20
    assert ast_real_columns(16240, 100, 16, 10) == 9  # 100 frames: the whole 9-column grid
    assert ast_real_columns(100, 100, 16, 10) == 1
    assert ast_real_columns(10**6, 1024, 16, 10) == 101
    assert conv_frames(torch.tensor([16000, 19, 20]), (10, 4), (5, 4)).tolist() == [
        799,
        1,
        1,
    ]  # 3199, then 799


def test_wavlm_patched_attention_keeps_the_model_output(checkpoints, extractors):
    from transformers import WavLMModel

    original = WavLMModel.from_pretrained(checkpoints["wavlm"], attn_implementation="eager").eval()
    patched = extractors["wavlm"].model
    fe = extractors["wavlm"].feature_extractor(
        _waves((4000, 9000)),
        sampling_rate=16000,
        padding=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        a = original(**fe).last_hidden_state
        b = patched(**fe).last_hidden_state
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_layers_option_and_refusals(checkpoints):
    ex = load_extractor(str(checkpoints["clap"]), layers=[2])
    assert [h.layer for h in ex.head_names] == [2] * 4
    assert ex.extract(_waves((4000,))).shape == (1, 4, 8)
    with pytest.raises(ExtractorError, match="takes no prompt"):
        load_extractor(str(checkpoints["ast"]), prompt="what is this sound?")
    with pytest.raises(ExtractorError, match="encoder-only"):
        load_extractor(str(checkpoints["hubert"]), heads="decoder")
    with pytest.raises(ExtractorError, match="unknown option"):
        load_extractor(str(checkpoints["ast"]), max_seconds=3)


def test_clap_blocks_with_different_head_dims_are_refused(tmp_path):
    from transformers import ClapConfig, ClapModel

    model, fe = tiny_clap()
    audio = model.config.audio_config.to_dict()
    audio["num_attention_heads"] = [2, 2]  # head dims 8 then 16
    config = ClapConfig(audio_config=audio, text_config=model.config.text_config.to_dict(), projection_dim=8)
    directory = save_encoder(ClapModel(config), fe, tmp_path / "clap")
    with pytest.raises(ExtractorError, match="different head dims"):
        load_extractor(str(directory))
    assert load_extractor(str(directory), layers=[1, 2]).extract(_waves((4000,))).shape == (1, 4, 16)


def test_fused_clap_never_takes_the_random_fusion_branch(tmp_path):
    """A fused CLAP's feature extractor marks a random clip of a batch as longer; the backend does not."""
    from transformers import ClapConfig, ClapModel

    model, fe = tiny_clap()
    audio = {**model.config.audio_config.to_dict(), "enable_fusion": True}
    config = ClapConfig(audio_config=audio, text_config=model.config.text_config.to_dict(), projection_dim=8)
    torch.manual_seed(0)
    ex = load_extractor(str(save_encoder(ClapModel(config), fe, tmp_path / "fused")))
    assert ex.truncation == "fusion"
    waves = _waves((4000, 9000, 16000))
    batched = ex.extract(waves)
    for seed in range(3):
        np.random.seed(seed)  # noqa: NPY002 - the feature extractor draws from the global generator
        np.testing.assert_allclose(ex.extract(waves), batched, atol=1e-6)
    for wave, row in zip(waves, batched, strict=True):
        np.testing.assert_allclose(row, ex.extract([wave])[0], atol=1e-5)


def test_registered_encoder_names_point_at_hub_ids():
    for name in ("ast-audioset", "clap-htsat", "wav2vec2-base", "hubert-base", "wavlm-base-plus"):
        assert "/" in MODELS[name].checkpoint and MODELS[name].loader.startswith("calm.models.encoders:")
