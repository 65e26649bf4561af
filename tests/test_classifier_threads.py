"""Coarse-grained chunk parallelism (calm.classifiers.threads): whole chunks in parallel threads
with single-threaded torch operations give the same scores as one thread, errors surface, and
torch's thread count is restored."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from sklearn.base import clone

from calm.classifiers import CALM, SAV
from calm.classifiers.threads import for_each, imap, torch_threads
from tests.test_classifiers_reference import make_problem

CPU = torch.device("cpu")


def test_for_each_runs_every_item_in_worker_threads_and_restores_torch_threads():
    seen: dict[int, tuple[str, int]] = {}

    def fn(i, ws):
        seen[i] = (threading.current_thread().name, torch.get_num_threads())
        time.sleep(0.01)

    before = torch.get_num_threads()
    for_each(range(10), fn, CPU, workers=2)
    assert sorted(seen) == list(range(10))
    assert {name for name, _ in seen.values()} <= {"calm-chunk_0", "calm-chunk_1"}
    assert len({name for name, _ in seen.values()}) == 2
    assert {n for _, n in seen.values()} == {1}  # single-threaded torch inside the workers
    assert torch.get_num_threads() == before


def test_for_each_reads_lazily_and_runs_small_inputs_in_this_thread():
    read, done = [], []

    def items():
        for i in range(20):
            read.append(i)
            assert len(read) - len(done) <= 2 * 2 + 1  # at most two items per worker in flight
            yield i

    def slow(i, ws):  # slower than reading: an unbounded reader would run far ahead
        time.sleep(0.005)
        done.append(i)

    for_each(items(), slow, CPU, workers=2)
    assert sorted(done) == list(range(20))
    names = []
    for_each([0], lambda i, ws: names.append(threading.current_thread().name), CPU, workers=2)
    assert names == [threading.current_thread().name]


def test_for_each_reraises_the_first_error_and_restores_torch_threads():
    before = torch.get_num_threads()

    def fn(i, ws):
        if i == 3:
            raise ValueError("X (rows 3..3) contains NaN or infinite values")

    with pytest.raises(ValueError, match="rows 3..3"):
        for_each(range(50), fn, CPU, workers=2)
    assert torch.get_num_threads() == before


def test_calm_scores_are_the_same_with_chunks_in_parallel_threads():
    Xs, ys, Xq, _ = make_problem(3, n_queries=60)
    Xq = Xq.astype(np.float32)
    clf = CALM(k=0.5, chunk_size=7).fit(Xs, ys)
    with torch_threads(1):
        one = clf.class_scores(Xq)
    with torch_threads(2):
        two = clf.class_scores(Xq)
        np.testing.assert_array_equal(clf.predict(Xq), clf.classes_[one.argmax(axis=1)])
    np.testing.assert_array_equal(one, two)
    bad = Xq.copy()
    bad[-1, 0] = np.nan
    last = (len(Xq) - 1) // 7 * 7  # the last chunk's first row
    with torch_threads(2), pytest.raises(ValueError, match=rf"rows {last}\.\.{len(Xq) - 1}\)"):
        clf.class_scores(bad)


def test_imap_yields_in_the_items_order():
    def slow_first(i, ws):
        time.sleep(0.02 if i % 3 == 0 else 0.0)
        return i * i

    assert list(imap(range(12), slow_first, CPU, workers=2)) == [i * i for i in range(12)]


@pytest.mark.parametrize(
    "est",
    [
        CALM(k=3, chunk_size=4),
        CALM(k=2, reliability="leave-one-out", chunk_size=3),
        CALM(k=0.5, weighting="global", chunk_size=5),
        SAV(k=2, chunk_size=4),
        SAV(k=3, tie_break="margin", chunk_size=3),
    ],
    ids=repr,
)
def test_fits_are_the_same_with_support_chunks_in_parallel_threads(est):
    Xs, ys, _, _ = make_problem(5, shots=6)
    with torch_threads(1):
        one = clone(est).fit(Xs, ys)
    with torch_threads(2):
        two = clone(est).fit(Xs, ys)
    for attr in ("centroids_", "reliability_", "weights_", "heads_", "head_scores_"):
        if hasattr(one, attr):
            np.testing.assert_array_equal(getattr(one, attr), getattr(two, attr))


def test_concurrent_calls_leave_torch_threads_alone():
    Xs, ys, Xq, _ = make_problem(4, n_queries=80)
    clf = CALM(k=0.5, chunk_size=5).fit(Xs, ys)
    with torch_threads(1):
        expected = clf.class_scores(Xq)
    results: list[np.ndarray] = []
    with torch_threads(2):
        workers = [threading.Thread(target=lambda: results.append(clf.class_scores(Xq))) for _ in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert torch.get_num_threads() == 2
    assert len(results) == 3
    for got in results:
        np.testing.assert_array_equal(got, expected)
