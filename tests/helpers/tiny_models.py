"""Tiny randomly initialised models and offline tokenizers for tests (no hub access).

Shared by the model tests: add builders for other architectures next to these. Every builder
seeds torch, so two calls give identical weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_AUDIO_SPECIAL_TOKENS = (*QWEN_SPECIAL_TOKENS, "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")

# The chat template of Qwen/Qwen2-Audio-7B-Instruct (chat_template.json), verbatim.
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and "
    "message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if 'audio' in content or 'audio_url' "
    "in content %}{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


def byte_level_tokenizer(
    special_tokens=QWEN_SPECIAL_TOKENS,
    *,
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges: ids 0-255 are the 256 byte symbols, then the
    special tokens in the order given (each a single id, never split)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in special_tokens]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token, pad_token=pad_token)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def tiny_qwen2_audio(
    *,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 12,
    hidden_size: int = 32,
    attn_implementation: str = "eager",
    seed: int = 0,
):
    """(model, processor) of a tiny random Qwen2-Audio. head_dim x heads != hidden_size on
    purpose (48 vs 32), so code that assumes hidden = heads x head_dim fails."""
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    tokenizer = byte_level_tokenizer(QWEN2_AUDIO_SPECIAL_TOKENS, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE)
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=QWEN2_AUDIO_CHAT_TEMPLATE,
    )
    config = Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": 128,
            "d_model": 16,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 32,
            "max_source_positions": 1500,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    return model, processor


def save_pretrained(model, processor, directory: str | Path) -> Path:
    """Write a tiny model and its processor as a local checkpoint directory."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _qwen_style_template(audio: str) -> str:
    """A Qwen-style chat template rendering each audio item as `audio` (the model's placeholder)."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for content in message['content'] %}{% if content['type'] == 'audio' %}" + audio + ""
        "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# Audio Flamingo 3 (nvidia/audio-flamingo-3-hf): Qwen2 chat format, one `<sound>` per audio item.
AUDIO_FLAMINGO3_CHAT_TEMPLATE = _qwen_style_template("<sound>")
# GLM-ASR: the audio between begin/end markers, `<|pad|>` as the audio token.
GLMASR_CHAT_TEMPLATE = _qwen_style_template("<|begin_of_audio|><|pad|><|end_of_audio|>")


def _tiny_text_config(tokenizer, num_layers: int) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _tiny_whisper_encoder_lalm(
    model_cls, config_cls, processor_cls, tokenizer, audio_token: str, *, num_layers: int, seed: int
):
    """(model, processor) of a tiny random LALM whose config takes a Whisper-style `audio_config`
    (128 mel bins, one layer) and a `_tiny_text_config` decoder; `audio_token` is the audio placeholder
    of the tokenizer's chat template."""
    from transformers import WhisperFeatureExtractor

    processor = processor_cls(
        WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
        tokenizer,
        chat_template=tokenizer.chat_template,
    )
    config = config_cls(
        audio_config={
            "num_mel_bins": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "hidden_size": 16,
        },
        text_config=_tiny_text_config(tokenizer, num_layers),
        audio_token_id=tokenizer.convert_tokens_to_ids(audio_token),
    )
    torch.manual_seed(seed)
    return model_cls(config).eval(), processor


def tiny_audio_flamingo3(*, num_layers: int = 3, seed: int = 0):
    """(model, processor) of a tiny random Audio Flamingo 3: Whisper-style encoder (fixed 1500
    positions, so audio must be padded to 30 s) + Qwen2 decoder with 4 heads of dim 12."""
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
    )

    tokenizer = byte_level_tokenizer(
        (*QWEN_SPECIAL_TOKENS, "<sound>"), chat_template=AUDIO_FLAMINGO3_CHAT_TEMPLATE
    )
    return _tiny_whisper_encoder_lalm(
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Config,
        AudioFlamingo3Processor,
        tokenizer,
        "<sound>",
        num_layers=num_layers,
        seed=seed,
    )


def tiny_glmasr(*, num_layers: int = 3, seed: int = 0):
    """(model, processor) of a tiny random GLM-ASR: rotary audio encoder + Llama decoder with 4
    heads of dim 12."""
    from transformers import GlmAsrConfig, GlmAsrForConditionalGeneration, GlmAsrProcessor

    tokens = (*QWEN_SPECIAL_TOKENS, "<|pad|>", "<|begin_of_audio|>", "<|end_of_audio|>")
    tokenizer = byte_level_tokenizer(tokens, chat_template=GLMASR_CHAT_TEMPLATE)
    return _tiny_whisper_encoder_lalm(
        GlmAsrForConditionalGeneration,
        GlmAsrConfig,
        GlmAsrProcessor,
        tokenizer,
        "<|pad|>",
        num_layers=num_layers,
        seed=seed,
    )
