"""`hf:` datasets: save_to_disk (Dataset and DatasetDict), audiofolder, Hub ids offline, missing package.

Built in the test from real clips of ../shared/data (speech_commands_mini); the slow test extracts
with the embedded whisper-tiny.en and checks that `hf:` gives the same features as `folder:`.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from calm.cli import main
from calm.data import DatasetError, load_dataset
from calm.store import load_features
from tests.helpers import shared_data

datasets = pytest.importorskip("datasets")
CLASSES = ("bed", "bird", "cat")


@pytest.fixture
def clips_dir(tmp_path) -> Path:
    """tmp/folder/<class>/<clip>.wav: two real speech_commands clips of each of three classes."""
    src = shared_data() / "speech_commands_mini"
    if not src.is_dir():
        pytest.skip(f"real speech_commands audio not found at {src} (set CALM_TEST_DATA)")
    root = tmp_path / "folder"
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for f in sorted((src / cls).glob("*.wav"))[:2]:
            shutil.copy(f, root / cls / f.name)
    return root


def saved_dataset(folder: Path, out: Path, *, splits: bool) -> Path:
    """save_to_disk of the folder's clips (audio embedded as bytes, ClassLabel labels)."""
    files = sorted(folder.rglob("*.wav"))
    table = datasets.Dataset.from_dict(
        {
            "audio": [str(f) for f in files],
            "label": [f.parent.name for f in files],
            "speaker": ["s"] * len(files),
        }
    )
    table = table.cast_column("audio", datasets.Audio()).class_encode_column("label")
    if splits:  # first clip of each class in train, second in test
        first = [i for i, f in enumerate(files) if f == sorted(f.parent.glob("*.wav"))[0]]
        rest = [i for i in range(len(files)) if i not in first]
        table = datasets.DatasetDict({"train": table.select(first), "test": table.select(rest)})
    table.save_to_disk(str(out))
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_saved_dataset_embedded_audio_is_materialised_by_content_hash(clips_dir, tmp_path):
    saved = saved_dataset(clips_dir, tmp_path / "saved", splits=False)
    cache = tmp_path / "cache"
    ds = load_dataset(f"hf:{saved}", cache=str(cache))
    assert ds.classes == list(CLASSES) and len(ds.clips) == 6 and not ds.multi_label
    originals = {f.name: f for f in clips_dir.rglob("*.wav")}
    for clip in ds.clips:
        original = originals[clip.meta["hf_path"]]
        assert clip.labels == (original.parent.name,) and clip.split is None and clip.fold is None
        assert clip.path.parent.parent == cache and clip.path.suffix == ".wav"
        assert clip.path.stem == sha(original) == sha(clip.path)  # named by the bytes' sha256
        assert clip.meta["speaker"] == "s"
    before = {c.path: c.path.stat().st_mtime_ns for c in ds.clips}
    again = load_dataset(f"hf:{saved}", cache=str(cache))
    assert {c.path: c.path.stat().st_mtime_ns for c in again.clips} == before  # reused, not rewritten


def test_saved_dataset_dict_splits_and_options(clips_dir, tmp_path):
    saved = saved_dataset(clips_dir, tmp_path / "saved", splits=True)
    cache = str(tmp_path / "cache")
    ds = load_dataset(f"hf:{saved}", cache=cache)
    assert sorted(c.split for c in ds.clips) == ["test"] * 3 + ["train"] * 3
    only = load_dataset(f"hf:{saved}?split=test&audio=audio&label=label", cache=cache)
    assert len(only.clips) == 3 and {c.split for c in only.clips} == {None}
    with pytest.raises(DatasetError, match=r"no split\(s\) \['dev'\]"):
        load_dataset(f"hf:{saved}?split=dev", cache=cache)
    with pytest.raises(DatasetError, match=r"no column 'nope' \(label=\)"):
        load_dataset(f"hf:{saved}?label=nope", cache=cache)
    with pytest.raises(DatasetError, match="no column 'kfold'"):
        load_dataset(f"hf:{saved}?fold=kfold", cache=cache)


def test_saved_dataset_without_classlabel_and_with_folds(clips_dir, tmp_path):
    files = sorted(clips_dir.rglob("*.wav"))
    table = datasets.Dataset.from_dict(
        {
            "sound": [str(f) for f in files],
            "category": [f.parent.name for f in files],
            "fold": [i % 2 + 1 for i in range(len(files))],
        }
    ).cast_column("sound", datasets.Audio())
    table.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DatasetError, match=r"no ClassLabel column; name the column with \?label=COLUMN"):
        load_dataset(f"hf:{tmp_path / 'saved'}", cache=str(tmp_path / "c"))
    ds = load_dataset(f"hf:{tmp_path / 'saved'}?label=category", cache=str(tmp_path / "c"))
    assert ds.classes == list(CLASSES) and [c.fold for c in ds.clips] == [1, 2] * 3


def test_audiofolder_with_split_folders_and_metadata(clips_dir, tmp_path):
    flat = load_dataset(f"hf:{clips_dir}")
    assert flat.classes == list(CLASSES) and {c.split for c in flat.clips} == {None}
    assert sorted(str(c.path) for c in flat.clips) == sorted(str(p) for p in clips_dir.rglob("*.wav"))
    root = tmp_path / "af"
    for cls in CLASSES:
        a, b = sorted((clips_dir / cls).glob("*.wav"))
        for split, f in (("train", a), ("test", b)):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / split / cls / f.name)
    ds = load_dataset(f"hf:{root}")
    assert sorted(c.split for c in ds.clips) == ["test"] * 3 + ["train"] * 3
    assert all(c.labels == (c.path.parent.name,) for c in ds.clips)
    # metadata.csv: labels and folds from columns instead of folder names
    meta_root = tmp_path / "meta"
    meta_root.mkdir()
    lines = ["file_name,label,fold,speaker"]
    for i, f in enumerate(sorted(clips_dir.rglob("*.wav"))):
        shutil.copy(f, meta_root / f.name)
        lines.append(f"{f.name},{f.parent.name},{i % 3},x{i}")
    (meta_root / "metadata.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(f"hf:{meta_root}?fold=fold")
    assert ds.classes == list(CLASSES) and sorted(c.fold for c in ds.clips) == [0, 0, 1, 1, 2, 2]
    assert all(c.meta["speaker"].startswith("x") for c in ds.clips)
    (meta_root / "metadata.csv").write_text("\n".join([*lines, "gone.wav,bed,0,y"]) + "\n")
    with pytest.raises(DatasetError, match=r"metadata.csv:8: audio file not found"):
        load_dataset(f"hf:{meta_root}")
    assert len(load_dataset(f"hf:{meta_root}?missing=skip").skipped) == 1


def test_hub_id_fails_clearly_offline(tmp_path):
    code = "from calm.data import load_dataset; load_dataset('hf:someone/some-audio-set')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("calm.data.base.DatasetError: hf:someone/some-audio-set: not a local folder")
    assert "Hub could not provide it" in last


def test_missing_directory_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="dataset directory not found"):
        load_dataset(f"hf:{tmp_path / 'absent'}")
    (tmp_path / "d").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DatasetError, match=r"pip install 'calm-audio\[hf\]'"):
        load_dataset(f"hf:{tmp_path / 'd'}")


def _features_by_name(store: Path) -> dict[str, np.ndarray]:
    X, _, meta = load_features(store)
    names = meta["hf_path"] if "hf_path" in meta.columns else meta["path"].map(lambda p: Path(p).name)
    return {str(n): np.asarray(X[i]) for i, n in enumerate(names)}


@pytest.mark.slow
def test_same_features_as_the_folder_run(clips_dir, tmp_path):
    """folder:, hf:<save_to_disk> and hf:<audiofolder> give the same whisper-tiny.en features."""
    pytest.importorskip("calm.models.whisper")
    saved = saved_dataset(clips_dir, tmp_path / "saved", splits=True)
    stores = {}
    for name, spec in (
        ("folder", f"folder:{clips_dir}"),
        ("saved", f"hf:{saved}?cache={tmp_path / 'cache'}"),
        ("audiofolder", f"hf:{clips_dir}"),
    ):
        stores[name] = tmp_path / f"store-{name}"
        args = ["extract", "--data", spec, "--out", str(stores[name]), "--batch-size", "3", "--no-progress"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    ref = _features_by_name(stores["folder"])
    assert len(ref) == 6
    for name in ("saved", "audiofolder"):
        got = _features_by_name(stores[name])
        assert sorted(got) == sorted(ref)
        for clip, x in ref.items():
            np.testing.assert_array_equal(got[clip], x, err_msg=f"{name}: {clip}")
