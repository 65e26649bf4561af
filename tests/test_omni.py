import numpy as np
import pytest

from calm.models.base import ExtractorError
from calm.models.processors import patchify
from calm.models.qwen2_5_omni import Qwen25OmniExtractor
from calm.video import VideoClip, frame_times, read_frames
from tests.helpers.tiny_omni import tiny_qwen2_5_omni, write_video


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_5_omni()


@pytest.fixture(scope="module")
def waves():
    rng = np.random.default_rng(0)
    return [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000, 9000, 12345)]


def test_chat_template_places_audio_then_prompt(tiny):
    model, processor = tiny
    ex = Qwen25OmniExtractor(model, processor, model_id="tiny", prompt="Which sound?")
    assert ex.chat_text() == (
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>Which sound?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = ex.build_inputs([np.zeros(8000, np.float32) + 0.01])["input_ids"][0].tolist()
    text = processor.tokenizer.decode(ids)
    assert text.endswith("<|audio_eos|>Which sound?<|im_end|>\n<|im_start|>assistant\n")
    assert (
        ids.count(processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")) == 12
    )  # 0.5 s: 50 mel frames -> 25 -> 12 tokens


def test_features_batched_equal_single_and_padding_side_irrelevant(tiny, waves):
    model, processor = tiny
    ex = Qwen25OmniExtractor(model, processor, model_id="tiny", prompt="Which sound?")
    batched = ex.extract(waves)
    assert batched.shape == (3, 2 * 4, 8) and batched.dtype == np.float32
    single = np.concatenate([ex.extract([w]) for w in waves])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    left = ex.forward_features(ex.build_inputs(waves, padding_side="left"))
    assert not ex.build_inputs(waves, padding_side="left")["attention_mask"][:, 0].all()
    np.testing.assert_allclose(left, batched, atol=1e-5)
    assert ex.key["options"] == {} and ex.head_names[5] == (1, 1, "decoder")


def test_frame_sampling_and_patchify_layout():
    assert frame_times(1.5, 2.0).tolist() == [0.0, 0.5, 1.0]
    assert frame_times(0.1, 2.0, max_frames=5).tolist() == [0.0]
    frames = np.random.default_rng(0).integers(0, 256, (3, 56, 28, 3), dtype=np.uint8)
    patches, grid = patchify(frames)
    assert grid == [2, 4, 2] and patches.shape == (16, 3 * 2 * 14 * 14)
    # first patch = temporal pair (0, 1), top-left 14x14 block, channel-major
    x = (frames.astype(np.float32) / 255 - [0.48145466, 0.4578275, 0.40821073]) / [
        0.26862954,
        0.26130258,
        0.27577711,
    ]
    expected = x[:2, :14, :14].transpose(3, 0, 1, 2).reshape(-1)
    np.testing.assert_allclose(patches[0], expected, atol=1e-5)
    # odd frame count: the last frame is repeated
    last = x[2, :14, :14].transpose(2, 0, 1)
    np.testing.assert_allclose(patches[8].reshape(3, 2, 14, 14)[:, 1], last, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 28"):
        patchify(frames[:, :50])


def test_audio_visual_path(tiny, tmp_path):
    model, processor = tiny
    path = write_video(tmp_path / "clip.mp4", seconds=1.5, fps=10)
    frames = read_frames(path, fps=2.0, size=(56, 28))
    assert frames.shape == (3, 56, 28, 3) and frames.dtype == np.uint8
    ex = Qwen25OmniExtractor(
        model, processor, model_id="tiny", prompt="Which?", video=True, fps=2.0, frame_size=(56, 56)
    )
    clip = ex.load_input(path)
    assert isinstance(clip, VideoClip) and clip.frames.shape == (3, 56, 56, 3)
    assert abs(len(clip.audio) / 16000 - 1.5) < 0.2
    inputs = ex.build_inputs([clip, clip])
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    assert (
        "<|vision_bos|><|audio_bos|><|VIDEO|>" in text
        and "<|AUDIO|><|audio_eos|><|vision_eos|>Which?" in text
    )
    assert inputs["use_audio_in_video"] is True
    features = ex.extract([clip])
    assert features.shape == (1, 8, 8) and np.isfinite(features).all()
    audio_only = Qwen25OmniExtractor(model, processor, model_id="tiny", prompt="Which?").extract([clip.audio])
    assert not np.allclose(features, audio_only)  # the frames change the features
    assert ex.key["options"]["video"] is True and ex.key["options"]["fps"] == 2.0
    with pytest.raises(ExtractorError, match="multiples of 28"):
        Qwen25OmniExtractor(model, processor, model_id="tiny", video=True, frame_size=(50, 50))
    with pytest.raises(ExtractorError, match="VideoClip"):
        ex.build_inputs([clip.audio])
