"""Prediction skew (`calm.evaluate.skew`): predicted against true counts per class from the prediction
records, the skew figures, and where they show (results.json, results.md, report.html)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calm.evaluate import EvalConfig, run_evaluation
from calm.evaluate.predictions import confusions
from calm.evaluate.report_html import SECTIONS, ReportData, render_report
from calm.evaluate.reports import results_markdown
from calm.evaluate.skew import STARVED_RATIO, class_balance, prediction_skew
from tests.test_methods import store  # noqa: F401  (the fixture: a small store of a fake extractor)

torch.set_num_threads(1)
CLASSES = ["a", "b", "c", "d"]


def _record(seed: int, part: str, y_true: list[int], y_pred: list[int], method: str = "calm") -> dict:
    n = len(y_true)
    return {
        "method": method,
        "shots": 5,
        "seed": seed,
        "part": part,
        "classes": CLASSES,
        "query": list(range(n)),
        "y_true": y_true,
        "y_pred": y_pred,
        "p_pred": [None] * n,
        "p_true": [None] * n,
    }


def skewed_records() -> list[dict]:
    """4 queries of each class per seed (two parts of 2); class a swallows: seed 0 predicts a for
    a, b and half of c; seed 1 likewise but one d query gets no answer."""
    truth = [0, 0, 1, 1, 2, 2, 3, 3]
    s0 = [0, 0, 0, 0, 0, 2, 3, 3]
    s1 = [0, 0, 0, 0, 0, 2, 3, -1]
    return [
        _record(0, "p1", truth, s0),
        _record(0, "p2", truth, s0),
        _record(1, "p1", truth, s1),
        _record(1, "p2", truth, s1),
    ]


def test_known_skew_gives_the_expected_counts_and_figures():
    (conf,) = confusions(skewed_records())
    s = class_balance(conf)
    rows = {r["class"]: r for r in s["classes"]}
    assert [rows[c]["true"] for c in CLASSES] == [4, 4, 4, 4]
    # a: 10 of 16 per seed-half -> 10 per seed; c: 2; d: 4 (seed 0) and 2 (seed 1) -> 3; b never
    assert [rows[c]["predicted"] for c in CLASSES] == [10, 0, 2, 3]
    assert [rows[c]["ratio"] for c in CLASSES] == [2.5, 0.0, 0.5, 0.75]
    assert s["max_ratio"] == 2.5 and s["max_ratio_class"] == "a" and s["max_ratio_per_seed"] == 2.5
    assert s["starved"] == ["b"] and s["starved_share"] == 0.25
    assert s["n_seeds"] == 2 and (s["method"], s["shots"]) == ("calm", 5)


def test_balanced_predictions_have_no_skew_and_unqueried_classes_are_left_out():
    truth = [0, 1, 2, 0, 1, 2]
    (conf,) = confusions([_record(0, "p", truth, truth)])
    s = class_balance(conf)
    assert s["max_ratio"] == 1.0 and s["starved"] == [] and s["starved_share"] == 0.0
    assert s["classes"][3] == {"class": "d", "true": 0.0, "predicted": 0.0, "ratio": None}


def test_per_seed_skew_sees_a_different_class_swallowing_each_seed():
    truth = [0, 0, 1, 1]
    records = [_record(0, "p", truth, [0, 0, 0, 0]), _record(1, "p", truth, [1, 1, 1, 1])]
    s = class_balance(confusions(records)[0])
    assert s["max_ratio"] == 1.0 and s["max_ratio_per_seed"] == 2.0 and s["starved"] == []


def test_starved_threshold_is_strict():
    # class b predicted exactly STARVED_RATIO x its true count: not starved
    truth = [1, 1, 1, 1, 0, 0, 0, 0]
    pred = [1, 0, 0, 0, 0, 0, 0, 0]
    (conf,) = confusions([_record(0, "p", truth, pred)])
    assert conf.counts[:, 1].sum() / 4 == STARVED_RATIO
    assert class_balance(conf)["starved"] == []


def test_markdown_and_report_show_the_skew():
    records = skewed_records() + [
        {**r, "method": "sav", "y_pred": r["y_true"]} for r in skewed_records() if r["seed"] == 0
    ]
    confs = confusions(records)
    skew = prediction_skew(confs)
    assert [(s["method"], s["max_ratio"]) for s in skew] == [("calm", 2.5), ("sav", 1.0)]
    results = {"config": {}, "summary": [], "prediction_skew": skew}
    md = results_markdown(results, confs)
    assert "## Prediction skew" in md and "| CALM | 5 | 2.50 (a) | 2.50 | 25 % (b) |" in md
    assert "| SAV | 5 | 1.00 (a) | 1.00 | 0 % |" in md
    page = render_report(ReportData(results, records, command="calm evaluate"), ".")
    assert [s.anchor for s in SECTIONS].index("skew") < [s.anchor for s in SECTIONS].index("misclassified")
    section = page.split('<h2 id="skew">')[1].split("<h2")[0]
    assert 'data-method="calm" data-shots="5">2.50<' in section
    assert "10.0 / 4.0" in section and '<td class="l">b</td>' in section
    assert '<a href="#skew">prediction skew</a>' in page


def test_report_without_predictions_has_no_skew_section():
    page = render_report(ReportData({"config": {}, "summary": []}, command="calm evaluate"), ".")
    assert 'id="skew"' not in page


def test_run_evaluation_writes_the_skew(store, tmp_path):  # noqa: F811
    folder, _, _ = store
    config = EvalConfig(
        out=tmp_path / "run", features=folder, shots=[2], seeds=[0, 1], methods=["sav", "calm"]
    )
    result = run_evaluation(config)
    doc = json.loads(result.results_json.read_text())
    skew = doc["prediction_skew"]
    assert [(s["method"], s["shots"], s["n_seeds"]) for s in skew] == [("sav", 2, 2), ("calm", 2, 2)]
    for s, conf in zip(skew, confusions(result.protocol.predictions), strict=True):
        n = len(conf.classes)
        assert [r["predicted"] for r in s["classes"]] == pytest.approx(conf.counts[:, :n].sum(0).tolist())
        assert [r["true"] for r in s["classes"]] == pytest.approx(conf.counts.sum(1).tolist())
        ratios = [r["ratio"] for r in s["classes"]]
        assert s["max_ratio"] == max(ratios) and np.isclose(sum(r["predicted"] for r in s["classes"]), 3 * 3)
    assert "## Prediction skew" in result.results_md.read_text()
    assert '<h2 id="skew">' in result.report_html.read_text()
