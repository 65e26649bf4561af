"""Loading a classifier file is bounded and strict (issue 9, items 6 and 7): the safetensors header
is checked before any tensor byte is read, unknown tensors and shapes unlike the header are refused
without allocating them, the header size and JSON depth are bounded, offsets must tile the file,
a damaged file fails its checksum, and non-finite or negative weights are refused at save and load.
Every refusal is one ModelFileError line naming the file."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import calm
from calm._safetensors import MAX_HEADER_BYTES
from calm.classifiers import CALM, SAV
from calm.serialization import CHECKSUM_KEY, ModelFileError
from tests.helpers.model_files import join_file, replace_tensor, split_file, tensors_of
from tests.test_classifiers_reference import make_problem

GIB = 2**30


@pytest.fixture(scope="module")
def problem():
    X, y, Xq, _ = make_problem(91)
    return X.astype(np.float32), np.array(["cat", "dog", "rain", "wind"])[y], Xq.astype(np.float32)


@pytest.fixture
def saved(tmp_path, problem):
    X, y, _ = problem
    path = tmp_path / "good.safetensors"
    CALM(k=3).fit(X, y).save(path, metadata={"model": "whisper-tiny.en"})
    return path


def _refused(path: Path, match: str) -> str:
    with pytest.raises(ModelFileError, match=match) as info:
        calm.load(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def _peak_loading(path: Path, match: str) -> int:
    tracemalloc.start()
    try:
        _refused(path, match)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_round_trip_writes_a_checksum_and_predicts_identically(saved, problem):
    X, y, Xq = problem
    header, _ = split_file(saved)
    assert len(header["__metadata__"][CHECKSUM_KEY]) == 64
    np.testing.assert_array_equal(calm.load(saved).predict_proba(Xq), CALM(k=3).fit(X, y).predict_proba(Xq))


def test_sparse_file_declaring_an_extra_gib_tensor_is_refused_before_reading(saved, tmp_path):
    header, data = split_file(saved)
    header["junk"] = {"dtype": "F32", "shape": [GIB // 4], "data_offsets": [len(data), len(data) + GIB]}
    path = join_file(tmp_path / "sparse.safetensors", header, data)
    with open(path, "r+b") as fh:  # a hole: 1 GiB apparent size, a few KB on disk
        fh.truncate(path.stat().st_size + GIB)
    assert path.stat().st_size > GIB and path.stat().st_blocks * 512 < 1 << 20
    peak = _peak_loading(path, r"unknown tensors \['junk'\]")
    assert peak < 4 << 20, f"refusing the file allocated {peak} bytes"


def test_a_known_tensor_with_a_huge_shape_is_refused_before_reading(saved, tmp_path):
    header, data = split_file(saved)
    begin = header["centroids"]["data_offsets"][0]
    size = 4 * 7 * 2**23 * 4  # (C, K, 2**23) float32: 0.9 GiB where the header says d = 5
    header["centroids"].update(shape=[4, 7, 2**23], data_offsets=[begin, begin + size])
    grow = size - 4 * 7 * 5 * 4  # the other tensors move up behind it, so the file tiles exactly
    for name, info in header.items():
        if name not in ("__metadata__", "centroids") and info["data_offsets"][0] > begin:
            info["data_offsets"] = [x + grow for x in info["data_offsets"]]
    path = join_file(tmp_path / "huge.safetensors", header, b"")
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size + len(data) + grow)
    peak = _peak_loading(path, r"tensor 'centroids' has shape \(4, 7, 8388608\), expected \(4, 7, 5\)")
    assert peak < 4 << 20


@pytest.mark.parametrize(
    "prefix, match",
    [
        ((MAX_HEADER_BYTES + 1).to_bytes(8, "little"), "exceeds the limit"),
        ((2**64 - 1).to_bytes(8, "little"), "exceeds the limit"),
        ((5000).to_bytes(8, "little"), "runs past the end of the file"),
        (b"\x01\x02", "shorter than the 8-byte header length"),  # the whole file: 2 bytes
    ],
)
def test_header_length_is_bounded(tmp_path, prefix, match):
    path = tmp_path / "m.safetensors"
    path.write_bytes(prefix + (b"{}" * 100 if len(prefix) == 8 else b""))
    assert _peak_loading(path, match) < 1 << 20


def test_deeply_nested_json_is_refused_not_a_recursion_error(saved, tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    _refused(join_file(tmp_path / "a.safetensors", deep, b""), "nested deeper than 64")
    header, data = split_file(saved)
    header["__metadata__"]["calm"] = '{"format": ' + "[" * 100_000 + "]" * 100_000 + "}"
    _refused(join_file(tmp_path / "b.safetensors", header, data), "'calm' header is JSON nested deeper")
    header["__metadata__"]["calm"] = '{"format": ' + "[" * 70 + "]" * 70 + "}"  # under the recursion limit
    _refused(join_file(tmp_path / "c.safetensors", header, data), "nested deeper than 64")


def _edit_offsets(saved, tmp_path, name, edit, extra=b""):
    header, data = split_file(saved)
    header[name]["data_offsets"] = edit(header[name]["data_offsets"])
    return join_file(tmp_path / f"{name}.safetensors", header, data + extra)


@pytest.mark.parametrize(
    "edit, extra, match",
    [
        (lambda o: [o[0] - 8, o[1] - 8], b"", "overlaps|belong to no tensor"),
        (lambda o: [o[0] + 8, o[1] + 8], b"", "belong to no tensor|the file has"),
        (lambda o: [o[0], o[1] + 4], b"", "needs .* bytes but data_offsets span"),
        (lambda o: [o[1], o[0]], b"", "data_offsets span"),
        (lambda o: [o[0], o[1]], b"\0" * 16, "16 bytes after the last tensor"),
        (lambda o: [o[0] + 2**62, o[1] + 2**62], b"", "belong to no tensor|the file has"),
        (lambda o: [-1, o[1]], b"", "two non-negative ints"),
        (lambda o: "x", b"", "two non-negative ints"),
    ],
)
def test_offsets_must_tile_the_file(saved, tmp_path, edit, extra, match):
    _refused(_edit_offsets(saved, tmp_path, "weights", edit, extra), match)


def test_entries_dtype_and_shape_fields_are_checked(saved, tmp_path):
    header, data = split_file(saved)
    header["weights"]["dtype"] = "F8_E4M3"
    _refused(join_file(tmp_path / "a.safetensors", header, data), "unknown dtype 'F8_E4M3'")
    header, data = split_file(saved)
    header["weights"]["shape"] = [4, True]
    _refused(join_file(tmp_path / "b.safetensors", header, data), "shape must be a list")
    header, data = split_file(saved)
    header["weights"]["extra"] = 1
    _refused(join_file(tmp_path / "c.safetensors", header, data), "exactly dtype, shape and data_offsets")
    header, data = split_file(saved)
    header["__metadata__"]["calm_note"] = "x"
    _refused(join_file(tmp_path / "d.safetensors", header, data), r"unknown metadata keys \['calm_note'\]")


def test_a_flipped_data_byte_fails_the_checksum(saved, tmp_path):
    header, data = split_file(saved)
    begin = header["centroids"]["data_offsets"][0]
    flipped = data[:begin] + bytes([data[begin] ^ 0x01]) + data[begin + 1 :]
    _refused(join_file(tmp_path / "f.safetensors", header, flipped), "checksum mismatch")
    header["__metadata__"]["calm"] = header["__metadata__"]["calm"].replace('"tau_p": 0.03', '"tau_p": 0.05')
    _refused(join_file(tmp_path / "g.safetensors", header, data), "checksum mismatch")


@pytest.mark.parametrize("seal", [True, False])
def test_crafted_negative_or_nan_weights_are_refused_at_load(saved, tmp_path, seal):
    header, data = split_file(saved)
    w = tensors_of(header, data)["weights"].copy()
    counts = tensors_of(header, data)["class_counts"].copy()
    cases = {
        "neg": ("weights", np.where(w > 0, -w, 0.0), r"tensor 'weights' must hold values in \[0, 1\]"),
        "nan": ("weights", np.full_like(w, np.nan), "tensor 'weights' holds NaN or infinite values"),
        "inf": ("weights", np.where(w > 0, np.inf, 0.0), "NaN or infinite"),
        "zero": ("weights", np.zeros_like(w), "each row of tensor 'weights' must sum to 1"),
        "big": ("weights", w * 3, r"values in \[0, 1\]"),
        "count": ("class_counts", counts * 0, r"'class_counts' must hold values in \[1, inf\]"),
    }
    for key, (name, value, match) in cases.items():
        path = replace_tensor(saved, tmp_path / f"{key}.safetensors", name, value)
        if not seal:  # a file as written before checksums existed
            header, data = split_file(path)
            del header["__metadata__"][CHECKSUM_KEY]
            join_file(path, header, data)
        _refused(path, match)


def test_weights_must_share_the_reliability_float_dtype(saved, tmp_path):
    # the support side (reliability, weights) is float64 since the exact head ranking; the
    # centroids are kept in the query dtype
    header, data = split_file(saved)
    t = {k: np.array(v) for k, v in tensors_of(header, data).items()}
    meta = {"calm": header["__metadata__"]["calm"]}
    rel = t["reliability"].dtype
    other = np.float32 if rel == np.float64 else np.float64
    save_file({**t, "weights": t["weights"].astype(other)}, str(tmp_path / "a.safetensors"), metadata=meta)
    _refused(
        tmp_path / "a.safetensors",
        f"tensor 'weights' has dtype {np.dtype(other)} but 'reliability' has {rel}",
    )
    save_file(
        {**t, "centroids": t["centroids"].astype(np.float16)}, str(tmp_path / "b.safetensors"), metadata=meta
    )
    _refused(tmp_path / "b.safetensors", "tensor 'centroids' has dtype float16, expected float32 or float64")


def test_resealed_consistent_edit_loads(saved, tmp_path, problem):
    # a well-formed file whose values obey the bounds is a valid model, checksum or not
    header, data = split_file(saved)
    w = tensors_of(header, data)["weights"]
    flat = np.zeros_like(w)
    flat[:, 0] = 1.0
    path = replace_tensor(saved, tmp_path / "r.safetensors", "weights", flat)
    assert np.array_equal(calm.load(path).weights_, flat)


def test_save_refuses_non_finite_or_negative_state(tmp_path, problem):
    X, y, _ = problem
    for attr, value, match in [
        ("weights_", np.nan, "NaN or infinite"),
        ("weights_", -0.5, r"values in \[0, 1\]"),
        ("reliability_", np.inf, "NaN or infinite"),
        ("class_counts_", 0, r"values in \[1, inf\]"),
    ]:
        clf = CALM(k=3).fit(X, y)
        getattr(clf, attr).flat[0] = value
        with pytest.raises(ValueError, match=f"cannot save.*{match}.*refit"):
            clf.save(tmp_path / "m.safetensors")
    sav = SAV(k=2).fit(X, y)
    sav.head_scores_[0] = -1
    with pytest.raises(ValueError, match="head_scores"):
        sav.save(tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_every_refusal_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    for blob in (
        b"",
        b"x" * 7,
        b"\x02" + b"\0" * 7 + b"{}",
        b"\x04" + b"\0" * 7 + b"\xff\xfe{}",
        b"\x02" + b"\0" * 7 + b"[]",
    ):
        path.write_bytes(blob)
        _refused(path, "not a readable safetensors file|no .calm. header")
    with pytest.raises(FileNotFoundError):
        calm.load(tmp_path / "absent.safetensors")
