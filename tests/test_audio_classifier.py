"""calm.AudioClassifier: clips in, labels out (inputs, parameters, files, cache, errors, calm predict)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.base import clone

import calm
from calm.audio import load_audio
from calm.audio_classifier import AudioClassifier, ClipError, ClipWarning, head_classifier
from calm.audio_inputs import as_inputs, prepare_wave
from tests.helpers import shared_data

N_SUPPORT = 3  # clips per class (2 classes) for the real-audio tests


def test_inputs_paths_tuples_arrays_and_dicts(tmp_path):
    wave = np.sin(np.linspace(0, 100, 8000)).astype(np.float32)
    clips = as_inputs(
        [
            "a.wav",
            tmp_path / "b.wav",
            (wave, 8000),
            {"array": wave, "sampling_rate": 8000, "path": "c.wav"},
            {"path": "d.wav", "array": None},
            wave,
        ],
        sample_rate=8000,
    )
    assert [c.name for c in clips] == ["a.wav", str(tmp_path / "b.wav"), "X[2]", "c.wav", "d.wav", "X[5]"]
    assert [c.path is not None for c in clips] == [True, True, False, False, True, False]
    assert clips[2].rate == clips[3].rate == clips[5].rate == 8000
    batch = as_inputs(np.stack([wave, wave]), sample_rate=8000)  # 2-D: one clip per row
    assert len(batch) == 2 and batch[1].name == "X[1]"
    # an item that is not audio is that clip's error, never the others'
    bad = as_inputs(["a.wav", wave, {"bytes": b""}, 3])
    assert bad[0].name == "a.wav" and all(isinstance(b, ClipError) for b in bad[1:])
    assert [str(b) for b in bad[1:]] == [
        "X[1]: a bare waveform needs sample_rate= (or pass (array, sample_rate))",
        "X[2]: an audio dict needs 'array' and 'sampling_rate', or 'path'",
        "X[3]: int is not audio (use a path, (array, sample_rate) or an audio dict)",
    ]
    with pytest.raises(ValueError, match="one waveform"):
        as_inputs(wave)


def test_waveforms_are_checked_mixed_down_resampled_and_cut():
    rng = np.random.default_rng(0)
    stereo = (0.1 * rng.standard_normal((2, 32000))).astype(np.float32)
    (clip,) = as_inputs([(stereo, 32000)])
    out = prepare_wave(clip, 16000, 0.5, windows=False)
    assert out.shape == (8000,) and out.dtype == np.float32
    assert prepare_wave(clip, 16000, 0.4, windows=True).shape == (3, 6400)
    for bad, reason in (((np.zeros(1600), 16000), "silent"), ((np.array([]), 16000), "empty")):
        with pytest.raises(ClipError, match=rf"X\[0\]: {reason}"):
            prepare_wave(as_inputs([bad])[0], 16000, None, windows=False)
    with pytest.raises(ClipError, match="NaN"):
        prepare_wave(as_inputs([(np.full(1600, np.nan), 16000)])[0], 16000, None, windows=False)


def test_method_params_are_estimator_params():
    clf = AudioClassifier("whisper-tiny.en", "calm-global", k=0.3, tau_w=0.2)
    assert clf.get_params()["k"] == 0.3 and clf.get_params()["method"] == "calm-global"
    copy = clone(clf).set_params(k=5, batch_size=2)
    assert (
        copy.method_params == {"k": 5, "tau_w": 0.2} and copy.batch_size == 2 and clf.get_params()["k"] == 0.3
    )
    assert "k=0.3" in repr(clf)
    assert head_classifier("calm-global", {"k": 2}).weighting == "global"
    assert type(head_classifier("sav", {})).__name__ == "SAV"
    with pytest.raises(ValueError, match="accepted: .*tau_w"):
        head_classifier("calm", {"tau": 1})
    with pytest.raises(ValueError, match="method='knn'"):
        head_classifier("knn", {})


@pytest.fixture(scope="module")
def esc10_clips():
    root = shared_data() / "esc10"
    if not root.is_dir():
        pytest.skip(f"real ESC-10 audio not found at {root} (set CALM_TEST_DATA)")
    dog = sorted((root / "001 - Dog bark").glob("*.ogg"))[: N_SUPPORT + 1]
    rain = sorted((root / "002 - Rain").glob("*.ogg"))[: N_SUPPORT + 1]
    support = [*dog[:N_SUPPORT], *rain[:N_SUPPORT]]
    return support, ["dog"] * N_SUPPORT + ["rain"] * N_SUPPORT, [dog[-1], rain[-1]]


@pytest.fixture(scope="module")
def fitted(esc10_clips, tmp_path_factory):
    support, labels, _ = esc10_clips
    cache = tmp_path_factory.mktemp("cache")
    return AudioClassifier("whisper-tiny.en", "calm", cache=cache, k=0.5).fit(support, labels)


def _forward_calls(clf):
    calls = []
    handle = clf._get_extractor().model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.slow
def test_second_fit_on_the_same_files_extracts_nothing(fitted, esc10_clips):
    support, labels, _ = esc10_clips
    shards = sorted(p.name for p in fitted.cache.rglob("*.safetensors"))
    calls, handle = _forward_calls(fitted)
    try:
        before = fitted.classifier_.centroids_.copy()
        fitted.fit(support, labels)
    finally:
        handle.remove()
    assert calls == [] and sorted(p.name for p in fitted.cache.rglob("*.safetensors")) == shards
    np.testing.assert_array_equal(fitted.classifier_.centroids_, before)


@pytest.mark.slow
def test_predict_save_load_round_trip_and_calm_predict(fitted, esc10_clips, tmp_path):
    _, _, queries = esc10_clips
    proba = fitted.predict_proba(queries)
    labels = fitted.predict(queries)
    assert proba.shape == (2, 2) and np.allclose(proba.sum(axis=1), 1)
    assert list(labels) == list(fitted.classes_[proba.argmax(axis=1)])
    assert fitted.score(queries, ["dog", "rain"]) == np.mean(labels == np.array(["dog", "rain"]))
    path = tmp_path / "dog-rain.safetensors"
    fitted.save(path)
    inner = calm.load(path)  # the feature-level estimator, with calm fit's metadata
    assert type(inner).__name__ == "CALM" and inner.metadata_["model"] == "whisper-tiny.en"
    assert inner.metadata_["method"] == "calm" and inner.metadata_["params"]["k"] == 0.5
    loaded = AudioClassifier.load(path)  # no cache: features extracted directly
    assert loaded.get_params()["k"] == 0.5 and loaded.cache is None
    np.testing.assert_allclose(loaded.predict_proba(queries), proba, atol=1e-5)
    from calm.cli import main

    out = tmp_path / "pred.json"
    result = CliRunner().invoke(main, ["predict", str(path), *map(str, queries), "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["label"] for r in rows] == list(labels)
    np.testing.assert_allclose([r["probability"] for r in rows], proba.max(axis=1), atol=1e-5)


@pytest.mark.slow
def test_waveforms_and_dicts_give_the_features_of_their_file(fitted, esc10_clips):
    _, _, queries = esc10_clips
    import soundfile as sf

    wave, rate = sf.read(queries[0], dtype="float32")
    by_path = fitted.predict_proba([queries[0]])
    assert load_audio(queries[0], 16000).shape[0] > 0
    by_wave = fitted.predict_proba(
        [(wave, rate), {"array": wave, "sampling_rate": rate}, wave], sample_rate=rate
    )
    np.testing.assert_allclose(by_wave, np.repeat(by_path, 3, axis=0), atol=1e-4)


@pytest.mark.slow
def test_bad_clips_are_named(fitted, esc10_clips, tmp_path):
    support, labels, queries = esc10_clips
    missing = tmp_path / "missing.wav"
    with pytest.raises(ClipError, match="missing.wav: file not found"):
        AudioClassifier("whisper-tiny.en").fit([*support[:2], missing], [*labels[:2], "dog"])
    with pytest.raises(ClipError, match=r"X\[0\]: silent"):
        fitted.predict([(np.zeros(1600), 16000)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels_out = fitted.predict([queries[0], missing, (np.zeros(1600), 16000)], errors="skip")
        proba = fitted.predict_proba([missing, queries[1]], errors="skip")
    assert labels_out[0] in fitted.classes_ and labels_out[1] is None and labels_out[2] is None
    assert np.isnan(proba[0]).all() and np.isclose(proba[1].sum(), 1)
    messages = [str(w.message) for w in caught if issubclass(w.category, ClipWarning)]
    assert "missing.wav: file not found" in messages[0] and "X[2]: silent" in messages[0]
    with pytest.raises(ValueError, match="errors='ignore'"):
        fitted.predict(queries, errors="ignore")


@pytest.mark.slow
def test_encoder_model_by_directory(tmp_path):
    """Any backend by directory: a tiny random AST, fitted on waveforms, saved and predicted by the CLI."""
    from tests.helpers.tiny_encoders import save_encoder, tiny_ast

    directory = save_encoder(*tiny_ast(), tmp_path / "ast")
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(8000) * (1 + i % 2)).astype(np.float32) for i in range(6)]
    clf = AudioClassifier(str(directory), "sav", k=2).fit(waves, ["a", "b"] * 3, sample_rate=16000)
    assert clf.extraction_key_["model_type"] == "audio-spectrogram-transformer"
    import soundfile as sf

    files = []
    for i, wave in enumerate(waves[:2]):
        sf.write(tmp_path / f"q{i}.wav", wave, 16000, subtype="FLOAT")
        files.append(str(tmp_path / f"q{i}.wav"))
    clf.save(tmp_path / "ast.safetensors")
    from calm.cli import main

    out = tmp_path / "pred.json"
    args = ["predict", str(tmp_path / "ast.safetensors"), *files, "--json", str(out)]
    refused = CliRunner().invoke(main, args)  # a directory named by the file needs confirming
    assert refused.exit_code == 1 and "--trust-file-model" in refused.output
    result = CliRunner().invoke(main, [*args, "--model", str(directory)])
    assert result.exit_code == 0, result.output
    assert [r["label"] for r in json.loads(out.read_text())] == list(clf.predict(files))


@pytest.mark.slow
def test_load_reads_a_file_calm_fit_wrote(fitted, esc10_clips, tmp_path):
    """`calm fit` on a labelled store of the support clips; `AudioClassifier.load` of that file agrees
    with the pipeline of `calm predict` (`calm.inference`)."""
    from calm.cli import main
    from calm.data.base import Clip
    from calm.inference import load_predictor
    from calm.store import extract_to_store

    support, labels, queries = esc10_clips
    store = tmp_path / "store"
    clips = [Clip(path=p, labels=(label,)) for p, label in zip(support, labels, strict=True)]
    extract_to_store(fitted._get_extractor(), clips, store, progress=False, allow_failures=False)
    path = tmp_path / "fit.safetensors"
    result = CliRunner().invoke(main, ["fit", str(store), "--method", "calm-global", "--out", str(path)])
    assert result.exit_code == 0, result.output
    loaded = AudioClassifier.load(path)
    assert loaded.method == "calm-global" and loaded.model == "whisper-tiny.en" and loaded.n_support_ == 6
    predictions = load_predictor(path)(list(map(str, queries)))
    assert list(loaded.predict(queries)) == [p.label for p in predictions]
    np.testing.assert_allclose(
        loaded.predict_proba(queries).max(axis=1), [p.probability for p in predictions], atol=1e-5
    )


@pytest.mark.slow
def test_self_training_from_raw_audio(fitted, esc10_clips, tmp_path):
    """`calm+st`: the support clips plus unlabelled clips of the same classes; the file it saves
    holds the last round's CALM and loads back as `calm+st`."""
    support, labels, queries = esc10_clips
    root = shared_data() / "esc10"
    pool = [
        *sorted((root / "001 - Dog bark").glob("*.ogg"))[N_SUPPORT + 1 : N_SUPPORT + 4],
        *sorted((root / "002 - Rain").glob("*.ogg"))[N_SUPPORT + 1 : N_SUPPORT + 4],
    ]
    st = AudioClassifier(
        "whisper-tiny.en", "calm+st", cache=fitted.cache, k=0.5, self_training={"rounds": 2, "per_round": 1}
    )
    with pytest.raises(ValueError, match="X_unlabelled="):
        st.fit(support, labels)
    with pytest.raises(ValueError, match="only for '\\+st' methods"):
        clone(fitted).fit(support, labels, X_unlabelled=pool)
    st.fit(support, labels, X_unlabelled=pool)
    run = st.self_training_
    assert run.estimator_ is st.classifier_ and type(st.classifier_).__name__ == "CALM"
    assert len(run.rounds_) == 2 and list(run.added_per_class_) == [2, 2]  # 1 a class per round
    assert set(run.pseudo_index_) <= set(range(len(pool))) and set(run.pseudo_labels_) <= {"dog", "rain"}
    # a labelled clip counts as often as its class has labelled clips (labelled_weight='shots')
    assert list(st.classifier_.class_counts_) == [N_SUPPORT * N_SUPPORT + 2] * 2
    path = tmp_path / "st.safetensors"
    st.save(path)
    loaded = AudioClassifier.load(path)
    assert loaded.method == "calm+st" and loaded.self_training == {"rounds": 2, "per_round": 1}
    np.testing.assert_allclose(loaded.predict_proba(queries), st.predict_proba(queries), atol=1e-6)
