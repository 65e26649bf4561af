"""Issue 26: detection in `calm serve` over a real socket (uvicorn on 127.0.0.1, an ephemeral port):
`POST /detect` and the WebSocket `/stream` give the events of `calm.detection.detect` on the same
recording (tests/test_detect.py's band-energies classifier and 60 s recording with tone bursts);
the stream's protocol errors and limits get their documented error message and close code; the
incremental detector closes the same events as the batch one."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("websockets")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from calm.detection import class_thresholds, detect, events_of, smooth, windows_of  # noqa: E402
from calm.inference import Predictor, load_predictor  # noqa: E402
from calm.serve.app import ServeConfig, create_app  # noqa: E402
from calm.serve.stream_detect import StreamDetector  # noqa: E402
from tests.helpers.serve_app import LiveServer  # noqa: E402
from tests.test_detect import RATE, band_model, classifier, invoke, long_flac, model_file  # noqa: E402, F401

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def predictor(classifier):  # noqa: F811
    return Predictor(classifier.classifier_, classifier._checked_extractor())


@pytest.fixture(scope="module")
def expected(predictor, long_flac):  # noqa: F811
    return detect(predictor, long_flac)


def served(predictor, **limits):
    return LiveServer(create_app(predictor, ServeConfig(replicas=1, max_wait_ms=1, **limits)))


def ws_url(live) -> str:
    return f"ws://127.0.0.1:{live.port}/stream"


def same_events(got: list[dict], want) -> None:
    assert [(e["onset"], e["offset"], e["label"]) for e in got] == [
        (e.onset, e.offset, e.label) for e in want
    ]
    assert np.allclose([e["score"] for e in got], [e.score for e in want], atol=1e-6)


def drain(ws) -> list[dict]:
    """Every message until the server closes."""
    out = []
    try:
        while True:
            out.append(json.loads(ws.recv(timeout=60)))
    except ConnectionClosed:
        return out


def test_streamed_random_chunks_give_the_events_of_detect(predictor, long_flac, expected):  # noqa: F811
    wave, _ = sf.read(long_flac, dtype="float32")
    data = wave.astype("<f4").tobytes()
    rng = np.random.default_rng(0)
    with served(predictor) as live, connect(ws_url(live)) as ws:
        ws.send(json.dumps({"sample_rate": RATE, "format": "f32le"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"
        half, i = len(data) // 2, 0
        while i < half:  # the first 30 s, in chunks that split samples
            n = int(rng.integers(1, 40000))
            ws.send(data[i : min(i + n, half)])
            i = min(i + n, half)
        first = json.loads(ws.recv(timeout=30))  # a burst before 30 s closes while streaming
        assert first["type"] == "event" and first["offset"] < 30, first
        while i < len(data):
            n = int(rng.integers(1, 40000))
            ws.send(data[i : i + n])
            i += n
        ws.send(json.dumps({"end": True}))
        rest = drain(ws)
        assert ws.close_code == 1000
    events = [first] + [m for m in rest if m["type"] == "event"]
    same_events(events, expected.events)
    summary = rest[-1]
    assert summary["type"] == "summary" and summary["windows"] == len(expected.starts)
    assert summary["duration"] == pytest.approx(expected.duration) and summary["events"] == len(events)


def test_s16le_stream_with_scores_and_options(predictor, long_flac):  # noqa: F811
    pcm, _ = sf.read(long_flac, dtype="int16")
    want = detect(predictor, long_flac, window=1.5, hop=0.25, median=5, threshold=0.6, background=["noise"])
    data = pcm.astype("<i2").tobytes()
    start = {"sample_rate": RATE, "format": "s16le", "window": 1.5, "hop": 0.25, "median": 5}
    start |= {"threshold": 0.6, "background": ["noise"], "scores": True}
    with served(predictor) as live, connect(ws_url(live)) as ws:
        ws.send(json.dumps(start))
        for i in range(0, len(data), 12345):
            ws.send(data[i : i + 12345])
        ws.send(json.dumps({"end": True}))
        messages = drain(ws)
    same_events([m for m in messages if m["type"] == "event"], want.events)
    windows = [w for m in messages if m["type"] == "scores" for w in m["windows"]]
    assert [w["onset"] for w in windows] == pytest.approx(want.starts.tolist())
    got = np.array([[w["probabilities"][str(c)] for c in want.classes] for w in windows])
    assert np.allclose(got, want.probabilities, atol=1e-6)


def test_post_detect_equals_detect(predictor, long_flac, expected):  # noqa: F811
    body = long_flac.read_bytes()
    with served(predictor) as live:
        raw = httpx.post(
            live.url + "/detect",
            content=body,
            headers={"Content-Type": "audio/flac", "X-Filename": "field.flac"},
            timeout=60,
        )
        multi = httpx.post(
            live.url + "/detect",
            params={"window": 1.5, "hop": 0.25, "median": 5, "background": "noise"},
            files={"file": ("field.flac", body)},
            timeout=60,
        )
        bad = httpx.post(
            live.url + "/detect", params={"hop": 3}, content=body, headers={"Content-Type": "audio/flac"}
        )
        short = httpx.post(
            live.url + "/detect",
            params={"window": 5},
            content=body[:2000],
            headers={"Content-Type": "audio/flac"},
        )
    assert raw.status_code == 200, raw.text
    answer = raw.json()
    same_events(answer["events"], expected.events)
    assert answer["windows"] == len(expected.starts) and answer["duration"] == pytest.approx(
        expected.duration
    )
    assert answer["filename"] == "field.flac" and answer["model"] == predictor.model_id
    want = detect(predictor, long_flac, window=1.5, hop=0.25, median=5, background=["noise"])
    assert multi.status_code == 200, multi.text
    same_events(multi.json()["events"], want.events)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_parameter", bad.text
    assert short.status_code == 422 and short.json()["error"]["code"] == "invalid_audio", short.text


def test_post_detect_is_calm_detect_on_the_model_thread(model_file, long_flac, tmp_path):  # noqa: F811
    out = tmp_path / "events.json"
    res = invoke(model_file, long_flac, "--background", "noise", "--median", "5", "--json", out, "--quiet")
    assert res.exit_code == 0, res.output
    cli = json.loads(out.read_text())[0]
    app = create_app(load_predictor(model_file), ServeConfig(replicas=1))
    batcher = app.state.service.batcher
    submitted = []
    submit = batcher.submit
    batcher.submit = lambda wave: submitted.append(len(wave)) or submit(wave)
    with LiveServer(app) as live:
        r = httpx.post(
            live.url + "/detect",
            params={"background": "noise", "median": 5},
            files={"file": ("field.flac", long_flac.read_bytes())},
            timeout=60,
        )
    assert r.status_code == 200, r.text
    answer = r.json()
    for key in (
        "duration",
        "window",
        "hop",
        "windows",
        "failed_windows",
        "thresholds",
        "background",
        "events",
    ):
        assert answer[key] == cli[key], key
    assert answer["source"] == "field.flac" and len(answer["events"]) == 4
    assert submitted == [RATE] * answer["windows"]  # every window went through the batcher


def test_post_detect_caps_the_audio_seconds(predictor, long_flac):  # noqa: F811
    with served(predictor, max_audio_seconds=20) as live:
        r = httpx.post(
            live.url + "/detect", content=long_flac.read_bytes(), headers={"Content-Type": "audio/flac"}
        )
    assert r.status_code == 422 and "more than --max-audio-seconds (20 s)" in r.json()["error"]["message"], (
        r.text
    )


def error_of(live, first, *, chunks=(), headers=None) -> tuple[dict, int]:
    with connect(ws_url(live), additional_headers=headers) as ws:
        for c in [first, *chunks]:
            try:
                ws.send(c)
            except ConnectionClosed:
                break
        messages = drain(ws)
        return messages[-1], ws.close_code


@pytest.mark.parametrize(
    "first, code, close",
    [
        ("not json", "bad_message", 1003),
        (b"\x00\x01", "bad_message", 1003),
        (json.dumps({"sample_rate": 44100}), "invalid_parameter", 1007),
        (json.dumps({"sample_rate": RATE, "format": "u8"}), "invalid_parameter", 1007),
        (json.dumps({"sample_rate": RATE, "hop": 2.0}), "invalid_parameter", 1007),
        (json.dumps({"sample_rate": RATE, "background": ["cat"]}), "invalid_parameter", 1007),
        (json.dumps({"sample_rate": RATE, "rate": 1}), "bad_message", 1003),
    ],
)
def test_a_bad_first_message_gets_an_error_and_a_close_code(predictor, first, code, close):
    with served(predictor) as live:
        error, got = error_of(live, first)
    assert error["type"] == "error" and error["error"]["code"] == code and got == close, error


def test_stream_limits_api_key_and_idle_timeout(predictor):
    start = json.dumps({"sample_rate": RATE})
    with served(predictor, max_upload_mb=0.5, api_key="k", body_timeout_s=1.0) as live:
        auth = {"Authorization": "Bearer k"}
        error, close = error_of(live, start, chunks=[b"\0" * 200_000] * 4, headers=auth)
        assert (error["error"]["code"], close) == ("stream_too_long", 1009), error
        error, close = error_of(live, start, headers={"Authorization": "Bearer nope"})
        assert (error["error"]["code"], close) == ("unauthorized", 1008), error
        error, close = error_of(live, start, headers=auth)  # nothing after the start message
        assert (error["error"]["code"], close) == ("idle_timeout", 1008), error
        error, close = error_of(live, start, chunks=[b"\0" * 3200, json.dumps({"end": True})], headers=auth)
        assert (error["error"]["code"], close) == ("invalid_audio", 1007), error
        assert httpx.get(live.url + "/health").json()["queued"] == 0


def test_a_model_failure_ends_the_stream_with_1011(predictor):
    app = create_app(predictor, ServeConfig(replicas=1))

    def broken(batch):
        raise RuntimeError("broken model")

    app.state.service.batcher.forward = broken
    with LiveServer(app) as live:
        error, close = error_of(
            live, json.dumps({"sample_rate": RATE}), chunks=[np.zeros(RATE * 2, "<f4").tobytes()]
        )
        assert (error["error"]["code"], close) == ("model_error", 1011), error
        assert "broken model" in error["error"]["message"]


def test_a_stream_outlives_the_header_timeout(predictor, monkeypatch):
    import calm.serve.server

    monkeypatch.setattr(calm.serve.server, "HEADER_TIMEOUT_S", 0.3)  # was closing upgraded sockets
    with served(predictor) as live, connect(ws_url(live)) as ws:
        ws.send(json.dumps({"sample_rate": RATE}))
        for _ in range(4):
            time.sleep(0.3)
            ws.send(np.zeros(RATE // 2, "<f4").tobytes())
        ws.send(json.dumps({"end": True}))
        messages = drain(ws)
    assert messages[-1]["type"] == "summary" and messages[-1]["windows"] == 3, messages


@pytest.mark.parametrize("median, hop", [(1, 0.5), (3, 0.5), (5, 0.3), (7, 1.0)])
def test_incremental_events_equal_the_batch_events(median, hop):
    rng = np.random.default_rng(median)
    classes = ["a", "b", "bg"]
    rate, window = 100, 1.0
    signal = rng.standard_normal(int(37.3 * rate)).astype(np.float32)
    proba_of = {}
    det = StreamDetector(classes, rate, window, hop, class_thresholds(classes, 0.5, None), median, ["bg"])
    closed = []
    for piece in np.array_split(signal, 23 if median < 5 else 900):  # pieces longer and shorter than a hop
        for start, _w in det.feed(piece):
            proba_of[start] = rng.dirichlet([0.3, 0.3, 0.3]) if start % 7 else "model error"
            det.add(start, proba_of[start])
        closed += det.closed()
    early = len(closed)
    for start, _w in det.end():
        proba_of[start] = rng.dirichlet([0.3, 0.3, 0.3])
        det.add(start, proba_of[start])
    closed += det.closed()
    starts = [s for s, _ in windows_of(iter(np.array_split(signal, 5)), round(window * rate), hop, rate)]
    assert starts == det.starts
    rows = np.array([np.full(3, np.nan) if isinstance(proba_of[s], str) else proba_of[s] for s in starts])
    want = events_of(
        np.asarray(starts) / rate,
        smooth(rows, median),
        class_thresholds(classes, 0.5, None),
        classes,
        window=window,
        duration=starts[-1] / rate + window,
        background=["bg"],
        failed=~np.isfinite(rows).all(axis=1),
    )
    assert closed == want and len(want) >= 3 and early > 0  # some events arrive before the end
