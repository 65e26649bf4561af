"""`calm.serve.batcher`: dynamic batches in one model thread, and a batch cut over model replicas."""

from __future__ import annotations

import threading

import pytest

from calm.serve.batcher import Batcher, Replicas


class Recorder:
    """A forward that records its calls, checks it never runs in two threads at once, and can
    wait at a barrier shared with other replicas (which only passes if they run at the same time)."""

    def __init__(self, name: str, barrier: threading.Barrier | None = None):
        self.name, self.barrier = name, barrier
        self.calls: list[list[int]] = []
        self._busy = threading.Lock()

    def __call__(self, batch):
        assert self._busy.acquire(blocking=False), f"{self.name} ran in two threads at once"
        try:
            self.calls.append(list(batch))
            if self.barrier is not None and len(batch):
                self.barrier.wait(timeout=10)
            return [(self.name, x * 10) for x in batch]
        finally:
            self._busy.release()


def test_replicas_cut_a_batch_into_parts_run_at_once_in_order():
    barrier = threading.Barrier(2)
    a, b = Recorder("a", barrier), Recorder("b", barrier)
    replicas = Replicas([a, b])
    try:
        out = replicas([1, 2, 3, 4, 5])
    finally:
        replicas.close()
    assert out == [("a", 10), ("a", 20), ("b", 30), ("b", 40), ("b", 50)]
    assert a.calls == [[1, 2]] and b.calls == [[3, 4, 5]]


def test_replicas_one_clip_runs_on_the_first_replica_only():
    a, b, c = Recorder("a"), Recorder("b"), Recorder("c")
    replicas = Replicas([a, b, c])
    try:
        assert replicas([7]) == [("a", 70)]
        assert replicas([1, 2]) == [("a", 10), ("b", 20)]
    finally:
        replicas.close()
    assert c.calls == [] and len(replicas) == 3
    with pytest.raises(ValueError):
        Replicas([])


def test_batcher_groups_waiting_clips_and_resolves_each_future():
    forward = Recorder("m")
    gate = threading.Event()

    def slow_first(batch):
        gate.wait(10)  # the first batch holds the model while the others queue up
        return forward(batch)

    batcher = Batcher(slow_first, max_batch=3, max_wait_s=0.0)
    batcher.start()
    try:
        futures = [batcher.submit(i) for i in range(7)]
        gate.set()
        results = [f.result(timeout=10) for f in futures]
    finally:
        batcher.stop(timeout=10)
    assert [out for out, _ in results] == [("m", 10 * i) for i in range(7)]
    assert all(len(call) <= 3 for call in forward.calls)
    assert sum(len(call) for call in forward.calls) == 7 and max(len(c) for c in forward.calls) > 1
    assert batcher.clips == 7 and batcher.batches == len(forward.calls)
    with pytest.raises(RuntimeError):
        batcher.submit(8)


def test_auto_replicas_one_per_core_within_the_weight_budget_on_cpu_only():
    from calm.serve.batcher import REPLICA_BUDGET_BYTES, auto_replicas

    tiny = 80 * 2**20  # about whisper-tiny.en in bf16
    assert (
        auto_replicas(tiny, "cpu", 2) == 2 and auto_replicas(tiny, "cpu", 64) == REPLICA_BUDGET_BYTES // tiny
    )
    assert auto_replicas(15 * 2**30, "cpu", 16) == 1  # a 7B model: one copy
    assert auto_replicas(tiny, "cuda", 16) == 1 and auto_replicas(tiny, "cuda:1", 16) == 1
    assert auto_replicas(None, "cpu", 8) == 1 and auto_replicas(tiny, "cpu", 1) == 1


def test_predictor_weight_bytes_and_replicate():
    import torch

    from calm.inference import Predictor

    class Ext:
        def __init__(self):
            self.model = torch.nn.Linear(4, 3)  # 12 weights + 3 biases, float32

    class Clf:
        classes_ = ["a", "b"]

    pred = Predictor(Clf(), Ext())
    assert pred.weight_bytes() == 15 * 4
    twin = pred.replicate()
    assert twin.classifier is pred.classifier and twin.extractor.model is not pred.extractor.model
    assert torch.equal(twin.extractor.model.weight, pred.extractor.model.weight)
    assert Predictor(Clf(), object()).weight_bytes() is None


def test_a_model_that_cannot_be_copied_is_served_alone(caplog):
    import threading

    pytest.importorskip("fastapi")
    from calm.inference import Predictor
    from calm.serve.app import ServeConfig, Service

    class Ext:
        def __init__(self):
            self.lock = threading.Lock()  # deepcopy refuses it

    class Clf:
        classes_ = ["a", "b"]

    with caplog.at_level("WARNING", logger="calm.serve"):
        service = Service(Predictor(Clf(), Ext()), ServeConfig(replicas=3))
    try:
        assert len(service.replicas) == 1
        assert "could not copy the model" in caplog.text and "copies in use: 1" in caplog.text
    finally:
        service.replicas.close()
        service.decode_pool.shutdown()
