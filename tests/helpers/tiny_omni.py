"""Tiny random Qwen2.5-Omni thinker with its torchvision-free processor, built offline."""

from __future__ import annotations

import av
import numpy as np
import torch
from transformers import PreTrainedTokenizerFast, WhisperFeatureExtractor
from transformers.models.qwen2_5_omni import (
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
)

from calm.models.processors import build_processor
from tests.helpers.tiny_models import byte_level_tokenizer

OMNI_TOKENS = {
    "pad_token": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}

# Shaped like Qwen2.5-Omni's template (audio / video placeholders, then text, generation prompt).
OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MEL_BINS = 16


def omni_tokenizer() -> PreTrainedTokenizerFast:
    backend = byte_level_tokenizer(tuple(OMNI_TOKENS.values())).backend_tokenizer
    extra = {
        k: v for k, v in OMNI_TOKENS.items() if k.endswith("token") and k not in ("pad_token", "eos_token")
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra,
    )
    tokenizer.chat_template = OMNI_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen2_5_omni(*, num_layers: int = 2, num_heads: int = 4, seed: int = 0):
    """(thinker in eval mode, processor): 2 decoder layers x 4 heads of dim 8."""
    tokenizer = omni_tokenizer()
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in OMNI_TOKENS.items()}
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(
            num_mel_bins=MEL_BINS,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=32,
            d_model=16,
            output_dim=32,
            n_window=50,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            fullatt_block_indexes=[0],
            window_size=28,
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        ),
        audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        vision_end_token_id=ids["vision_eos_token"],
        user_token_id=ids["im_start"],
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = ids["pad_token"]
    model.generation_config.eos_token_id = ids["eos_token"]
    features = WhisperFeatureExtractor(feature_size=MEL_BINS, sampling_rate=16000, hop_length=160, n_fft=400)
    processor = build_processor(tokenizer, features, OMNI_CHAT_TEMPLATE, config.vision_config)
    return model, processor


def write_video(
    path, *, seconds: float = 1.5, fps: int = 10, size=(64, 48), sample_rate: int = 16000, seed=0
):
    """A small MP4 (mpeg4 video + AAC audio): moving colour blocks and a noisy tone."""
    rng = np.random.default_rng(seed)
    width, height = size
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream("aac", rate=sample_rate)
        audio.layout = "mono"
        for i in range(int(seconds * fps)):
            img = np.zeros((height, width, 3), dtype=np.uint8)
            img[:, (i * 4) % width :, 0] = 200
            img[: height // 2, :, 1] = rng.integers(0, 255)
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        t = np.arange(int(seconds * sample_rate)) / sample_rate
        wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        for start in range(0, wave.size, 1024):
            frame = av.AudioFrame.from_ndarray(wave[None, start : start + 1024], format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)
    return path


def tiny_qwen3_omni_thinker(*, num_layers: int = 3, seed: int = 0):
    """(thinker in eval mode, processor) of a tiny random Qwen3-Omni-MoE thinker: MoE text decoder
    (4 experts, 2 per token) with 3 layers x 4 heads of dim 12 (hidden size 32, so heads x head_dim
    != hidden), interleaved M-RoPE, and the torchvision-free `Qwen3OmniMoeProcessor`."""
    from transformers.models.qwen3_omni_moe import (
        Qwen3OmniMoeThinkerConfig,
        Qwen3OmniMoeThinkerForConditionalGeneration,
    )

    tokenizer = omni_tokenizer()
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in OMNI_TOKENS.items()}
    config = Qwen3OmniMoeThinkerConfig(
        audio_config=dict(
            num_mel_bins=128,
            encoder_layers=1,
            encoder_attention_heads=2,
            encoder_ffn_dim=32,
            d_model=16,
            output_dim=32,
            n_window=50,
            downsample_hidden_size=8,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            deepstack_visual_indexes=[0],
            num_position_embeddings=64,
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            max_position_embeddings=4096,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            pad_token_id=ids["pad_token"],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 2, 2],
                "mrope_interleaved": True,
            },
        ),
        audio_token_id=ids["audio_token"],
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"],
        vision_start_token_id=ids["vision_bos_token"],
        user_token_id=ids["im_start"],
    )
    torch.manual_seed(seed)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config).eval()
    features = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    processor = build_processor(
        tokenizer,
        features,
        OMNI_CHAT_TEMPLATE,
        config.vision_config,
        processor_base="qwen3_omni_moe.Qwen3OmniMoeProcessor",
    )
    return model, processor


def save_like_hub_qwen3_omni(model, processor, directory):
    """Save a tiny Qwen3-Omni(-thinker) checkpoint whose processor config names the hub's classes
    (`Qwen3OmniMoeProcessor` with Qwen2-VL image / video processors, which need torchvision)."""
    import json
    from pathlib import Path

    from tests.helpers.tiny_models import save_pretrained

    directory = save_pretrained(model, processor, directory)
    path = Path(directory) / "processor_config.json"
    config = json.loads(path.read_text())
    config["processor_class"] = "Qwen3OmniMoeProcessor"
    config["image_processor"]["image_processor_type"] = "Qwen2VLImageProcessor"
    config["video_processor"]["video_processor_type"] = "Qwen2VLVideoProcessor"
    path.write_text(json.dumps(config, indent=2))
    return directory
