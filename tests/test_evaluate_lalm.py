"""zero-shot, sav+pl and calm+pl in the evaluation protocol (scripted model answers) and in
`calm evaluate` end to end on a tiny random Qwen2-Audio."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from calm import evaluate as ev
from calm.answering import clips
from calm.answering.pseudolabel import pseudo_label
from calm.evaluate import ProtocolError
from tests.test_evaluate import synthetic

CLASSES = ["c0", "c1", "c2"]


def scripted_pseudo_labels(y, script):
    """A `pseudo_label(rows)` callback whose sampler answers `script[true label]` for every row."""

    def sampler(rows, temperatures):
        return [list(script[y[r]])[: temperatures.shape[1]] for r in rows]

    return lambda rows: pseudo_label(sampler, list(rows), CLASSES, rollouts=4, option_labels=["A", "B", "C"])


def test_class_without_kept_clips_counts_as_wrong_not_dropped():
    X, y, meta = synthetic(n_classes=3, per_class=10, noise=0.05)
    script = {"c0": ["c0"] * 4, "c1": ["B", "B", "b", "rain"], "c2": ["piano", "C", "A", "?"]}
    res = ev.run_lalm_protocol(
        X,
        y,
        meta,
        methods=["sav+pl", "calm+pl"],
        shots=[1, 2],
        seeds=[0, 1],
        test_fold=5,
        pseudo_label=scripted_pseudo_labels(y, script),
        fewshot=ev.fewshot_methods(k=0.5),
        pl_pool_size=12,
    )
    assert len(res.runs) == 2 * 2 * 2
    (part,), _ = ev.make_parts(meta, 5)
    for run in res.runs:
        rep = run["pseudo_labels"]
        pool = res.pools[(run["shots"], run["seed"], run["part"])]
        assert len(pool) == 12 and set(pool) <= set(part.train)
        assert rep["pool"] == 12 and rep["missing_classes"] == ["c2"] and rep["kept_per_class"]["c2"] == 0
        assert (
            rep["kept"] == sum(y[pool] != "c2") == rep["kept_per_class"]["c0"] + rep["kept_per_class"]["c1"]
        )
        assert rep["label_accuracy_kept"] == 100.0 and rep["label_accuracy_pool"] < 100.0
        assert run["n_query"] == 6 and run["n_support"] == rep["kept"]
        # c0 and c1 queries right (well separated), the two c2 queries wrong: 4 of 6, not 4 of 4
        assert run["metrics"]["accuracy"] == pytest.approx(100 * 4 / 6)
        assert "['c2']" in run["warnings"][0] and "2 query clip(s) count as wrong" in run["warnings"][0]
    assert len(res.warnings) == 4  # one per episode, not one per method


def test_single_or_no_kept_class_predicts_what_it_can():
    X, y, meta = synthetic(n_classes=3, per_class=10, noise=0.05)
    only_c0 = {"c0": ["A"] * 4, "c1": ["x"] * 4, "c2": ["y"] * 4}
    res = ev.run_lalm_protocol(
        X,
        y,
        meta,
        methods=["calm+pl"],
        shots=[1],
        seeds=[0],
        test_fold=5,
        pseudo_label=scripted_pseudo_labels(y, only_c0),
        fewshot=ev.fewshot_methods(),
        pl_pool_size=24,
    )
    (run,) = res.runs
    assert (
        run["metrics"]["accuracy"] == pytest.approx(100 * 2 / 6)
        and "nothing to fit" in run["tuning"]["reason"]
    )
    nothing = {c: ["?"] * 4 for c in CLASSES}
    res = ev.run_lalm_protocol(
        X,
        y,
        meta,
        methods=["sav+pl"],
        shots=[1],
        seeds=[0],
        test_fold=5,
        pseudo_label=scripted_pseudo_labels(y, nothing),
        fewshot=ev.fewshot_methods(),
    )
    (run,) = res.runs
    assert run["metrics"]["accuracy"] == 0.0 and run["n_query"] == 6 and run["pseudo_labels"]["kept"] == 0
    assert run["pseudo_labels"]["pool"] == 3  # default pool: shots x classes


def test_zero_shot_scores_each_seeds_own_queries_once_computed():
    X, y, meta = synthetic(n_classes=3, per_class=5)
    meta = meta.drop(columns=["fold"])  # no split: queries = every clip outside the seed's support
    calls = []

    def zero_shot(rows):
        calls.append(rows)
        return [y[r] if r % 3 else None for r in rows], None  # every third row: unparsed answer

    res = ev.run_lalm_protocol(
        X,
        y,
        meta,
        methods=["zero-shot"],
        shots=[1, 2],
        seeds=[0, 1, 2],
        zero_shot=zero_shot,
        zero_shot_params={"mode": "generate"},
    )
    assert len(calls) == 1 and len(res.runs) == 6
    parts, _ = ev.make_parts(meta, 5)
    eps = ev.episodes(y, parts, [1, 2], [0, 1, 2])
    queries = set()
    for ep, run in zip(eps, res.runs, strict=True):
        assert (run["shots"], run["seed"]) == (ep.shots, ep.seed) and run["n_query"] == len(ep.query)
        assert run["metrics"]["accuracy"] == pytest.approx(100 * np.mean(ep.query % 3 != 0))
        assert run["n_unparsed"] == int(np.sum(ep.query % 3 == 0)) and run["params"] == {"mode": "generate"}
        queries |= set(ep.query.tolist())
    assert sorted(queries) == calls[0].tolist()
    assert len({tuple(ep.query) for ep in eps}) > 1  # the seeds really have different query sets


def test_pl_pool_seeded_nested_outside_queries():
    X, y, meta = synthetic(n_classes=3, per_class=10)
    labels = ev.row_labels(y)
    (part,), _ = ev.make_parts(meta, 5)
    ep = ev.sample_episode(labels, part, 1, 0)
    a, b = ev.pl_pool(part, ep, 5, seed=0), ev.pl_pool(part, ep, 10, seed=0)
    assert set(a) <= set(b) <= set(part.train) and np.array_equal(a, ev.pl_pool(part, ep, 5, seed=0))
    assert not np.array_equal(b, ev.pl_pool(part, ep, 10, seed=1))
    with pytest.raises(ProtocolError, match="only 24 training clips"):
        ev.pl_pool(part, ep, 25, seed=0)
    (nosplit,), _ = ev.make_parts(meta.drop(columns=["fold"]))
    ep2 = ev.sample_episode(labels, nosplit, 2, 0)
    assert set(ev.pl_pool(nosplit, ep2, 6, seed=0)) == set(ep2.support)  # never a query clip


class FakeExtractor:
    key = {"model": "fake"}

    def load_input(self, path):
        return path


def test_zero_shot_cache_asks_each_clip_once(tmp_path, monkeypatch):
    import calm.answering.zeroshot

    asked = []

    def fake_zero_shot(model, inputs, classes, **kw):
        asked.extend(inputs)
        scores = np.array([[float(len(p)), 0.0] for p in inputs])
        preds = [classes[int(np.argmax(s))] for s in scores]
        prompt = kw["prompt"].text
        return calm.answering.zeroshot.ZeroShotResult(preds, scores, 0, None, tuple(classes), prompt)

    monkeypatch.setattr(calm.answering.zeroshot, "zero_shot", fake_zero_shot)
    cache = tmp_path / "zs.json"
    first = clips.zero_shot_clips(FakeExtractor(), ["a", "bb"], ["x", "y"], cache=cache)
    again = clips.zero_shot_clips(FakeExtractor(), ["bb", "ccc", "a"], ["x", "y"], cache=cache, chunk=1)
    assert asked == ["a", "bb", "ccc"] and first.predictions == ["x", "x"]
    np.testing.assert_array_equal(again.scores[:, 0], [2.0, 3.0, 1.0])
    clips.zero_shot_clips(FakeExtractor(), ["a"], ["x", "z"], cache=cache)  # other classes: asked again
    assert asked[-1] == "a" and len(asked) == 4


# ---------------------------------------------------------------- end to end on a tiny Qwen2-Audio

SR = 16000
TONES = {"low": 300.0, "mid": 900.0, "high": 2100.0}


@pytest.fixture(scope="module")
def tiny_lalm_dir(tmp_path_factory):
    from tests.helpers.tiny_models import save_pretrained, tiny_qwen2_audio

    model, processor = tiny_qwen2_audio(num_layers=2)
    return save_pretrained(model, processor, tmp_path_factory.mktemp("tiny") / "qwen2-audio")


def write_tones(root: Path) -> Path:
    """3 classes x 5 tones of 0.5 s; clips 0-2 train, 3-4 test (manifest with a split column)."""
    rows = ["path,label,split"]
    t = np.arange(SR // 2) / SR
    for ci, (name, freq) in enumerate(TONES.items()):
        for i in range(5):
            noise = 0.05 * np.random.default_rng(10 * ci + i).standard_normal(len(t))
            path = root / name / f"{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32), SR)
            rows.append(f"{name}/{i}.wav,{name},{'train' if i < 3 else 'test'}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


@pytest.mark.slow
def test_calm_evaluate_with_zero_shot_and_pseudo_labels(tmp_path, tiny_lalm_dir):
    from calm.answering.zeroshot import zero_shot
    from calm.cli import main
    from calm.models import load_extractor

    manifest = write_tones(tmp_path / "tones")
    run = tmp_path / "run"
    methods = ["sav", "calm", "zero-shot", "sav+pl", "calm+pl"]
    res = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--model",
            str(tiny_lalm_dir),
            "--data",
            f"csv:{manifest}",
            "--shots",
            "1",
            "--seeds",
            "2",
            "--methods",
            ",".join(methods),
            "--pl-rollouts",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(run),
            "--no-figures",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    doc = json.loads((run / "results.json").read_text())
    assert doc["config"]["methods"] == methods and not doc.get("skipped_methods")
    assert [s["method"] for s in doc["summary"] if s["metric"] == "accuracy"] == methods
    assert all(0 <= s["mean"] <= 100 and s["n_seeds"] == 2 for s in doc["summary"])
    runs = {(r["method"], r["seed"]): r for r in doc["runs"]}
    assert set(runs) == {(m, s) for m in methods for s in (0, 1)}
    assert all(r["n_query"] == 6 for r in doc["runs"])  # every method: the same 6 test clips
    zs = doc["config"]["zero_shot"]
    assert zs["mode"] == "letters" and zs["clips"] == 6 and zs["n_unparsed"] == 0
    cache = json.loads((run / "pseudo_labels.json").read_text())["clips"]
    for seed in (0, 1):
        for m in ("sav+pl", "calm+pl"):
            rep = runs[(m, seed)]["pseudo_labels"]
            assert rep["pool"] == 3 and rep["rollouts"] == 3 and set(rep["kept_per_class"]) == set(TONES)
            assert rep["kept"] == sum(rep["kept_per_class"].values()) == runs[(m, seed)]["n_support"]
            assert rep["label_accuracy_pool"] is not None and 0 <= rep["label_accuracy_pool"] <= 100
        assert runs[("sav+pl", seed)]["pseudo_labels"] == runs[("calm+pl", seed)]["pseudo_labels"]
    assert 3 <= len(cache) <= 6 and all(int(Path(p).stem) < 3 for p in cache)  # training clips only
    assert all(len(e["answers"]) == 3 for e in cache.values())
    assert all(1.0 <= t < 2.5 for e in cache.values() for t in e["temperatures"])
    assert "Pseudo-labels" in (run / "results.md").read_text()

    # the cached zero-shot predictions are those of a direct zero_shot call on the same clips
    cached = json.loads((run / "zero_shot.json").read_text())["clips"]
    extractor = load_extractor(str(tiny_lalm_dir))
    paths = sorted(cached)
    direct = zero_shot(extractor, [extractor.load_input(p) for p in paths], doc["config"]["classes"])
    assert [cached[p]["prediction"] for p in paths] == direct.predictions
    np.testing.assert_allclose([cached[p]["scores"] for p in paths], direct.scores, atol=1e-4)
    assert {Path(p).parent.name for p in paths} == set(TONES) and all(int(Path(p).stem) >= 3 for p in paths)
    acc = 100 * np.mean([cached[p]["prediction"] == Path(p).parent.name for p in paths])
    assert np.mean([runs[("zero-shot", s)]["metrics"]["accuracy"] for s in (0, 1)]) == pytest.approx(acc)
