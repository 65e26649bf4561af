"""The LALM path on a tiny random Qwen2-Audio (calm.models.lalm, calm.models.qwen2_audio)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calm.models import load_extractor
from calm.models.base import ExtractorError, HeadName
from calm.models.lalm import position_ids_from_mask
from calm.models.qwen2_audio import Qwen2AudioExtractor
from tests.helpers.tiny_models import save_pretrained, tiny_qwen2_audio

PROMPT = "What caption does the given audio belong to? A. dog B. rain"


@pytest.fixture(scope="module")
def extractor():
    model, processor = tiny_qwen2_audio()
    return Qwen2AudioExtractor(model, processor, model_id="tiny-qwen2-audio", prompt=PROMPT)


@pytest.fixture(scope="module")
def waves():
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16000, 6000, 27000)]


def test_head_names_and_contract(extractor):
    assert extractor.sample_rate == 16000 and extractor.max_seconds == 30.0
    assert extractor.head_names[:2] == [HeadName(0, 0, "decoder"), HeadName(0, 1, "decoder")]
    assert len(extractor.head_names) == 3 * 4
    key = extractor.key
    assert json.loads(json.dumps(key)) == key
    assert key["prompt"] == PROMPT and key["dtype"] == "float32" and key["layers"] == [0, 1, 2]


def test_chat_places_audio_then_prompt_then_generation_prompt(extractor, waves):
    text = extractor.chat_text()
    assert text.index("<|audio_bos|><|AUDIO|><|audio_eos|>") < text.index(PROMPT)
    assert text.endswith(PROMPT + "<|im_end|>\n<|im_start|>assistant\n")
    inputs = extractor.build_inputs(waves[:1])
    tokenizer = extractor.processor.tokenizer
    ids = inputs["input_ids"][0].tolist()
    audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert ids.count(audio_id) == 25  # 1 s of audio: 100 mel frames -> 25 audio tokens
    assert tokenizer.decode(ids[-11:]) == "<|im_start|>assistant\n"  # byte-level: one token per byte
    assert tokenizer.decode(ids[-1:]) == "\n"  # last prompt token: the one right before the answer


def test_features_shape_dtype_and_variation(extractor, waves):
    features = extractor.extract(waves)
    assert features.shape == (3, 12, 12) and features.dtype == np.float32
    assert np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 1e-4  # the audio reaches the features


def test_batched_equals_single(extractor, waves):
    batched = extractor.extract(waves)
    single = np.concatenate([extractor.extract([w]) for w in waves])
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)


def test_left_and_right_padding_agree(extractor, waves):
    right = extractor.forward_features(extractor.build_inputs(waves, padding_side="right"))
    left_inputs = extractor.build_inputs(waves, padding_side="left")
    assert (left_inputs["attention_mask"][:, 0] == 0).any()  # really left-padded
    left = extractor.forward_features(left_inputs)
    np.testing.assert_allclose(left, right, atol=1e-5, rtol=0)


def _attention_recomputation(extractor, inputs, layer: int) -> np.ndarray:
    """Per-head attention outputs of `layer` at the last real token, from attention weights @ V."""
    model = extractor.model
    positions = position_ids_from_mask(inputs["attention_mask"])
    block = model.model.language_model.layers[layer]
    attention = block.self_attn
    with torch.no_grad():
        out = model(
            **inputs,
            position_ids=positions,
            output_attentions=True,
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = block.input_layernorm(out.hidden_states[layer])
        n, length, _ = hidden.shape
        values = attention.v_proj(hidden).view(n, length, -1, attention.head_dim).transpose(1, 2)
        values = values.repeat_interleave(
            attention.num_key_value_groups, dim=1
        )  # GQA: kv head -> query heads
        per_head = out.attentions[layer] @ values  # (n, heads, length, head_dim)
    last = inputs["attention_mask"].shape[1] - 1 - inputs["attention_mask"].flip(1).argmax(1)
    return per_head[torch.arange(n), :, last].numpy()


def test_captured_heads_equal_attention_weights_times_values(extractor, waves):
    assert extractor.model.config.text_config._attn_implementation == "eager"
    inputs = extractor.build_inputs(waves, padding_side="left")
    features = extractor.forward_features(inputs)
    layer = 1
    expected = _attention_recomputation(extractor, inputs, layer)
    rows = [k for k, name in enumerate(extractor.head_names) if name.layer == layer]
    np.testing.assert_allclose(features[:, rows], expected, atol=1e-5, rtol=0)


def test_stopping_early_changes_nothing_and_skips_the_rest(extractor, waves):
    model = extractor.model
    ran = []
    hooks = [
        model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head")),
        model.model.language_model.layers[-1].mlp.register_forward_hook(lambda *a: ran.append("last mlp")),
        model.model.language_model.norm.register_forward_hook(lambda *a: ran.append("norm")),
    ]
    try:
        inputs = extractor.build_inputs(waves)
        stopped = extractor.forward_features(inputs)
        assert ran == []
        full = extractor.forward_features(inputs, stop=False)
        assert "last mlp" in ran and "lm_head" not in ran  # the backbone runs, never the LM head
    finally:
        for hook in hooks:
            hook.remove()
    np.testing.assert_array_equal(stopped, full)


def test_layers_option_selects_a_slice(extractor, waves):
    full = extractor.extract(waves[:2])
    model, processor = extractor.model, extractor.processor
    only_1 = Qwen2AudioExtractor(model, processor, model_id="t", prompt=PROMPT, layers=[1])
    first_2 = Qwen2AudioExtractor(model, processor, model_id="t", prompt=PROMPT, layers=2)
    assert {n.layer for n in only_1.head_names} == {1}
    np.testing.assert_allclose(only_1.extract(waves[:2]), full[:, 4:8], atol=1e-6)
    np.testing.assert_allclose(first_2.extract(waves[:2]), full[:, :8], atol=1e-6)


def test_prompt_changes_the_features(extractor, waves):
    inputs_a = extractor.build_inputs(waves[:1])
    inputs_b = extractor.build_inputs(waves[:1], "Is this audio bonafide or spoofed?")
    a, b = extractor.forward_features(inputs_a), extractor.forward_features(inputs_b)
    assert np.abs(a - b).max() > 1e-4


def test_load_extractor_from_a_local_directory(extractor, waves, tmp_path):
    directory = save_pretrained(extractor.model, extractor.processor, tmp_path / "tiny-qwen2-audio")
    loaded = load_extractor(str(directory), prompt=PROMPT, attn_implementation="eager")
    assert isinstance(loaded, Qwen2AudioExtractor)
    assert loaded.model_id == str(directory) and loaded.key["dtype"] == "float32"
    np.testing.assert_allclose(loaded.extract(waves), extractor.extract(waves), atol=1e-5, rtol=0)


def test_lalms_have_no_encoder_heads(extractor, tmp_path):
    directory = save_pretrained(extractor.model, extractor.processor, tmp_path / "tiny")
    with pytest.raises(ExtractorError, match="decoder heads only"):
        load_extractor(str(directory), heads="encoder")


def test_windowed_lalm_keeps_the_zero_shot_surface_and_options_are_checked(extractor, tmp_path):
    from calm.answering.zeroshot import as_chat_lm

    directory = save_pretrained(extractor.model, extractor.processor, tmp_path / "tiny")
    windowed = load_extractor(str(directory), attn_implementation="eager", long="windows")
    chat = as_chat_lm(windowed)
    assert chat.model is windowed.inner.model and chat.positions_from_mask is True
    assert chat.tokenizer is windowed.processor.tokenizer
    with pytest.raises(ExtractorError, match=r"\['video'\] .*accepts: padding_side, truncate_layers"):
        load_extractor(str(directory), video=True)
