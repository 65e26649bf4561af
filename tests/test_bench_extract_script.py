"""benchmarks/bench_extract.py's breakdown of the model's time by operator kind (the figures that
show where a dtype change can and cannot speed extraction up) and its argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import benchmark_script


def _module():
    return benchmark_script("bench_extract")


@pytest.mark.slow
def test_breakdown_of_a_real_extraction_has_every_kind():
    from calm.models import load_extractor

    mod = _module()
    ext = load_extractor("whisper-tiny.en", dtype="float32")
    waves = [np.random.default_rng(i).normal(0, 0.1, 16000).astype(np.float32) for i in range(2)]
    ops = mod.op_breakdown(ext, waves, batch_size=2)
    assert tuple(ops) == mod.KINDS
    assert all(v >= 0 for v in ops.values())
    # Whisper's encoder: torch's attention kernel, linear layers and two convolutions all ran
    assert ops["attention"] > 0 and ops["matmul"] > 0 and ops["convolution"] > 0


def test_print_breakdown_ratios_and_ceiling(capsys):
    mod = _module()
    f32 = {"attention": 0.1, "matmul": 0.2, "convolution": 0.0, "other": 0.1}
    bf16 = {"attention": 0.1, "matmul": 0.1, "convolution": 0.0, "other": 0.05}
    mod.print_breakdown(f32, bf16, "bfloat16", 4)
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:7]}
    assert rows["attention"][1:] == ["100.0", "25%", "100.0", "40%", "1.00x"]
    assert rows["matmul"][-1] == "2.00x" and rows["convolution"][-1] == "-"
    assert rows["total"][1:] == ["400.0", "250.0", "1.60x"]
    # products at 2x, attention at 1x: all at 2x would give 2.00x; Amdahl 0.4 / (0.1 + 0.3 / 2) = 1.60x
    assert "the whole would be 2.00x" in out and "everything else at the products' ratio, 1.60x" in out


def test_repeats_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        _module().main(["--repeats", "0"])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err
