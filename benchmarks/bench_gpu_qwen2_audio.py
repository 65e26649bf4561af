"""Feature-extraction speed of Qwen2-Audio-7B-Instruct's full-size architecture on a GPU (issue 11.5).

    python benchmarks/bench_gpu_qwen2_audio.py [--device cuda] [--batches 1,8,32] [--clips 64]
                                               [--seconds 10] [--attn sdpa,flash_attention_2]
                                               [--json OUT] [--tiny]

The model is built offline from its configuration (the values of Qwen/Qwen2-Audio-7B-Instruct's
config.json are written below; no hub access) with random weights, in bfloat16: the speed of a
forward pass does not depend on the weights' values. The processor is the real one's structure
(Whisper feature extractor with 128 mel bins, the model's chat template) with an offline
byte-level tokenizer; the prompt costs a few dozen tokens either way against 250 audio tokens for
10 s of audio.

For each attention implementation (`sdpa`, and `flash_attention_2` when the flash-attn package
imports) it times, on the same synthetic 10 s clips:
- naive: batch 1, the full model forward computing logits over the whole 156,032-token
  vocabulary, with forward pre-hooks on every attention output projection keeping their inputs;
- calm: `Qwen2AudioExtractor.extract` (hooks at the last prompt token only, no LM head, the
  forward stopped after the last hooked layer) at each batch size of --batches;
and prints clips/s and the ratio to the naive way, plus peak GPU memory.

--tiny builds a small model of the same architecture (for a check on a CPU: it runs the whole
script in a few seconds); its figures mean nothing. Not yet run on a GPU (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

PROMPT = "What sound is in the audio? Answer with one of: dog, rain, sea waves, crying baby, clock tick."

# Qwen/Qwen2-Audio-7B-Instruct, config.json (audio_config / text_config), the values that set the
# architecture's size; the rest are transformers' defaults for these model types.
FULL_AUDIO = {
    "model_type": "qwen2_audio_encoder",
    "num_mel_bins": 128,
    "encoder_layers": 32,
    "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "d_model": 1280,
    "max_source_positions": 1500,
    "activation_function": "gelu",
    "scale_embedding": False,
}
FULL_TEXT = {
    "model_type": "qwen2",
    "vocab_size": 156032,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
TINY_AUDIO = {
    **FULL_AUDIO,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "d_model": 32,
}
TINY_TEXT = {
    **FULL_TEXT,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>")


def processor():
    """Qwen2-Audio's processor structure with an offline byte-level tokenizer and the real chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2AudioProcessor, WhisperFeatureExtractor

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "tiny_models", root / "tests" / "helpers" / "tiny_models.py"
    )
    template = None
    if spec is not None and spec.loader is not None and Path(spec.origin or "").exists():
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        template = mod.QWEN2_AUDIO_CHAT_TEMPLATE
    if template is None:
        raise SystemExit("tests/helpers/tiny_models.py (the chat template) not found")
    vocab = {s: i for i, s in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = template
    return Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok, chat_template=template
    )


def build_model(tiny: bool, attn: str, device: str, dtype: torch.dtype, proc):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    tok = proc.tokenizer
    text = dict(
        TINY_TEXT if tiny else FULL_TEXT, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
    )
    config = Qwen2AudioConfig(
        audio_config=dict(TINY_AUDIO if tiny else FULL_AUDIO),
        text_config=text,
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2AudioForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clips(n: int, seconds: float, rate: int = 16000) -> list[np.ndarray]:
    """Synthetic clips: a few tones plus noise (speed does not depend on the content)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    return [
        (0.1 * np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.05 * rng.standard_normal(len(t))).astype(
            np.float32
        )
        for _ in range(n)
    ]


def time_naive(ext, waves, device: str) -> float:
    """clips/s of batch-1 full forwards with logits, keeping every o_proj input."""
    kept: list[torch.Tensor] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: kept.append(args[0].detach().clone()))
        for name, m in ext.model.named_modules()
        if name.endswith("self_attn.o_proj")
    ]
    vocab = ext.model.config.text_config.vocab_size

    def one(wave) -> None:
        inputs = ext.build_inputs([wave])
        with torch.inference_mode():
            out = ext.model(**inputs, use_cache=False)
        assert out.logits.shape[-1] == vocab
        kept.clear()

    try:
        one(waves[0])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for w in waves:
            one(w)
        sync(device)
        return len(waves) / (time.perf_counter() - t0)
    finally:
        for h in hooks:
            h.remove()


def time_calm(ext, waves, batch: int, device: str) -> float:
    ext.extract(waves[:batch])  # warm-up at this batch size
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(waves), batch):
        ext.extract(waves[start : start + batch])
    sync(device)
    return len(waves) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--clips", type=int, default=64, help="clips per measurement")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--attn", default="sdpa,flash_attention_2")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture (CPU check)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from calm.models.qwen2_audio import Qwen2AudioExtractor

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    batches = [int(b) for b in args.batches.split(",")]
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(
        f"{'tiny' if args.tiny else 'full-size'} Qwen2-Audio, random weights, {args.dtype}, on {gpu}; "
        f"{args.clips} clips of {args.seconds:g} s; torch {torch.__version__}",
        flush=True,
    )
    proc = processor()
    waves = clips(args.clips, args.seconds)
    result: dict = {"device": gpu, "tiny": args.tiny, "dtype": args.dtype, "clips": args.clips, "rows": []}
    for attn in args.attn.split(","):
        if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            print("flash_attention_2: skipped (the flash-attn package is not installed)", flush=True)
            continue
        t0 = time.perf_counter()
        model = build_model(args.tiny, attn, args.device, dtype, proc)
        ext = Qwen2AudioExtractor(model, proc, model_id="qwen2-audio-random", prompt=PROMPT)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{attn}: {n_params / 1e9:.2f} B parameters built in {time.perf_counter() - t0:.1f} s", flush=True
        )
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        naive = time_naive(ext, waves, args.device)
        rows = [{"attn": attn, "path": "naive (batch 1, logits)", "batch": 1, "clips_per_s": naive}]
        for b in batches:
            rows.append(
                {
                    "attn": attn,
                    "path": "calm extract",
                    "batch": b,
                    "clips_per_s": time_calm(ext, waves, b, args.device),
                }
            )
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
        for r in rows:
            r["x_naive"] = r["clips_per_s"] / naive
            print(
                f"  {r['path']:<26} batch {r['batch']:>3}  {r['clips_per_s']:8.2f} clips/s"
                f"  {r['x_naive']:6.2f}x naive",
                flush=True,
            )
        print(f"  peak GPU memory {peak:.1f} GiB", flush=True)
        result["rows"] += [dict(r, peak_gib=peak) for r in rows]
        del ext, model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
