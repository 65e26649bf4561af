"""Self-training in the evaluation protocol: pools from the training part only, transductive variant,
per-episode reports and summaries, on synthetic features with row ids."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from calm import CALM
from calm.evaluate import (
    Method,
    ProtocolError,
    build_results,
    episodes,
    holdout_split,
    make_parts,
    results_markdown,
)
from calm.evaluate.protocol import run_protocol
from calm.evaluate.self_training_runs import STSpec, run_st_protocol, st_pool, st_summary, st_table
from tests.test_cli_eval import FREQS, fake_model, tone  # noqa: F401 (fake_model: the fake-tones model)

torch.set_num_threads(1)


def synthetic(n_classes=4, per_class=20, K=6, d=8, folds=5, seed=0, noise=1.5, split=False):
    """Clustered features (n, K, d) with row ids in X[:, 0, 0]; folds 1..folds (or an official split)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, K, d))
    y = np.repeat([f"c{i}" for i in range(n_classes)], per_class)
    X = centres[np.repeat(np.arange(n_classes), per_class)] + noise * rng.normal(size=(len(y), K, d))
    X[:, 0, 0] = np.arange(len(y))  # row id, for the spy
    fold = np.tile(np.arange(1, folds + 1), len(y) // folds)
    meta = pd.DataFrame({"path": [f"/a/{i}.wav" for i in range(len(y))], "label": y, "fold": fold})
    if split:
        meta["fold"] = None
        meta["split"] = np.where(fold == 1, "test", np.where(fold == 2, "dev", "train"))
    else:
        meta["split"] = None
    return X.astype(np.float32), y, meta


class SpyCALM(CALM):
    """CALM that records the row ids (feature [0, 0]) of every clip it is fitted on."""

    seen: list = []

    def fit(self, X, y):
        SpyCALM.seen.append(np.asarray(X)[:, 0, 0].astype(int))
        return super().fit(X, y)


def spy_methods():
    return {"calm": Method("calm", lambda **p: SpyCALM(**p), {"k": 0.5})}


@pytest.mark.parametrize("split", [False, True])
def test_inductive_pool_is_training_clips_outside_support_never_a_test_clip(split):
    X, y, meta = synthetic(split=split)
    parts, _ = make_parts(meta, 5)
    for ep in episodes(y, parts, [1, 3], range(4)):
        part = parts[0]
        pool = st_pool(part, ep, None)
        assert set(pool) == set(part.train) - set(ep.support)
        assert not set(pool) & set(part.test) and not set(pool) & set(ep.query)
        if split:  # dev clips are not training clips
            assert not set(pool) & set(np.flatnonzero(meta["split"] == "dev"))
        capped = st_pool(part, ep, 10)
        assert len(capped) == 10 and set(capped) <= set(pool)
        assert set(st_pool(part, ep, 5)) <= set(capped)  # a smaller pool: prefix of the same permutation
        np.testing.assert_array_equal(capped, st_pool(part, ep, 10))
        np.testing.assert_array_equal(st_pool(part, ep, None, transductive=True), np.sort(ep.query))


def test_pool_is_drawn_with_the_episode_seed():
    X, y, meta = synthetic()
    parts, _ = make_parts(meta, 5)
    a, b = episodes(y, parts, [1], [0, 1])
    assert not np.array_equal(st_pool(parts[0], a, 10), st_pool(parts[0], b, 10))


def test_no_fit_ever_sees_a_test_clip_inductively_and_the_transductive_one_does():
    X, y, meta = synthetic()
    parts, _ = make_parts(meta, 5)
    test = set(parts[0].test)
    SpyCALM.seen = []
    spec = STSpec(rounds=2, per_round=3)
    runs = run_st_protocol(
        X, y, meta, methods={"calm+st": spy_methods()["calm"]}, spec=spec, shots=[1, 3], seeds=[0, 1]
    )
    assert len(runs) == 4 and SpyCALM.seen
    assert all(not set(rows) & test for rows in SpyCALM.seen)
    assert max(len(rows) for rows in SpyCALM.seen) > 4  # pseudo-labelled clips were added
    SpyCALM.seen = []
    run_st_protocol(
        X, y, meta, methods={"calm+st-trans": spy_methods()["calm"]}, spec=spec, shots=[1], seeds=[0]
    )
    assert any(set(rows) & test for rows in SpyCALM.seen)


def test_without_a_split_the_inductive_pool_is_empty_and_says_use_trans():
    X, y, meta = synthetic()
    meta["fold"] = None
    spec = STSpec()
    with pytest.raises(ProtocolError, match="st-trans"):
        run_st_protocol(
            X, y, meta, methods={"calm+st": spy_methods()["calm"]}, spec=spec, shots=[1], seeds=[0]
        )
    runs = run_st_protocol(
        X, y, meta, methods={"calm+st-trans": spy_methods()["calm"]}, spec=spec, shots=[1], seeds=[0]
    )
    assert runs[0]["self_training"]["pool"] == runs[0]["n_query"] == len(y) - 4


def test_holdout_split_is_seeded_per_class_and_only_for_data_without_a_split():
    X, y, meta = synthetic(per_class=10)
    meta["fold"] = None
    held = holdout_split(meta, y, 0.3)
    assert meta["split"].isna().all()  # the input is not modified
    for c in np.unique(y):
        assert (held["split"][y == c] == "test").sum() == 3 and (held["split"][y == c] == "train").sum() == 7
    np.testing.assert_array_equal(held["split"], holdout_split(meta, y, 0.3)["split"])
    assert not np.array_equal(held["split"], holdout_split(meta, y, 0.3, seed=1)["split"])
    assert held.attrs["holdout"] == {"fraction": 0.3, "seed": 0}
    tiny = holdout_split(meta.iloc[[0, 10, 11]].reset_index(drop=True), y[[0, 10, 11]], 0.1)
    assert tiny["split"].tolist() == ["train", "test", "train"] or tiny["split"].tolist() == [
        "train",
        "train",
        "test",
    ]
    for bad in (0.0, 1.0):
        with pytest.raises(ProtocolError, match="fraction"):
            holdout_split(meta, y, bad)
    for folded in (synthetic()[2], synthetic(split=True)[2]):
        with pytest.raises(ProtocolError, match="already has a split"):
            holdout_split(folded, y, 0.3)


def test_holdout_gives_an_inductive_pool_and_the_same_queries_to_every_method():
    X, y, meta = synthetic(per_class=10)
    meta["fold"] = None
    held = holdout_split(meta, y, 0.3)
    test = set(np.flatnonzero(held["split"] == "test"))
    SpyCALM.seen = []
    spec = STSpec(rounds=2, per_round=2)
    base = run_protocol(X, y, held, methods=spy_methods(), shots=[1, 5], seeds=[0, 1])
    runs = run_st_protocol(
        X, y, held, methods={"calm+st": spy_methods()["calm"]}, spec=spec, shots=[1, 5], seeds=[0, 1]
    )
    assert all(not set(rows) & test for rows in SpyCALM.seen)
    for a, b in zip(base.runs, runs, strict=True):
        assert a["n_query"] == b["n_query"] == len(test) == 12
        assert b["self_training"]["pool"] == 4 * (7 - a["n_support"] // 4)


def test_report_per_episode_and_summary_and_markdown():
    X, y, meta = synthetic()
    methods = {"calm": Method("calm", lambda **p: CALM(**p), {"k": 0.5})}
    spec = STSpec(rounds=2, per_round=2, pool=30)
    base = run_protocol(X, y, meta, methods=methods, shots=[1, 3], seeds=[0, 1, 2])
    runs = run_st_protocol(
        X, y, meta, methods={"calm+st": methods["calm"]}, spec=spec, shots=[1, 3], seeds=[0, 1, 2]
    )
    for r in runs:
        st = r["self_training"]
        assert st["pool"] == st["pool_drawn"] == 30 and st["rounds"] == 2
        assert st["pseudo_labelled"] == sum(st["added_per_class"].values()) <= 2 * 2 * 4
        assert all(n <= 4 for n in st["added_per_class"].values())
        right = sum(v["right"] for v in st["per_class"].values())
        assert st["pseudo_accuracy"] == pytest.approx(100 * right / st["pseudo_labelled"])
        assert set(st["per_class"]) == {"c0", "c1", "c2", "c3"}
        assert all(0 <= v["query_recall_without_st"] <= 100 for v in st["per_class"].values())
        assert r["params"]["st_rounds"] == 2 and r["params"]["k"] == 0.5
    result = base
    result.runs = base.runs + runs
    doc = build_results(result, {"model": "m", "dataset": "d", "n_seeds": 3})
    summary = {(s["method"], s["shots"]): s for s in doc["self_training_summary"]}
    assert set(summary) == {("calm+st", 1), ("calm+st", 3)}
    assert summary[("calm+st", 1)]["pool"] == 30 and summary[("calm+st", 1)]["episodes"] == 3
    assert {(p["a"], p["b"]) for p in doc["paired"]} == {("calm", "calm+st")}
    md = results_markdown(doc)
    assert "## Self-training" in md and "| calm+st | 1 | 30 |" in md and "CALM+ST" in md
    assert st_summary(base.runs[:3]) == []


def test_default_spec_draws_the_pool_per_episode_and_max_labelled_stops_self_training():
    X, y, meta = synthetic(per_class=40)
    assert STSpec().params() == {
        "st_rounds": 5,
        "st_per_round": 5,
        "st_confidence": "margin",
        "st_labelled_weight": "shots",
        "st_max_labelled": None,
        "st_spread": 1,
        "st_pool_per_class": 30,
        "st_guard": "cv",
    }
    methods = {"calm": Method("calm", lambda **p: CALM(**p), {"k": 0.5})}
    runs = run_st_protocol(
        X, y, meta, methods={"calm+st": methods["calm"]}, spec=STSpec(), shots=[1], seeds=[0, 1]
    )
    for r in runs:
        assert r["self_training"]["pool"] == 4 * 31 and r["self_training"]["pool_drawn"] == 4 * 30
    spec = STSpec(pool_per_class=5)
    lab = np.arange(0, len(y), 40)  # one clip a class
    rest = np.setdiff1d(np.arange(len(y)), lab)
    a, b = (spec.wrap(CALM(k=0.5), seed).fit(X[lab], y[lab], X[rest]).pool_index_ for seed in (0, 1))
    assert len(a) == 4 * 5 and not np.array_equal(a, b)  # drawn with the episode's seed
    base = run_protocol(X, y, meta, methods=methods, shots=[3, 5], seeds=[0, 1])
    gated = run_st_protocol(
        X,
        y,
        meta,
        methods={"calm+st": methods["calm"]},
        spec=STSpec(max_labelled=3),
        shots=[3, 5],
        seeds=[0, 1],
    )
    for a_run, b_run in zip(base.runs, gated, strict=True):
        st = b_run["self_training"]
        if a_run["shots"] == 5:
            assert st["pseudo_labelled"] == 0 and st["rounds"] == 0 and a_run["metrics"] == b_run["metrics"]
        else:
            assert st["pseudo_labelled"] > 0 and st["rounds"] >= 1


def test_same_support_and_queries_as_the_few_shot_protocol():
    X, y, meta = synthetic()
    methods = {"calm": Method("calm", lambda **p: CALM(**p), {"k": 0.5})}
    base = run_protocol(X, y, meta, methods=methods, shots=[3], seeds=[0, 1])
    runs = run_st_protocol(
        X, y, meta, methods={"calm+st": methods["calm"]}, spec=STSpec(rounds=0), shots=[3], seeds=[0, 1]
    )
    for a, b in zip(base.runs, runs, strict=True):  # zero rounds: exactly CALM on the same episode
        assert (a["seed"], a["n_support"], a["n_query"]) == (b["seed"], b["n_support"], b["n_query"])
        assert a["metrics"] == b["metrics"]


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def tone_dir(tmp_path):
    root = tmp_path / "tones"
    for ci, (name, f) in enumerate(FREQS.items()):
        for i in range(8):
            tone(root / name / f"{i}.wav", f, seed=100 * ci + i)
    return root


def test_cli_self_training_methods_end_to_end(tmp_path, tone_dir):
    from click.testing import CliRunner

    from calm.cli import main

    manifest = tmp_path / "manifest.csv"
    rows = ["path,label,split"]
    for wav in sorted(tone_dir.rglob("*.wav")):
        split = "test" if int(wav.stem) >= 6 else "train"
        rows.append(f"{wav.relative_to(tmp_path)},{wav.parent.name},{split}")
    manifest.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    args = [
        "evaluate",
        "--model",
        "fake-tones",
        "--data",
        f"csv:{manifest}",
        "--shots",
        "1,3",
        "--seeds",
        "3",
    ]
    args += ["--methods", "calm+st,calm,calm+st-trans", "--no-figures", "--no-progress", "--out", str(run)]
    res = CliRunner().invoke(main, [*args, "--st-pool", "4", "--st-rounds", "2", "--st-per-round", "1"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads((run / "results.json").read_text())
    st_runs = [r for r in doc["runs"] if r["method"] == "calm+st"]
    assert len(st_runs) == 6 and all(r["self_training"]["pool"] == 4 for r in st_runs)
    assert all(r["self_training"]["pseudo_labelled"] <= 2 * 3 for r in st_runs)
    trans = [r for r in doc["runs"] if r["method"] == "calm+st-trans"]
    assert all(r["self_training"]["pool"] == 4 for r in trans)  # --st-pool caps both settings
    assert doc["config"]["defaults"]["calm+st"]["st_rounds"] == 2
    assert {("calm+st", "calm"), ("calm", "calm+st-trans")} <= {(p["a"], p["b"]) for p in doc["paired"]}
    assert {s["method"] for s in doc["self_training_summary"]} == {"calm+st", "calm+st-trans"}
    assert "## Self-training" in (run / "results.md").read_text()


def _evaluate_args(tone_dir, *, shots: str, seeds: str) -> list[str]:
    """`calm evaluate` on the tone folder with the fake extractor, before the method options."""
    return [
        "evaluate",
        "--model",
        "fake-tones",
        "--data",
        f"folder:{tone_dir}",
        "--shots",
        shots,
        "--seeds",
        seeds,
    ]


def test_cli_inductive_self_training_without_a_split_is_a_one_line_error(tmp_path, tone_dir):
    from click.testing import CliRunner

    from calm.cli import main

    args = _evaluate_args(tone_dir, shots="1", seeds="1")
    res = CliRunner().invoke(
        main, [*args, "--methods", "calm,calm+st", "--no-progress", "--out", str(tmp_path / "r")]
    )
    assert res.exit_code != 0 and "calm+st-trans" in res.output
    assert "Traceback" not in res.output


def test_cli_holdout_runs_inductive_self_training_on_data_without_a_split(tmp_path, tone_dir):
    from click.testing import CliRunner

    from calm.cli import main

    args = _evaluate_args(tone_dir, shots="1,3", seeds="2")
    args += ["--methods", "calm,calm+st", "--holdout", "0.25", "--no-figures", "--no-progress"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    assert doc["config"]["holdout"] == 0.25
    n_classes = len(FREQS)
    assert {r["n_query"] for r in doc["runs"]} == {2 * n_classes}  # 2 of 8 clips a class held out
    pools = {r["shots"]: r["self_training"]["pool"] for r in doc["runs"] if r["method"] == "calm+st"}
    assert pools == {1: 5 * n_classes, 3: 3 * n_classes}
    assert {(p["a"], p["b"]) for p in doc["paired"]} == {("calm", "calm+st")}


def test_cli_schedule_options_reach_the_runs_and_bad_values_are_usage_errors(tmp_path, tone_dir):
    from click.testing import CliRunner

    from calm.cli import main

    args = _evaluate_args(tone_dir, shots="1", seeds="1")
    args += ["--methods", "calm,calm+st", "--holdout", "0.25", "--no-figures", "--no-progress"]
    old = ["--st-labelled-weight", "1", "--st-max-labelled", "none", "--st-spread", "2"]
    res = CliRunner().invoke(main, [*args, *old, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads((tmp_path / "r" / "results.json").read_text())
    params = next(r["params"] for r in doc["runs"] if r["method"] == "calm+st")
    assert (params["st_labelled_weight"], params["st_max_labelled"], params["st_spread"]) == (1, None, 2)
    assert params["st_guard"] == "cv"
    res = CliRunner().invoke(main, [*args, "--st-guard", "none", "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads((tmp_path / "g" / "results.json").read_text())
    run = next(r for r in doc["runs"] if r["method"] == "calm+st")
    assert run["params"]["st_guard"] is None and run["self_training"]["guard"] is None
    bad_values = (["--st-labelled-weight", "0"], ["--st-labelled-weight", "x"], ["--st-max-labelled", "0"])
    for bad in (*bad_values, ["--st-guard", "loo"]):
        res = CliRunner().invoke(main, [*args, *bad, "--out", str(tmp_path / "bad")])
        assert res.exit_code == 2 and "Traceback" not in res.output


def test_each_run_records_the_guards_decision_and_results_md_counts_the_stops():
    X, y, meta = synthetic(per_class=40)
    methods = {"calm+st": Method("calm", lambda **p: CALM(**p), {"k": 0.5})}
    runs = run_st_protocol(X, y, meta, methods=methods, spec=STSpec(), shots=[1, 3], seeds=[0, 1, 2])
    for r in runs:
        g = r["self_training"]["guard"]
        assert g["guard"] == "cv" and g["rounds_allowed"] in (0, 5)
        if r["shots"] == 1:
            assert (g["estimable"], g["folds"], g["cv_accuracy"], g["rounds_allowed"]) == (False, 0, None, 5)
        else:
            assert g["estimable"] and g["folds"] == 3 and len(g["cv_accuracy"]) == 6
            assert all(0 <= a <= 1 for a in g["cv_accuracy"])
            stopped = g["cv_accuracy"][-1] < g["cv_accuracy"][0]
            assert g["rounds_allowed"] == (0 if stopped else 5)
            assert r["self_training"]["rounds"] == (0 if stopped else 5)
            assert (r["self_training"]["pseudo_labelled"] == 0) == stopped
    summary = {s["shots"]: s for s in st_summary(runs)}
    assert (summary[1]["guarded"], summary[1]["guard_estimable"], summary[1]["guard_stopped"]) == (3, 0, 0)
    n_stopped = sum(r["self_training"]["rounds"] == 0 for r in runs if r["shots"] == 3)
    assert (summary[3]["guard_estimable"], summary[3]["guard_stopped"]) == (3, n_stopped)
    md = "\n".join(st_table(st_summary(runs)))
    assert "| guard stopped |" in md and "cannot judge (1 clip a class) |" in md
    assert f"| {n_stopped} of 3 |" in md
    unguarded = run_st_protocol(X, y, meta, methods=methods, spec=STSpec(guard=None), shots=[3], seeds=[0])
    assert unguarded[0]["self_training"]["guard"] is None
    assert st_summary(unguarded)[0]["guarded"] == 0 and st_table(st_summary(unguarded))[-1].endswith("| - |")
