"""Dataset loaders on small fixtures written in each official layout (real audio via soundfile)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from calm.data import DatasetError, load_dataset, parse_spec
from calm.data.esc import download_esc50, extract_esc50_archive


def write_audio(path: Path, *, sr: int = 16000, seconds: float = 0.1, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format=fmt)
    return path


# ---------------------------------------------------------------- spec parsing


def test_parse_spec():
    assert parse_spec("esc10:/d/esc10") == ("esc10", "/d/esc10", {})
    assert parse_spec("esc50") == ("esc50", None, {})
    assert parse_spec("audioset:/d?template=Y{ytid}.wav&missing=skip") == (
        "audioset",
        "/d",
        {"template": "Y{ytid}.wav", "missing": "skip"},
    )
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        parse_spec("nope:/x")
    with pytest.raises(DatasetError, match="needs a root"):
        parse_spec("folder")


def test_unknown_option(tmp_path):
    write_audio(tmp_path / "a" / "1.wav")
    with pytest.raises(DatasetError, match="does not take option"):
        load_dataset(f"folder:{tmp_path}?template=x")


# ---------------------------------------------------------------- folder


def test_folder(tmp_path):
    write_audio(tmp_path / "dog" / "b.wav")
    write_audio(tmp_path / "dog" / "sub" / "a.flac")
    write_audio(tmp_path / "cat" / "c.ogg", fmt="OGG")
    (tmp_path / "README.md").write_text("x")
    (tmp_path / "cat" / "notes.txt").write_text("x")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.classes == ["cat", "dog"]
    assert ds.root == tmp_path and not ds.multi_label
    assert [(c.path.relative_to(tmp_path).as_posix(), c.labels, c.fold, c.split) for c in ds.clips] == [
        ("cat/c.ogg", ("cat",), None, None),
        ("dog/b.wav", ("dog",), None, None),
        ("dog/sub/a.flac", ("dog",), None, None),
    ]
    assert ds.clips[2].meta == {"relpath": "dog/sub/a.flac"}


def test_folder_empty(tmp_path):
    (tmp_path / "dog").mkdir()
    with pytest.raises(DatasetError, match="no audio files"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(f"folder:{tmp_path / 'missing'}")


# ---------------------------------------------------------------- csv manifest


def test_csv_manifest(tmp_path):
    write_audio(tmp_path / "audio" / "a.wav")
    write_audio(tmp_path / "audio" / "b.wav")
    write_audio(tmp_path / "audio" / "c.wav")
    (tmp_path / "m.csv").write_text(
        "path,label,split,fold,speaker\n"
        "audio/a.wav,dog,train,1,ann\n"
        "\n"
        'audio/b.wav,"cat; dog",Test,2,bob\n'
        "audio/c.wav,bird,,,\n"
    )
    ds = load_dataset(f"csv:{tmp_path / 'm.csv'}")
    assert ds.classes == ["bird", "cat", "dog"] and ds.multi_label
    a, b, c = ds.clips
    assert (a.path, a.labels, a.split, a.fold, dict(a.meta)) == (
        tmp_path / "audio" / "a.wav",
        ("dog",),
        "train",
        1,
        {"speaker": "ann"},
    )
    assert (b.labels, b.label, b.split, b.fold, dict(b.meta)) == (
        ("cat", "dog"),
        "cat;dog",
        "test",
        2,
        {"speaker": "bob"},
    )
    assert (c.labels, c.split, c.fold, dict(c.meta)) == (("bird",), None, None, {"speaker": ""})


@pytest.mark.parametrize(
    "body, message",
    [
        ("path,label\nx.wav,dog\n", r"m.csv:2: audio file not found"),
        ("path,label\na.wav,dog\n\na.wav\n", r"m.csv:4: expected 2 fields"),
        ("path,label\na.wav,\n", r"m.csv:2: empty label"),
        ("path,label,fold\na.wav,dog,one\n", r"m.csv:2: fold 'one' is not an integer"),
        ("path,label,split\na.wav,dog,holdout\n", r"m.csv:2: unknown split"),
        ("file,label\na.wav,dog\n", r"m.csv:1: header lacks column\(s\) path"),
        ("path,label\na.wav,dog\na.wav,cat\n", r"m.csv:3: a.wav already listed on line 2"),
        ("", r"empty manifest"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, body, message):
    write_audio(tmp_path / "a.wav")
    (tmp_path / "m.csv").write_text(body)
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"csv:{tmp_path / 'm.csv'}")


@pytest.mark.slow
def test_real_fsdd_manifest():
    from tests.helpers import shared_data

    manifest = shared_data() / "fsdd" / "manifest.csv"
    if not manifest.is_file():
        pytest.skip(f"{manifest} absent")
    ds = load_dataset(f"csv:{manifest}")
    assert len(ds.clips) == 3000 and ds.classes == [str(d) for d in range(10)]
    test = [c for c in ds.clips if c.split == "test"]
    assert len(test) == 300 and all(int(c.meta["take"]) <= 4 for c in test)


# ---------------------------------------------------------------- ESC


ESC50_ROWS = [
    ("1-100032-A-0.wav", 1, 0, "dog", "True", "100032", "A"),
    ("2-100038-A-14.wav", 2, 14, "chirping_birds", "False", "100038", "A"),
    ("5-9032-B-0.wav", 5, 0, "dog", "True", "9032", "B"),
]


def make_esc50(root: Path, rows=ESC50_ROWS) -> Path:
    (root / "meta").mkdir(parents=True)
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for row in rows:
        lines.append(",".join(map(str, row)))
        write_audio(root / "audio" / row[0], sr=44100)
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    return root


def test_esc50(tmp_path):
    root = make_esc50(tmp_path / "ESC-50-master")
    for spec in (f"esc50:{root}", f"esc50:{tmp_path}"):
        ds = load_dataset(spec)
        assert ds.name == "esc50" and ds.root == root and ds.classes == ["dog", "chirping_birds"]
        got = [(c.path.name, c.labels, c.fold, c.split, dict(c.meta)) for c in ds.clips]
        assert got == [
            (
                "1-100032-A-0.wav",
                ("dog",),
                1,
                None,
                {"target": 0, "esc10": True, "src_file": "100032", "take": "A"},
            ),
            (
                "2-100038-A-14.wav",
                ("chirping_birds",),
                2,
                None,
                {"target": 14, "esc10": False, "src_file": "100038", "take": "A"},
            ),
            (
                "5-9032-B-0.wav",
                ("dog",),
                5,
                None,
                {"target": 0, "esc10": True, "src_file": "9032", "take": "B"},
            ),
        ]
    sub = load_dataset(f"esc10:{root}")
    assert sub.name == "esc10" and sub.classes == ["dog"] and len(sub.clips) == 2


def test_esc50_errors(tmp_path):
    root = make_esc50(tmp_path / "ESC-50-master")
    (root / "audio" / "5-9032-B-0.wav").unlink()
    with pytest.raises(DatasetError, match=r"esc50.csv:4: audio file not found"):
        load_dataset(f"esc50:{root}")
    csv = root / "meta" / "esc50.csv"
    csv.write_text(csv.read_text().replace("2-100038-A-14.wav,2", "2-100038-A-14.wav,3"))
    with pytest.raises(DatasetError, match=r"esc50.csv:3: fold/target columns disagree"):
        load_dataset(f"esc50:{root}")


def test_esc50_archive_extraction_and_cache(tmp_path, monkeypatch):
    src = make_esc50(tmp_path / "src" / "ESC-50-master")
    archive = tmp_path / "ESC-50-master.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, Path("ESC-50-master") / path.relative_to(src))
        zf.writestr("ESC-50-master/README.md", "not extracted")
    root = extract_esc50_archive(archive, tmp_path / "cache")
    assert root == tmp_path / "cache" / "ESC-50-master"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.*")) == sorted(
        ["meta/esc50.csv"] + [f"audio/{r[0]}" for r in ESC50_ROWS]
    )
    data, sr = sf.read(root / "audio" / ESC50_ROWS[0][0])
    assert sr == 44100 and len(data) == 4410
    # `esc50` with no root: finds the extracted copy in the user cache, no network needed
    monkeypatch.setenv("CALM_CACHE", str(tmp_path / "cache"))
    ds = load_dataset("esc50")
    assert ds.root == root and len(ds.clips) == 3
    # a zip placed in the cache is extracted on first use
    monkeypatch.setenv("CALM_CACHE", str(tmp_path / "cache2"))
    (tmp_path / "cache2").mkdir()
    (tmp_path / "cache2" / "ESC-50-master.zip").write_bytes(archive.read_bytes())
    assert len(load_dataset("esc50").clips) == 3
    assert not (tmp_path / "cache2" / "ESC-50-master.zip").exists()


def test_esc50_archive_rejects_escaping_members(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ESC-50-master/meta/esc50.csv", "x")
        zf.writestr("ESC-50-master/audio/../../../evil.wav", "x")
    with pytest.raises(DatasetError, match="escapes"):
        extract_esc50_archive(archive, tmp_path / "out")
    with pytest.raises(DatasetError, match="not the ESC-50 archive"):
        bad = tmp_path / "other.zip"
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("x.txt", "x")
        extract_esc50_archive(bad, tmp_path / "out2")


def test_esc50_download_failure_is_clear(tmp_path):
    with pytest.raises(DatasetError, match="could not download ESC-50.*esc50:/path/to/ESC-50-master"):
        download_esc50(tmp_path, url="http://127.0.0.1:9/master.zip")
    assert not list(tmp_path.glob("*.part"))


def test_esc10_release_layout(tmp_path):
    write_audio(tmp_path / "001 - Dog bark" / "1-100032-A.ogg", sr=44100, fmt="OGG")
    write_audio(tmp_path / "001 - Dog bark" / "5-9032-B.ogg", sr=44100, fmt="OGG")
    write_audio(tmp_path / "010 - Fire crackling" / "3-17808-A.ogg", sr=44100, fmt="OGG")
    write_audio(tmp_path / "002 - Rain" / "2-101-C.ogg", sr=44100, fmt="OGG")
    (tmp_path / "README.txt").write_text("x")
    ds = load_dataset(f"esc10:{tmp_path}")
    assert ds.classes == ["Dog bark", "Rain", "Fire crackling"]
    assert [(c.path.name, c.labels, c.fold, c.split, dict(c.meta)) for c in ds.clips] == [
        ("1-100032-A.ogg", ("Dog bark",), 1, None, {"category_id": 1, "src_file": "100032", "take": "A"}),
        ("5-9032-B.ogg", ("Dog bark",), 5, None, {"category_id": 1, "src_file": "9032", "take": "B"}),
        ("2-101-C.ogg", ("Rain",), 2, None, {"category_id": 2, "src_file": "101", "take": "C"}),
        (
            "3-17808-A.ogg",
            ("Fire crackling",),
            3,
            None,
            {"category_id": 10, "src_file": "17808", "take": "A"},
        ),
    ]
    write_audio(tmp_path / "002 - Rain" / "oops.ogg", fmt="OGG")
    with pytest.raises(DatasetError, match=r"oops.ogg: file name is not fold-freesoundid-take"):
        load_dataset(f"esc10:{tmp_path}")


@pytest.mark.slow
def test_real_esc10(esc10_root):
    ds = load_dataset(f"esc10:{esc10_root}")
    assert len(ds.clips) == 400 and len(ds.classes) == 10 and ds.classes[0] == "Dog bark"
    assert sorted({c.fold for c in ds.clips}) == [1, 2, 3, 4, 5]
    assert all(
        sum(c.fold == f and c.label == k for c in ds.clips) == 8 for f in range(1, 6) for k in ds.classes
    )


# ---------------------------------------------------------------- VGGSound


def test_vggsound(tmp_path):
    (tmp_path / "vggsound.csv").write_text(
        'abc,10,"bird chirping, tweeting",train\nxyz-_1,250,dog barking,test\n'
    )
    (tmp_path / "stat.csv").write_text('"bird chirping, tweeting",1050,animals\ndog barking,1050,animals\n')
    write_audio(tmp_path / "video" / "abc_000010.flac")
    write_audio(tmp_path / "audio" / "xyz-_1_000250.wav")
    ds = load_dataset(f"vggsound:{tmp_path}")
    assert ds.classes == ["bird chirping, tweeting", "dog barking"]
    assert [
        (c.path.relative_to(tmp_path).as_posix(), c.labels, c.fold, c.split, dict(c.meta)) for c in ds.clips
    ] == [
        (
            "video/abc_000010.flac",
            ("bird chirping, tweeting",),
            None,
            "train",
            {"youtube_id": "abc", "start_seconds": 10, "category": "animals"},
        ),
        (
            "audio/xyz-_1_000250.wav",
            ("dog barking",),
            None,
            "test",
            {"youtube_id": "xyz-_1", "start_seconds": 250, "category": "animals"},
        ),
    ]


def test_vggsound_missing_and_test_csv(tmp_path):
    (tmp_path / "vggsound.csv").write_text("abc,10,dog,train\nnone,0,dog,test\n")
    write_audio(tmp_path / "abc_000010.wav")
    with pytest.raises(DatasetError, match=r"vggsound.csv:2: no audio or video file named none_000000"):
        load_dataset(f"vggsound:{tmp_path}")
    ds = load_dataset(f"vggsound:{tmp_path}?missing=skip")
    assert len(ds.clips) == 1 and len(ds.skipped) == 1 and "vggsound.csv:2" in ds.skipped[0]
    (tmp_path / "vggsound.csv").write_text("abc,10,dog,validate\n")
    with pytest.raises(DatasetError, match=r"vggsound.csv:1: split 'validate'"):
        load_dataset(f"vggsound:{tmp_path}")
    (tmp_path / "vggsound.csv").unlink()
    (tmp_path / "test.csv").write_text("abc_000010.mp4,dog\n")
    ds = load_dataset(f"vggsound:{tmp_path}")
    assert [(c.labels, c.split, c.meta["youtube_id"], c.meta["start_seconds"]) for c in ds.clips] == [
        (("dog",), None, "abc", 10)
    ]


# ---------------------------------------------------------------- AudioSet

SEGMENTS_HEADER = (
    "# Segments csv created Sun Mar  5 10:54:25 2017\n"
    "# num_ytids=2, num_segs=2, num_unique_labels=3, num_positive_labels=3\n"
    "# YTID, start_seconds, end_seconds, positive_labels\n"
)


def make_audioset(root: Path) -> None:
    (root / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n'
        '1,/m/05zppz,"Male speech, man speaking"\n2,/m/04rlf,"Music"\n'
    )
    (root / "balanced_train_segments.csv").write_text(
        SEGMENTS_HEADER
        + '--PU0Bs8-Ug, 30.000, 40.000, "/m/04rlf,/m/09x0r"\n-0RWZT-miFs, 420.000, 430.000, "/m/05zppz"\n'
    )
    (root / "eval_segments.csv").write_text(SEGMENTS_HEADER + 'zz1, 0.000, 10.000, "/m/04rlf"\n')
    (root / "unbalanced_train_segments.csv").write_text(SEGMENTS_HEADER + 'uu1, 5.500, 15.500, "/m/09x0r"\n')


def test_audioset_default_names(tmp_path):
    make_audioset(tmp_path)
    write_audio(tmp_path / "wav" / "Y--PU0Bs8-Ug.wav")
    write_audio(tmp_path / "wav" / "-0RWZT-miFs_420.flac")
    write_audio(tmp_path / "eval" / "zz1.wav")
    ds = load_dataset(f"audioset:{tmp_path}")
    assert ds.multi_label and ds.classes == ["Speech", "Male speech, man speaking", "Music"]
    assert [
        (c.path.relative_to(tmp_path).as_posix(), c.labels, c.fold, c.split, dict(c.meta)) for c in ds.clips
    ] == [
        (
            "wav/Y--PU0Bs8-Ug.wav",
            ("Music", "Speech"),
            None,
            "train",
            {
                "ytid": "--PU0Bs8-Ug",
                "start_seconds": 30.0,
                "end_seconds": 40.0,
                "mids": "/m/04rlf,/m/09x0r",
                "segments": "balanced_train",
            },
        ),
        (
            "wav/-0RWZT-miFs_420.flac",
            ("Male speech, man speaking",),
            None,
            "train",
            {
                "ytid": "-0RWZT-miFs",
                "start_seconds": 420.0,
                "end_seconds": 430.0,
                "mids": "/m/05zppz",
                "segments": "balanced_train",
            },
        ),
        (
            "eval/zz1.wav",
            ("Music",),
            None,
            "test",
            {
                "ytid": "zz1",
                "start_seconds": 0.0,
                "end_seconds": 10.0,
                "mids": "/m/04rlf",
                "segments": "eval",
            },
        ),
    ]
    assert ds.clips[0].label == "Music;Speech"


def test_audioset_template_unbalanced_and_errors(tmp_path):
    make_audioset(tmp_path)
    for split, ytid, start in [
        ("balanced_train", "--PU0Bs8-Ug", 30000),
        ("balanced_train", "-0RWZT-miFs", 420000),
        ("eval", "zz1", 0),
        ("unbalanced_train", "uu1", 5500),
    ]:
        write_audio(tmp_path / "audio" / split / f"{ytid}-{start}.wav")
    spec = f"audioset:{tmp_path}?template=audio/{{split}}/{{ytid}}-{{start_ms}}.wav"
    assert len(load_dataset(spec).clips) == 3
    ds = load_dataset(spec + "&unbalanced=true")
    assert (
        len(ds.clips) == 4
        and ds.clips[-1].split == "train"
        and ds.clips[-1].meta["segments"] == "unbalanced_train"
    )
    (tmp_path / "audio" / "eval" / "zz1-0.wav").unlink()
    with pytest.raises(DatasetError, match=r"eval_segments.csv:4: no audio for zz1"):
        load_dataset(spec)
    assert len(load_dataset(spec + "&missing=skip").skipped) == 1
    with pytest.raises(DatasetError, match=r"template .*nope"):
        load_dataset(f"audioset:{tmp_path}?template={{nope}}.wav")
    (tmp_path / "eval_segments.csv").write_text(SEGMENTS_HEADER + 'zz1, 0.000, 10.000, "/m/unknown"\n')
    with pytest.raises(DatasetError, match=r"eval_segments.csv:4: label id\(s\) \['/m/unknown'\]"):
        load_dataset(spec)


# ---------------------------------------------------------------- ASVspoof 2019 LA


def test_asvspoof(tmp_path):
    la = tmp_path / "LA"
    proto = la / "ASVspoof2019_LA_cm_protocols"
    proto.mkdir(parents=True)
    (proto / "ASVspoof2019.LA.cm.train.trn.txt").write_text(
        "LA_0079 LA_T_1138215 - - bonafide\nLA_0079 LA_T_1271820 - A01 spoof\n"
    )
    (proto / "ASVspoof2019.LA.cm.dev.trl.txt").write_text("LA_0069 LA_D_1047731 - - bonafide\n")
    (proto / "ASVspoof2019.LA.cm.eval.trl.txt").write_text("LA_0039 LA_E_2834763 - A11 spoof\n")
    for part, fid in [
        ("train", "LA_T_1138215"),
        ("train", "LA_T_1271820"),
        ("dev", "LA_D_1047731"),
        ("eval", "LA_E_2834763"),
    ]:
        write_audio(la / f"ASVspoof2019_LA_{part}" / "flac" / f"{fid}.flac")
    for root in (tmp_path, la):
        ds = load_dataset(f"asvspoof2019-la:{root}")
        assert ds.classes == ["bonafide", "spoof"] and ds.root == la
        assert [
            (c.path.relative_to(la).as_posix(), c.labels, c.fold, c.split, dict(c.meta)) for c in ds.clips
        ] == [
            (
                "ASVspoof2019_LA_train/flac/LA_T_1138215.flac",
                ("bonafide",),
                None,
                "train",
                {"speaker": "LA_0079", "file_id": "LA_T_1138215", "system": "-"},
            ),
            (
                "ASVspoof2019_LA_train/flac/LA_T_1271820.flac",
                ("spoof",),
                None,
                "train",
                {"speaker": "LA_0079", "file_id": "LA_T_1271820", "system": "A01"},
            ),
            (
                "ASVspoof2019_LA_dev/flac/LA_D_1047731.flac",
                ("bonafide",),
                None,
                "dev",
                {"speaker": "LA_0069", "file_id": "LA_D_1047731", "system": "-"},
            ),
            (
                "ASVspoof2019_LA_eval/flac/LA_E_2834763.flac",
                ("spoof",),
                None,
                "test",
                {"speaker": "LA_0039", "file_id": "LA_E_2834763", "system": "A11"},
            ),
        ]
    (proto / "ASVspoof2019.LA.cm.eval.trl.txt").write_text(
        "LA_0039 LA_E_2834763 - A11 spoof\nLA_0039 LA_E_0 - A11\n"
    )
    with pytest.raises(DatasetError, match=r"eval.trl.txt:2: expected SPEAKER_ID"):
        load_dataset(f"asvspoof2019-la:{tmp_path}")
    (proto / "ASVspoof2019.LA.cm.eval.trl.txt").write_text("LA_0039 LA_E_9 - A11 spoof\n")
    with pytest.raises(DatasetError, match=r"eval.trl.txt:1: audio file not found"):
        load_dataset(f"asvspoof2019-la:{tmp_path}")
