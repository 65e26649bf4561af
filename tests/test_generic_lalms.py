"""The generic LALM path (calm.models.generic) on tiny random Audio Flamingo 3 and GLM-ASR models,
saved to a local directory and loaded by `load_extractor` like any unregistered checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import save_pretrained, tiny_audio_flamingo3, tiny_glmasr

from calm.models import BACKENDS, load_extractor
from calm.models.base import ExtractorError, HeadName
from calm.models.generic import GenericLALMExtractor

PROMPT = "Which sound is this? A. dog B. rain"
BUILDERS = {"audioflamingo3": tiny_audio_flamingo3, "glmasr": tiny_glmasr}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def loaded(request, tmp_path_factory):
    model_type = request.param
    model, processor = BUILDERS[model_type]()
    directory = save_pretrained(model, processor, tmp_path_factory.mktemp(model_type) / "ckpt")
    return model_type, load_extractor(str(directory), prompt=PROMPT, attn_implementation="eager")


@pytest.fixture(scope="module")
def waves():
    rng = np.random.default_rng(1)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 6000, 27000)]


def test_unregistered_types_go_to_the_generic_path(loaded):
    model_type, extractor = loaded
    assert model_type not in BACKENDS
    assert type(extractor) is GenericLALMExtractor
    assert extractor.model.config.model_type == model_type
    assert extractor.model.config.get_text_config()._attn_implementation == "eager"
    assert extractor.head_names[:2] == [HeadName(0, 0, "decoder"), HeadName(0, 1, "decoder")]
    assert extractor.key["layers"] == [0, 1, 2] and extractor.key["prompt"] == PROMPT


def test_captured_sites_are_in_the_text_decoder(loaded):
    _, extractor = loaded
    decoder = {id(m) for m in extractor.model.get_decoder().modules()}
    audio = {id(m) for name, m in extractor.model.named_modules() if "audio" in name}
    assert audio  # the audio encoder and projector
    assert len(extractor.sites) == 3
    for site in extractor.sites:
        assert id(site.projection) in decoder and id(site.projection) not in audio
        assert (site.num_heads, site.head_dim) == (4, 12)


def test_prompt_follows_the_audio_and_audio_is_padded_by_the_processor(loaded, waves):
    model_type, extractor = loaded
    text = extractor.chat_text()
    assert text.endswith(PROMPT + "<|im_end|>\n<|im_start|>assistant\n")
    inputs = extractor.build_inputs(waves)
    assert inputs["input_features"].shape[-1] == 3000  # the processor's own 30 s windows
    lengths = inputs["attention_mask"].sum(1)
    assert lengths[0] > lengths[1]  # more audio, more audio tokens; text padded to the longest
    assert (inputs["attention_mask"][:, 0] == 1).all()  # right padding


def test_features_shape_and_audio_dependence(loaded, waves):
    _, extractor = loaded
    features = extractor.extract(waves)
    assert features.shape == (3, 12, 12) and features.dtype == np.float32
    assert np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 1e-4


def test_batched_equals_single(loaded, waves):
    _, extractor = loaded
    batched = extractor.extract(waves)
    single = np.concatenate([extractor.extract([w]) for w in waves])
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)


def test_left_and_right_padding_agree(loaded, waves):
    _, extractor = loaded
    right = extractor.forward_features(extractor.build_inputs(waves, padding_side="right"))
    left_inputs = extractor.build_inputs(waves, padding_side="left")
    assert (left_inputs["attention_mask"][:, 0] == 0).any()
    np.testing.assert_allclose(extractor.forward_features(left_inputs), right, atol=1e-5, rtol=0)


def test_a_processor_without_chat_template_is_refused(tmp_path):
    model, processor = tiny_glmasr(num_layers=1)
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    directory = save_pretrained(model, processor, tmp_path / "no-template")
    with pytest.raises(ExtractorError, match="no chat template"):
        load_extractor(str(directory))
