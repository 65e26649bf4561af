"""Issue 23, item 7 and part of item 9: `hf:` label columns that cannot hold classes are refused in
one line naming the column and its type; a float label that is NaN is refused like a missing
ClassLabel, naming the row; a clip that fails to decode is reported by its dataset row, not by the
cache file its embedded audio was written to. Datasets are built in the test (`save_to_disk`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from calm.data import DatasetError, load_dataset
from calm.store import extract_to_store
from tests.test_store import RATE, FakeExtractor

datasets = pytest.importorskip("datasets")


def saved(tmp_path: Path, columns: dict, features: dict | None = None, *, broken: int | None = None) -> str:
    """save_to_disk of three clips, their audio embedded (clip `broken`: bytes that are not audio)."""
    files = []
    for i in range(3):
        path = tmp_path / "src" / f"clip{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        x = np.random.default_rng(i).standard_normal(RATE // 4).astype(np.float32) * 0.1
        sf.write(path, x, RATE, subtype="FLOAT")
        if i == broken:
            path.write_bytes(b"RIFF this is not audio")
        files.append(str(path))
    feats = datasets.Features({"audio": datasets.Value("string"), **(features or {})}) if features else None
    table = datasets.Dataset.from_dict({"audio": files, **columns}, features=feats)
    table = datasets.DatasetDict({"test": table.cast_column("audio", datasets.Audio())})
    out = tmp_path / "saved"
    table.save_to_disk(str(out))
    return f"hf:{out}?cache={tmp_path / 'cache'}"


def test_the_audio_column_as_label_is_refused_naming_it_and_its_type(tmp_path):
    spec = saved(tmp_path, {"category": ["a", "b", "a"]})
    with pytest.raises(DatasetError) as info:
        load_dataset(spec + "&label=audio")
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert "label column 'audio' holds Audio(" in message and "not class labels" in message


def test_a_struct_label_column_is_refused(tmp_path):
    spec = saved(tmp_path, {"info": [{"x": 1}, {"x": 2}, {"x": 1}]})
    with pytest.raises(DatasetError, match=r"label column 'info' holds \{'x': Value\('int64'\)\}"):
        load_dataset(spec + "&label=info")


def test_string_integer_and_list_label_columns_still_load(tmp_path):
    spec = saved(tmp_path, {"word": ["a", "b", "a"], "n": [3, 4, 3], "tags": [["a"], ["a", "b"], ["b"]]})
    assert load_dataset(spec + "&label=word").classes == ["a", "b"]
    assert load_dataset(spec + "&label=n").classes == ["3", "4"]
    assert load_dataset(spec + "&label=tags").multi_label


@pytest.mark.parametrize("missing", [float("nan"), None])
def test_a_float_label_that_is_nan_or_none_is_refused_naming_the_row(tmp_path, missing):
    spec = saved(tmp_path, {"score": [1.0, missing, 2.0]})
    with pytest.raises(DatasetError, match=r"saved\[test\] row 1: no label \((nan|None)\)"):
        load_dataset(spec + "&label=score")


def test_a_broken_clip_is_reported_by_its_dataset_row(tmp_path):
    spec = saved(tmp_path, {"word": ["a", "b", "a"], "id": ["x0", "x1", "x2"]}, broken=1)
    dataset = load_dataset(spec + "&label=word")
    broken = dataset.clips[1]
    assert broken.meta["origin"] == f"hf:{tmp_path / 'saved'}[test] row 1 (id 'x1')"
    report = extract_to_store(FakeExtractor(), dataset, tmp_path / "store", progress=False)
    assert report.stored == 2 and len(report.failed) == 1
    path, reason = report.failed[0]
    assert path == str(broken.path)  # the store's key stays the file it read
    assert reason.startswith(f"hf:{tmp_path / 'saved'}[test] row 1 (id 'x1'): ")
    (key_dir,) = [p for p in (tmp_path / "store").iterdir() if p.is_dir()]
    logged = [json.loads(line) for line in (key_dir / "failures.jsonl").read_text().splitlines()]
    assert [f["reason"] for f in logged] == [reason]
