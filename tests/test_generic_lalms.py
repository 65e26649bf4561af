"""The generic LALM path (calm.models.generic) on tiny random Audio Flamingo 3, GLM-ASR and
Qwen3-Omni-MoE thinker models, saved to a local directory and loaded by `load_extractor` like any
unregistered checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from calm.models import BACKENDS, load_extractor
from calm.models.base import ExtractorError, HeadName
from calm.models.generic import GenericLALMExtractor
from tests.helpers.tiny_models import save_pretrained, tiny_audio_flamingo3, tiny_glmasr
from tests.helpers.tiny_omni import save_like_hub_qwen3_omni, tiny_qwen3_omni_thinker

PROMPT = "Which sound is this? A. dog B. rain"
BUILDERS = {
    "audioflamingo3": tiny_audio_flamingo3,
    "glmasr": tiny_glmasr,
    "qwen3_omni_moe_thinker": tiny_qwen3_omni_thinker,
}
# mel frames of the audio batch: Whisper-style encoders get the processor's 30 s windows,
# Qwen3-Omni's processor pads to the longest clip (27000 samples at hop 160: 168 frames)
AUDIO_FRAMES = {"audioflamingo3": 3000, "glmasr": 3000, "qwen3_omni_moe_thinker": 168}


def _save(model_type, model, processor, directory):
    # Qwen3-Omni: the hub's processor classes, so loading falls back to the torchvision-free build
    save = save_like_hub_qwen3_omni if model_type.startswith("qwen3_omni") else save_pretrained
    return save(model, processor, directory)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def loaded(request, tmp_path_factory):
    model_type = request.param
    model, processor = BUILDERS[model_type]()
    directory = _save(model_type, model, processor, tmp_path_factory.mktemp(model_type) / "ckpt")
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
    vision = {id(m) for name, m in extractor.model.named_modules() if "visual" in name or "vision" in name}
    assert audio  # the audio encoder and projector
    assert len(extractor.sites) == 3
    for site in extractor.sites:
        assert id(site.projection) in decoder and id(site.projection) not in audio | vision
        assert (site.num_heads, site.head_dim) == (4, 12)


def test_prompt_follows_the_audio_and_audio_is_padded_by_the_processor(loaded, waves):
    model_type, extractor = loaded
    text = extractor.chat_text()
    assert text.endswith(PROMPT + "<|im_end|>\n<|im_start|>assistant\n")
    inputs = extractor.build_inputs(waves)
    assert inputs["input_features"].shape[-1] == AUDIO_FRAMES[model_type]  # the processor's own padding
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


@pytest.mark.parametrize("loaded", ["qwen3_omni_moe_thinker"], indirect=True)
def test_a_full_qwen3_omni_checkpoint_loads_only_the_thinker(loaded, waves, tmp_path):
    """A full Qwen3-Omni checkpoint (config `qwen3_omni_moe`, weights `thinker.*`) gives the same
    thinker as the thinker-only one; the processor is built without torchvision."""
    from transformers.models.qwen3_omni_moe import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    _, thinker_extractor = loaded
    thinker, processor = tiny_qwen3_omni_thinker()
    full = Qwen3OmniMoeForConditionalGeneration(
        Qwen3OmniMoeConfig(thinker_config=thinker.config.to_dict(), enable_audio_output=False)
    )
    full.thinker.load_state_dict(thinker.state_dict())
    directory = save_like_hub_qwen3_omni(full, processor, tmp_path / "full")
    extractor = load_extractor(str(directory), prompt=PROMPT, attn_implementation="eager")
    assert type(extractor) is GenericLALMExtractor
    assert type(extractor.model) is type(thinker) and not hasattr(extractor.model, "talker")
    assert type(extractor.processor).__name__ == "NumpyVisionQwen3OmniMoeProcessor"
    np.testing.assert_allclose(extractor.extract(waves), thinker_extractor.extract(waves), atol=1e-6, rtol=0)
