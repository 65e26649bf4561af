"""Loading options of the LALM backends: layer truncation, dtype / attention pass-through, and
per-modality padding of the processor call (calm.models.lalm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm.models import load_extractor
from calm.models.base import ExtractorError
from calm.models.hooks import HookError
from calm.models.lalm import padding_kwargs, truncated_config
from tests.helpers.tiny_models import save_pretrained, tiny_qwen2_audio
from tests.helpers.tiny_omni import tiny_qwen2_5_omni

PROMPT = "What is this sound?"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    model, processor = tiny_qwen2_audio(num_layers=4)
    return str(save_pretrained(model, processor, tmp_path_factory.mktemp("q") / "tiny-qwen2-audio"))


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory):
    model, processor = tiny_qwen2_5_omni(num_layers=3)
    return str(save_pretrained(model, processor, tmp_path_factory.mktemp("o") / "tiny-omni-thinker"))


@pytest.fixture(scope="module")
def waves():
    rng = np.random.default_rng(2)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (12000, 5000)]


def _text_layers(extractor) -> int:
    return extractor.model.config.get_text_config().num_hidden_layers


@pytest.mark.parametrize(
    ("layers", "kept", "indices"), [([1], 2, [1]), ([0, -3], 2, [0, 1]), (3, 3, [0, 1, 2])]
)
def test_truncated_model_has_fewer_layers_and_the_same_features(qwen_dir, waves, layers, kept, indices):
    full = load_extractor(qwen_dir, prompt=PROMPT, layers=layers, truncate_layers=False)
    short = load_extractor(qwen_dir, prompt=PROMPT, layers=layers)
    assert _text_layers(full) == len(full.model.model.language_model.layers) == 4
    assert _text_layers(short) == len(short.model.model.language_model.layers) == kept
    assert short.layers == full.layers == indices and short.key == full.key
    np.testing.assert_allclose(short.extract(waves), full.extract(waves), atol=1e-6, rtol=0)


def test_truncation_keeps_everything_when_the_last_layer_is_needed(qwen_dir):
    extractor = load_extractor(qwen_dir, layers=[0, 3])
    assert _text_layers(extractor) == 4 and extractor.layers == [0, 3]


def test_truncated_omni_thinker(omni_dir, waves):
    full = load_extractor(omni_dir, prompt=PROMPT, layers=[0], truncate_layers=False)
    short = load_extractor(omni_dir, prompt=PROMPT, layers=[0])
    assert _text_layers(full) == 3 and _text_layers(short) == 1
    np.testing.assert_allclose(short.extract(waves), full.extract(waves), atol=1e-6, rtol=0)


def test_truncated_config_is_a_copy_with_per_layer_lists_shortened(qwen_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(qwen_dir)
    short, indices = truncated_config(config, [-3])
    assert indices == [1] and short is not config
    assert short.text_config.num_hidden_layers == 2 and len(short.text_config.layer_types) == 2
    assert config.text_config.num_hidden_layers == 4 and len(config.text_config.layer_types) == 4
    assert truncated_config(config, None) == (config, None)
    with pytest.raises(HookError, match="out of range"):
        truncated_config(config, [4])


@pytest.mark.parametrize("which", ["qwen", "omni"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dtype_and_attention_implementation_pass_through(qwen_dir, omni_dir, which, attn):
    directory = qwen_dir if which == "qwen" else omni_dir
    extractor = load_extractor(directory, dtype="bfloat16", attn_implementation=attn, layers=1)
    assert extractor.model.config.get_text_config()._attn_implementation == attn
    assert extractor.dtype == torch.bfloat16 and extractor.key["dtype"] == "bfloat16"
    assert str(extractor.device) == "cpu"


def test_padding_kwargs_flat_by_default():
    kwargs = padding_kwargs({"sampling_rate": 16000}, padding_side="left")
    assert kwargs == {"padding": True, "padding_side": "left", "sampling_rate": 16000}


def test_padding_kwargs_per_modality():
    extra = {"sampling_rate": 16000}
    assert padding_kwargs(extra, padding_side="right", audio_padding=None) == {
        "sampling_rate": 16000,
        "text_kwargs": {"padding": True, "padding_side": "right"},
    }
    assert padding_kwargs(extra, padding_side="right", audio_padding="max_length")["audio_kwargs"] == {
        "padding": "max_length"
    }
    given = {"audio_kwargs": {"padding": "longest"}, "text_kwargs": {"max_length": 99}}
    assert padding_kwargs(given, padding_side="left") == {
        "text_kwargs": {"padding": True, "padding_side": "left", "max_length": 99},
        "audio_kwargs": {"padding": "longest"},
    }
    with pytest.raises(ExtractorError, match="text_kwargs"):
        padding_kwargs({"padding": "longest"}, padding_side="left", audio_padding=None)


def test_zero_shot_refuses_a_truncated_model(qwen_dir, waves):
    from calm.answering.zeroshot import zero_shot

    short = load_extractor(qwen_dir, prompt=PROMPT, layers=[1])
    with pytest.raises(ValueError, match="truncate_layers=False"):
        zero_shot(short, waves, ["dog", "rain"], mode="letters")
    full = load_extractor(qwen_dir, prompt=PROMPT, layers=[1], truncate_layers=False)
    assert len(zero_shot(full, waves, ["dog", "rain"], mode="letters").predictions) == 2
