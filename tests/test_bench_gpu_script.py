"""benchmarks/bench_gpu_qwen2_audio.py runs end to end with --tiny on a CPU (the GPU figures need a
GPU machine; the script must be ready when one is available)."""

from __future__ import annotations

import torch

from tests.helpers import benchmark_script


def _module():
    return benchmark_script("bench_gpu_qwen2_audio")


def test_full_config_is_qwen2_audio_7b():
    mod = _module()
    text, audio = mod.FULL_TEXT, mod.FULL_AUDIO
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (4096, 32, 32)
    assert (text["intermediate_size"], text["vocab_size"]) == (11008, 156032)
    assert (audio["d_model"], audio["encoder_layers"], audio["encoder_attention_heads"]) == (1280, 32, 20)


def test_tiny_run_end_to_end(tmp_path):
    torch.set_num_threads(1)
    mod = _module()
    out = tmp_path / "gpu.json"
    argv = ["--tiny", "--device", "cpu", "--clips", "2", "--batches", "1,2", "--seconds", "1"]
    result = mod.main([*argv, "--attn", "sdpa,flash_attention_2", "--json", str(out)])
    assert out.exists() and result["tiny"] and result["device"] == "CPU"
    sdpa = [r for r in result["rows"] if r["attn"] == "sdpa"]
    assert [(r["path"], r["batch"]) for r in sdpa] == [
        ("naive (batch 1, logits)", 1),
        ("calm extract", 1),
        ("calm extract", 2),
    ]
    assert all(r["clips_per_s"] > 0 for r in sdpa)
