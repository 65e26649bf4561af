"""Tiny randomly initialised encoder-only audio models and their feature extractors (no hub access).

Each builder seeds torch and returns (model, feature_extractor); `save_encoder` writes them as a
local checkpoint directory that `load_extractor` dispatches on `config.model_type`.
"""

from __future__ import annotations

from pathlib import Path

import torch

_TRANSFORMER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
_CONV = {
    "conv_dim": (16, 16),
    "conv_stride": (5, 4),
    "conv_kernel": (10, 4),
    "num_conv_pos_embeddings": 8,
    "num_conv_pos_embedding_groups": 2,
}


def tiny_ast(seed: int = 0):
    """AST: 32 mel bins x 100 fbank frames (1.015 s), 16x16 patches with stride 10 (2 x 9 grid)."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    config = ASTConfig(**_TRANSFORMER, num_mel_bins=32, max_length=100, attn_implementation="eager")
    torch.manual_seed(seed)
    return ASTModel(config).eval(), ASTFeatureExtractor(num_mel_bins=32, max_length=100)


def tiny_wav2vec2_family(model_type: str = "wav2vec2", *, norm: str = "layer", seed: int = 0):
    """wav2vec2 / hubert / wavlm / data2vec-audio with a 2-layer conv stack (20 samples per frame).

    norm="layer": the feature extractor returns an attention mask (padded batches);
    norm="group": it does not (the extractor groups clips of equal length)."""
    import transformers

    config_cls, model_cls = {
        "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
        "hubert": ("HubertConfig", "HubertModel"),
        "wavlm": ("WavLMConfig", "WavLMModel"),
        "data2vec-audio": ("Data2VecAudioConfig", "Data2VecAudioModel"),
    }[model_type]
    extra = {"feat_extract_norm": norm} if model_type != "data2vec-audio" else {}
    if model_type == "data2vec-audio":
        extra = {"conv_pos_kernel_size": 5, "num_conv_pos_embeddings": 2}
    if model_type == "wavlm":
        extra.update(num_buckets=16, max_bucket_distance=32)
    config = getattr(transformers, config_cls)(
        **_TRANSFORMER, **{**_CONV, **extra}, attn_implementation="eager"
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    mask = norm == "layer" or model_type == "data2vec-audio"
    extractor = transformers.Wav2Vec2FeatureExtractor(return_attention_mask=mask, do_normalize=True)
    return model, extractor


def tiny_clap(seed: int = 0):
    """CLAP with a 2-stage HTSAT audio tower (2 and 4 heads of dim 8, window 4) on 1 s at 16 kHz."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    audio = {
        "spec_size": 64,
        "num_mel_bins": 16,
        "window_size": 4,
        "patch_size": 4,
        "patch_stride": (4, 4),
        "depths": [1, 2],
        "num_attention_heads": [2, 4],
        "patch_embeds_hidden_size": 16,
        "hidden_size": 32,
        "enable_fusion": False,
        "projection_dim": 8,
    }
    text = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    text["intermediate_size"] = 32
    config = ClapConfig(audio_config=audio, text_config=text, projection_dim=8)
    torch.manual_seed(seed)
    model = ClapModel(config).eval()
    extractor = ClapFeatureExtractor(
        feature_size=16,
        sampling_rate=16000,
        hop_length=160,
        max_length_s=1,
        fft_window_size=400,
        frequency_max=8000,
        truncation="fusion",  # the feature extractor default: the backend picks
        padding="repeatpad",
    )
    return model, extractor


def save_encoder(model, feature_extractor, directory: str | Path) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory)
    feature_extractor.save_pretrained(directory)
    return directory
