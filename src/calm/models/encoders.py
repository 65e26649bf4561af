"""Encoder-only audio models as per-head feature extractors (an extension of the paper).

CALM's paper reads the decoder heads of an audio-language model at the last prompt token. Here a
head's feature is the output of one self-attention head of an audio encoder (the input of the
layer's attention output projection, split into heads), averaged over the clip's real frames,
never over padding. Every self-attention layer of the encoder is read (`layers=` selects some);
`HeadName.source` is `encoder`. Which frames count as real, per family (docs/backends.md):

- wav2vec2, HuBERT, WavLM, data2vec-audio (`Wav2Vec2Family`): the conv feature encoder's output
  frames of the clip's own samples (`_get_feat_extract_output_lengths`). Checkpoints whose feature
  extractor returns an attention mask (layer-norm conv stacks) run padded batches with the mask;
  the others (group-norm stacks, e.g. wav2vec2-base, which normalise over the whole input) run
  groups of clips of equal length without any padding.
- AST (`ASTExtractor`): a fixed grid of 16x16 patches over `max_length` fbank frames (1024 =
  10.24 s); short clips are zero-padded, and the padding is part of the model's input (AST has no
  attention mask). The mean runs over the patch tokens whose time column starts on a real fbank
  frame (all frequency rows); [CLS] and distillation tokens are left out.
- CLAP audio tower (`ClapExtractor`, HTSAT, Swin window attention): the input is always 10 s;
  shorter clips are repeated to fill it (`repeatpad`, as CLAP was trained), so every window token
  holds real audio and the mean runs over all window tokens of the clip. Layers are the Swin
  blocks numbered across stages (HTSAT: 2+2+6+2 = 12). Heads per stage differ (4, 8, 16, 32 in
  HTSAT) but head_dim is the same (24), so features are (n, sum of heads, 24); a checkpoint whose
  selected blocks have different head dims is refused (choose `layers=` with one head_dim).
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from calm.models.base import ExtractorError, HeadName, TorchExtractor, dtype_name, model_revision
from calm.models.hooks import AttentionSite, HeadCapture, attention_sites, mean_over_lengths, select_layers
from calm.models.spec import LoadSpec, backend_options

WAV2VEC2_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
AST_TYPE = "audio-spectrogram-transformer"
CLAP_TYPES = ("clap", "clap_audio_model")
ENCODER_TYPES = (AST_TYPE, *WAV2VEC2_TYPES, *CLAP_TYPES)

_FBANK_WINDOW, _FBANK_HOP = 400, 160  # AST's kaldi fbank at 16 kHz: 25 ms frames every 10 ms


class EncoderExtractor(TorchExtractor):
    """Shared part of the encoder backends: sites, key, and `extract` over groups of clips.

    Subclasses set `sample_rate` / `max_seconds` and implement `groups` (which clips share one
    forward pass) and `forward` (one pass with a `HeadCapture`, returning (n, K, d))."""

    def __init__(
        self,
        model,
        feature_extractor,
        sites: list[AttentionSite],
        *,
        model_id: str,
        model_type: str,
        revision: str | None,
        options: dict[str, Any],
    ):
        dims = sorted({s.head_dim for s in sites})
        if len(dims) > 1:
            layers = {d: [s.layer for s in sites if s.head_dim == d] for d in dims}
            raise ExtractorError(
                f"{model_id}: the selected layers have different head dims {layers}; choose layers "
                "with one head_dim (features are (n, K, d) with one d)"
            )
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.sites = sites
        self.model_id = model_id
        self.model_type = model_type
        self.revision = revision
        self.options = dict(options)
        self.layers = [s.layer for s in sites]
        self.head_names = [HeadName(s.layer, h, s.source) for s in sites for h in range(s.num_heads)]
        self.head_dim = dims[0]

    @property
    def key(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "revision": self.revision,
            "model_type": self.model_type,
            "prompt": None,
            "heads": "encoder",
            "layers": self.layers,
            "dtype": dtype_name(self.dtype),
            "options": self.options,
        }

    def groups(self, waves: list[np.ndarray]) -> list[list[int]]:
        """Rows that run in one forward pass (default: all of them; inputs are fixed-length)."""
        return [list(range(len(waves)))]

    def forward(self, waves: list[np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    def extract(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        waves = [np.asarray(w, dtype=np.float32).reshape(-1) for w in inputs]
        out = np.empty((len(waves), len(self.head_names), self.head_dim), dtype=np.float32)
        for rows in self.groups(waves) if waves else []:
            with torch.inference_mode():
                out[rows] = self.forward([waves[i] for i in rows]).cpu().numpy()
        return out


class Wav2Vec2Family(EncoderExtractor):
    """wav2vec2, HuBERT, WavLM and data2vec-audio: transformer layers over conv frames (~50 per s)."""

    def __init__(self, model, feature_extractor, sites, *, max_seconds: float | None, **kwargs):
        super().__init__(model, feature_extractor, sites, **kwargs)
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.max_seconds = max_seconds
        self.conv = (tuple(model.config.conv_kernel), tuple(model.config.conv_stride))
        # data2vec-audio's stacked positional convs see padded frames: it never pads either
        self.use_mask = bool(getattr(feature_extractor, "return_attention_mask", False)) and (
            self.model_type != "data2vec-audio"
        )
        if self.model_type == "wavlm":
            for site in sites:
                attention = encoder_layers(model)[site.layer].attention
                attention.torch_multi_head_self_attention = types.MethodType(wavlm_self_attention, attention)

    def groups(self, waves: list[np.ndarray]) -> list[list[int]]:
        if self.use_mask:  # padded batches with an attention mask leave real frames unchanged
            return super().groups(waves)
        by_length: dict[int, list[int]] = {}
        for i, w in enumerate(waves):
            by_length.setdefault(len(w), []).append(i)
        return list(by_length.values())

    def forward(self, waves: list[np.ndarray]) -> torch.Tensor:
        batch = self.feature_extractor(
            waves,
            sampling_rate=self.sample_rate,
            padding=True,
            return_attention_mask=self.use_mask,
            return_tensors="pt",
        )
        samples = torch.tensor([len(w) for w in waves])
        frames = conv_frames(samples, *self.conv)
        inputs = {"input_values": batch["input_values"]}
        if self.use_mask:
            inputs["attention_mask"] = batch["attention_mask"]
        inputs = self.to_model(inputs)
        return HeadCapture(self.sites, mean_over_lengths(frames)).run(lambda: self.model(**inputs))


def conv_frames(samples: torch.Tensor, kernels: Sequence[int], strides: Sequence[int]) -> torch.Tensor:
    """Frames the conv feature encoder makes of `samples` samples (no padding in its convolutions)."""
    frames = samples.clone()
    for kernel, stride in zip(kernels, strides, strict=True):
        frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1
    return frames.clamp(min=1)


def wavlm_self_attention(self, hidden_states, attention_mask, gated_position_bias):
    """WavLM's `torch_multi_head_self_attention` with the output projection called as a module.

    The original hands `out_proj`'s weights to `F.multi_head_attention_forward`, so no hook on
    `out_proj` ever fires; this computes the same attention (scaled q.k + gated relative position
    bias, key padding masked) and calls `self.out_proj(context)`. Returns per-head weights."""
    bsz, length, _ = hidden_states.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)

    query = heads(self.q_proj(hidden_states)) * self.scaling
    scores = query @ heads(self.k_proj(hidden_states)).transpose(-1, -2)
    scores = scores + gated_position_bias.view(bsz, self.num_heads, length, length)
    if attention_mask is not None:
        scores = scores.masked_fill(attention_mask.ne(1)[:, None, None, :], float("-inf"))
    weights = scores.softmax(dim=-1)
    context = (weights @ heads(self.v_proj(hidden_states))).transpose(1, 2).reshape(bsz, length, -1)
    return self.out_proj(context), weights


def ast_real_columns(n_samples: int, max_frames: int, patch: int, stride: int) -> int:
    """Time columns of AST's patch grid that start on a real fbank frame (at least one)."""
    frames = 1 + (n_samples - _FBANK_WINDOW) // _FBANK_HOP if n_samples >= _FBANK_WINDOW else 1
    columns = (max_frames - patch) // stride + 1
    return int(min(max(math.ceil(min(frames, max_frames) / stride), 1), columns))


class ASTExtractor(EncoderExtractor):
    """Audio Spectrogram Transformer: fixed `max_length` fbank frames, 16x16 patches."""

    def __init__(self, model, feature_extractor, sites, **kwargs):
        super().__init__(model, feature_extractor, sites, **kwargs)
        config = model.config
        if int(feature_extractor.max_length) != int(config.max_length):
            raise ExtractorError(
                f"{self.model_id}: feature extractor max_length {feature_extractor.max_length} != "
                f"model max_length {config.max_length}"
            )
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.max_seconds = ((config.max_length - 1) * _FBANK_HOP + _FBANK_WINDOW) / self.sample_rate
        self.freq_rows = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
        self.time_columns = (config.max_length - config.patch_size) // config.time_stride + 1
        self.grid = (int(config.max_length), int(config.patch_size), int(config.time_stride))

    def token_mask(self, waves: list[np.ndarray]) -> torch.Tensor:
        """(n, 2 + rows x columns) weights: 1 on patches of real time columns, 0 elsewhere."""
        real = torch.tensor([ast_real_columns(len(w), *self.grid) for w in waves])
        columns = torch.arange(self.time_columns)[None, :] < real[:, None]  # (n, columns)
        grid = columns[:, None, :].expand(-1, self.freq_rows, -1).reshape(len(waves), -1)  # row-major f, t
        return torch.cat([torch.zeros(len(waves), 2, dtype=torch.bool), grid], dim=1).float()

    def forward(self, waves: list[np.ndarray]) -> torch.Tensor:
        batch = self.feature_extractor(waves, sampling_rate=self.sample_rate, return_tensors="pt")
        values = self.to_model(batch["input_values"])
        mask = self.token_mask(waves)
        return HeadCapture(self.sites, mean_over_mask(mask)).run(lambda: self.model(input_values=values))


def mean_over_mask(mask: torch.Tensor):
    """Reducer: row i averages the positions where mask[i] is 1 of a (n, T, width) tensor."""

    def reduce(x: torch.Tensor) -> torch.Tensor:
        weights = mask.to(x.device, torch.float32)
        return torch.einsum("nt,ntw->nw", weights, x.float()) / weights.sum(dim=1, keepdim=True)

    return reduce


class ClapExtractor(EncoderExtractor):
    """CLAP's audio tower (HTSAT): Swin blocks over a 10 s mel image, repeat-padded."""

    def __init__(self, model, feature_extractor, sites, **kwargs):
        super().__init__(model, feature_extractor, sites, **kwargs)
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.max_seconds = float(feature_extractor.nb_max_samples) / self.sample_rate
        # 4 stacked mel crops for fused checkpoints, 1 mel for unfused ones (no crop below 10 s)
        self.truncation = "fusion" if getattr(model.config, "enable_fusion", False) else "rand_trunc"

    def forward(self, waves: list[np.ndarray]) -> torch.Tensor:
        batch = self.feature_extractor(
            waves,
            sampling_rate=self.sample_rate,
            padding="repeatpad",
            truncation=self.truncation,
            return_tensors="pt",
        )
        # no clip is longer than the window (load_input cut it); the feature extractor marks a random
        # clip as "longer" when none is, which would send it through the fusion branch: undo that
        is_longer = torch.zeros(len(waves), 1, dtype=torch.bool, device=self.device)
        features = self.to_model(batch["input_features"])
        n = len(waves)

        def windows_mean(x: torch.Tensor) -> torch.Tensor:  # (n * windows, tokens, width) -> (n, width)
            return x.reshape(n, -1, x.shape[-1]).float().mean(dim=1)

        return HeadCapture(self.sites, windows_mean).run(
            lambda: self.model(input_features=features, is_longer=is_longer)
        )


def clap_sites(audio_model, layers: Sequence[int] | int | None) -> list[AttentionSite]:
    """One site per Swin block of CLAP's audio encoder, blocks numbered across stages."""
    blocks = [block for stage in audio_model.audio_encoder.layers for block in stage.blocks]
    sites = []
    for index in select_layers(len(blocks), layers):
        attention = blocks[index].attention
        core = attention.self
        sites.append(
            AttentionSite(
                index, attention.output.dense, core.num_attention_heads, core.attention_head_size, "encoder"
            )
        )
    return sites


def encoder_layers(model) -> torch.nn.ModuleList:
    """The transformer layer list of an encoder model (`model.encoder.layers`, or `model.layers`)."""
    for owner in (getattr(model, "encoder", None), model):
        for name in ("layers", "layer"):
            layers = getattr(owner, name, None)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
                return layers
    raise ExtractorError(f"cannot find the transformer layers of {type(model).__name__}")


def _check_spec(spec: LoadSpec) -> None:
    if spec.heads not in ("all", "encoder"):
        raise ExtractorError(f"heads={spec.heads!r}: {spec.model_id} is encoder-only (use 'encoder')")
    if spec.prompt:
        raise ExtractorError(f"{spec.model_id} is encoder-only: it takes no prompt (got {spec.prompt!r})")


def _load(spec: LoadSpec, auto_class: str = "AutoModel"):
    import transformers

    _check_spec(spec)
    model = getattr(transformers, auto_class).from_pretrained(spec.model_id, **spec.pretrained_kwargs())
    extractor = transformers.AutoFeatureExtractor.from_pretrained(spec.model_id, **spec.hub_kwargs())
    return model.to(spec.device), extractor


def _common(spec: LoadSpec, model) -> dict[str, Any]:
    return {
        "model_id": spec.label,
        "model_type": model.config.model_type,
        "revision": spec.revision or model_revision(model),
        "options": dict(spec.options),
    }


@backend_options(max_seconds=30.0)
def load_wav2vec2_family(spec: LoadSpec) -> Wav2Vec2Family:
    """wav2vec2 / HuBERT / WavLM / data2vec-audio (any head class; the base model is loaded).
    Option `max_seconds` (default 30): clips are cut there (attention cost grows with length²)."""
    model, feature_extractor = _load(spec)
    sites = attention_sites(encoder_layers(model), spec.layer_list(), attention="attention", source="encoder")
    return Wav2Vec2Family(
        model, feature_extractor, sites, max_seconds=spec.options["max_seconds"], **_common(spec, model)
    )


@backend_options()
def load_ast(spec: LoadSpec) -> ASTExtractor:
    """Audio Spectrogram Transformer (`ASTModel`, also from `ASTForAudioClassification` checkpoints)."""
    model, feature_extractor = _load(spec)
    sites = attention_sites(encoder_layers(model), spec.layer_list(), attention="attention", source="encoder")
    return ASTExtractor(model, feature_extractor, sites, **_common(spec, model))


@backend_options()
def load_clap(spec: LoadSpec) -> ClapExtractor:
    """CLAP's audio tower; a full `ClapModel` checkpoint is loaded and its text tower dropped."""
    model, feature_extractor = _load(spec)
    common = _common(spec, model)
    audio = model.audio_model if hasattr(model, "audio_model") else model
    if audio is not model:
        del model.text_model  # frees the text tower; only the audio tower runs
    return ClapExtractor(audio, feature_extractor, clap_sites(audio, spec.layer_list()), **common)


#: config.model_type -> loader, merged into `calm.models.BACKENDS`
ENCODER_BACKENDS = {
    AST_TYPE: "calm.models.encoders:load_ast",
    **{t: "calm.models.encoders:load_wav2vec2_family" for t in WAV2VEC2_TYPES},
    **{t: "calm.models.encoders:load_clap" for t in CLAP_TYPES},
}

#: short names for common checkpoints (hub ids; loading code is shared with local directories)
ENCODER_MODELS = {
    "ast-audioset": ("MIT/ast-finetuned-audioset-10-10-0.4593", "calm.models.encoders:load_ast"),
    "clap-htsat": ("laion/clap-htsat-unfused", "calm.models.encoders:load_clap"),
    "clap-htsat-fused": ("laion/clap-htsat-fused", "calm.models.encoders:load_clap"),
    "wav2vec2-base": ("facebook/wav2vec2-base", "calm.models.encoders:load_wav2vec2_family"),
    "hubert-base": ("facebook/hubert-base-ls960", "calm.models.encoders:load_wav2vec2_family"),
    "wavlm-base-plus": ("microsoft/wavlm-base-plus", "calm.models.encoders:load_wav2vec2_family"),
    "data2vec-audio-base": ("facebook/data2vec-audio-base", "calm.models.encoders:load_wav2vec2_family"),
}
