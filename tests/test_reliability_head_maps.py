"""results.json's reliability diagrams (`calm.evaluate.reliability`) and per-class head maps
(`calm.evaluate.head_maps`): what they record, checked against direct computations, and the
report.html sections drawn from them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from calm import CALM, SAV
from calm.classifiers import HeadClassifier
from calm.evaluate.estimators import LinearProbe, fewshot_methods
from calm.evaluate.head_maps import head_map_analyses, head_map_section, head_maps, head_weights
from calm.evaluate.metrics import calibration_bins, expected_calibration_error
from calm.evaluate.protocol import run_protocol
from calm.evaluate.reliability import reliability, reliability_markdown, reliability_section

torch.set_num_threads(1)


def _old_ece(conf, hits, n_bins=15):  # the formula before the bins were shared, kept as the reference
    conf, hits = np.asarray(conf, float), np.asarray(hits, float)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    return sum(
        (bins == b).sum() * abs(hits[bins == b].mean() - conf[bins == b].mean()) for b in np.unique(bins)
    ) / len(conf)


def test_calibration_bins_keep_the_ece():
    rng = np.random.default_rng(1)
    conf = np.r_[rng.random(500), 0.0, 1.0, 1 / 15, 2 / 15]  # edges: (i / n, (i + 1) / n], 0 in the first
    hits = rng.random(len(conf)) < conf
    index, count, mean_conf, acc = calibration_bins(conf, hits)
    assert count.sum() == len(conf) and index.min() == 0 and index.max() == 14
    assert (np.ceil(mean_conf * 15) - 1).astype(int).clip(0).tolist() == index.tolist()
    assert expected_calibration_error(conf, hits) == pytest.approx(_old_ece(conf, hits), abs=1e-15)


def _records(rng, method, shots, seeds, quality):
    out = []
    for seed in seeds:
        p = rng.uniform(0.3, 1.0, 40).round(4)
        right = rng.random(40) < p * quality
        y_true = rng.integers(0, 4, 40)
        out.append(
            {
                "method": method,
                "shots": shots,
                "seed": seed,
                "part": "fold5",
                "classes": list("abcd"),
                "query": list(range(40)),
                "y_true": y_true.tolist(),
                "y_pred": np.where(right, y_true, (y_true + 1) % 4).tolist(),
                "p_pred": p.tolist(),
                "p_true": p.tolist(),
            }
        )
    return out


def test_reliability_pools_the_seeds_and_skips_methods_without_probabilities():
    rng = np.random.default_rng(0)
    records = _records(rng, "calm", 5, range(3), 1.0) + _records(rng, "zero-shot", 5, range(3), 1.0)
    runs = [{"method": "calm", "shots": 5, "metrics": {"accuracy": 80.0, "ece": e}} for e in (5.0, 7.0, 9.0)]
    runs += [{"method": "zero-shot", "shots": 5, "metrics": {"accuracy": 50.0}}]
    (entry,) = reliability(runs, records)
    conf = np.concatenate([r["p_pred"] for r in records[:3]])
    right = np.concatenate([np.equal(r["y_pred"], r["y_true"]) for r in records[:3]])
    assert (entry["method"], entry["shots"], entry["n"]) == ("calm", 5, 120)
    assert entry["ece_pooled"] == pytest.approx(100 * expected_calibration_error(conf, right), rel=1e-3)
    assert entry["ece_episode"] == 7.0
    assert sum(b["count"] for b in entry["bins"]) == 120
    acc = sum(b["accuracy"] * b["count"] for b in entry["bins"]) / 120
    assert acc == pytest.approx(right.mean(), abs=1e-3)
    (line, _) = reliability_markdown([entry])
    assert f"calm 5-shot {entry['ece_pooled']:.1f} / 7.0" in line
    html = reliability_section({"reliability": [entry]}, {"calm": "CALM"})
    assert html.count("data:image/png;base64,") == 1 and ">CALM<" in html
    assert reliability_section({}, {}) == "" and reliability_markdown([]) == []


def _data(rng, n_classes=3, n=8, K=6, d=4):
    centres = rng.standard_normal((n_classes, K, d))
    y = np.repeat([f"c{i}" for i in range(n_classes)], n)
    X = centres[np.repeat(np.arange(n_classes), n)] + 0.8 * rng.standard_normal((n_classes * n, K, d))
    return X.astype(np.float32), y


def test_head_weights_and_maps_fold_the_fits():
    rng = np.random.default_rng(0)
    X, y = _data(rng)
    sav = SAV(k=2).fit(X, y)
    w = head_weights(sav, ["c2", "c0", "zz"])
    assert w.shape == (3, 6) and (w[2] == 0).all()
    assert np.flatnonzero(w[0]).tolist() == sorted(np.asarray(sav.heads_).tolist()) and w[0].max() == 0.5
    assert head_weights(LinearProbe().fit(X, y), ["c0"]) is None
    assert HeadClassifier.__dict__["selects_heads"] and SAV.selects_heads and CALM.selects_heads
    assert not LinearProbe.selects_heads
    fits = [
        head_weights(CALM(k=2).fit(X[rng.permutation(len(y))[:18]], y[:18]), ["c0", "c1", "c2"])
        for _ in range(4)
    ]
    (entry,) = head_maps({("calm", 3): fits}, ["c0", "c1", "c2"])
    stack = np.stack(fits)
    assert entry["heads"] == np.flatnonzero((stack > 0).any(axis=(0, 1))).tolist()
    kept, weight = np.asarray(entry["kept"]), np.asarray(entry["weight"])
    np.testing.assert_allclose(kept, (stack > 0).mean(0)[:, entry["heads"]], rtol=5e-3)
    np.testing.assert_allclose(weight, stack.mean(0)[:, entry["heads"]], rtol=5e-3)  # 3 significant digits
    assert head_map_analyses({}, ["c0"], []) == {}


def test_the_protocol_keeps_head_weights_where_asked_and_the_report_draws_them():
    rng = np.random.default_rng(0)
    X, y = _data(rng, n=10)
    meta = pd.DataFrame({"fold": np.tile([1, 2, 3, 4, 5], len(y) // 5)})
    methods = {m: v for m, v in fewshot_methods(k=2).items() if m in ("sav", "calm", "linear-probe")}
    res = run_protocol(
        X, y, meta, methods=methods, shots=[1, 3], seeds=[0, 1], keep_heads=lambda m, n: n == 3
    )
    assert sorted(res.head_weights) == [("calm", 3), ("sav", 3)]  # the probe has no heads
    assert all(len(v) == 2 and v[0].shape == (3, 6) for v in res.head_weights.values())
    names = [(layer, head, "encoder") for layer in range(2) for head in range(3)]
    analyses = head_map_analyses(res.head_weights, res.classes, names)
    assert analyses["head_names"][4] == [1, 1, "encoder"]
    results = {"analyses": analyses, "config": {"n_heads": 6}}
    html = head_map_section(results, {"calm": "CALM", "sav": "SAV"})
    assert html.count("data:image/png;base64,") == 1 and "Head maps" in html  # one figure, a panel a method
    assert head_map_section({"analyses": {}}, {}) == ""
    plain = run_protocol(X, y, meta, methods=methods, shots=[1], seeds=[0])
    assert plain.head_weights == {}
