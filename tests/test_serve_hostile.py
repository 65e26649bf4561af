"""Issue 23: the hostile uploads and clients of items 1-3 and 9 against a real uvicorn on 127.0.0.1
(an ephemeral port, `calm serve`'s HTTP protocol, a model-free predictor decoding with `calm.audio`).
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from calm.serve.app import ServeConfig, create_app  # noqa: E402
from tests.helpers.serve_app import LiveServer, tiny_predictor, wav_bytes  # noqa: E402
from tests.test_audio_safety import FifoWatch, playlist  # noqa: E402

# a request whose 9-byte body never comes
STALLED = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: 9\r\n\r\n"


@pytest.fixture(scope="module")
def predictor():
    return tiny_predictor()


def read_response(s: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP response read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        ),
        None,
    )
    while (length is None or len(body) < length) and (chunk := s.recv(65536)):
        body += chunk
    return head, body


def served(predictor, **limits):
    return LiveServer(create_app(predictor, ServeConfig(**limits)))


def test_a_good_clip_is_labelled(predictor):
    with served(predictor) as live:
        r = httpx.post(live.url + "/predict", content=wav_bytes(), headers={"Content-Type": "audio/wav"})
    assert r.status_code == 200, r.text
    assert r.json()["label"] in ("low", "high") and abs(r.json()["duration"] - 1.0) < 1e-6


def test_playlist_uploads_get_415_and_the_named_file_is_never_opened(predictor, tmp_path):
    watch = FifoWatch(tmp_path / "secret.wav")
    body = playlist(watch.path).encode()
    with served(predictor) as live:
        raw = httpx.post(
            live.url + "/predict",
            content=body,
            headers={"Content-Type": "audio/wav", "X-Filename": "x.m3u8"},
            timeout=10,
        )
        parts = [
            httpx.post(live.url + "/predict", files={"file": (name, body)}, timeout=10)
            for name in ("x.m3u8", "x.m3u", "x.wav")
        ]
        live_list = httpx.post(
            live.url + "/predict",
            content=playlist(watch.path, end=False).encode(),
            headers={"Content-Type": "audio/wav", "X-Filename": "live.m3u8"},
            timeout=10,
        )
    for r in (raw, *parts, live_list):
        assert r.status_code == 415, r.text
        err = r.json()["error"]
        assert err["code"] == "unsupported_audio_format" and "a playlist" in err["message"], err
    assert "x.m3u8: unsupported format" in raw.json()["error"]["message"]
    assert not watch.close(), "the server opened the file the playlist names"


def test_decode_deadline_and_audio_cap_answer_422(predictor, monkeypatch):
    import calm.audio

    monkeypatch.setattr(calm.audio, "SOUNDFILE_SUFFIXES", frozenset())  # decoded frame by frame by PyAV
    with served(predictor, decode_timeout_s=1e-9) as live:
        late = httpx.post(live.url + "/predict", content=wav_bytes(), headers={"Content-Type": "audio/wav"})
    with served(predictor, max_audio_seconds=0.5) as live:
        long = httpx.post(live.url + "/predict", content=wav_bytes(), headers={"Content-Type": "audio/wav"})
    for r, words in ((late, "decoding took longer than 1e-09 s"), (long, "longer than 0.5 s")):
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_audio", r.text
        assert words in r.json()["error"]["message"], r.text


def test_256_slow_clients_do_not_stop_a_good_request(predictor):
    """Item 3: slow bodies no longer hold queue slots; they are cut at the body deadline."""
    with served(predictor, body_timeout_s=3.0) as live:
        slow = []
        try:
            for _ in range(256):
                s = live.connect()
                s.sendall(
                    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
                    b"Content-Length: 100000\r\n\r\nR"
                )
                slow.append(s)
            time.sleep(0.5)  # every slow request is inside the app, waiting for its body
            health = httpx.get(live.url + "/health", timeout=5).json()
            assert health["requests"] >= 250, health
            start = time.monotonic()
            r = httpx.post(
                live.url + "/predict", content=wav_bytes(), headers={"Content-Type": "audio/wav"}, timeout=30
            )
            assert r.status_code == 200, r.text
            assert time.monotonic() - start < 5.0
            # the slow ones are answered 408 at the body deadline, with the JSON error
            slow[0].settimeout(10)
            head, body = read_response(slow[0])
            assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "body_timeout"
        finally:
            for s in slow:
                s.close()


def test_connection_caps_and_health_saturation(predictor):
    with served(predictor, max_connections=4, max_per_client=3, body_timeout_s=5.0) as live:
        slow = []
        try:
            for _ in range(3):
                s = live.connect()
                s.sendall(STALLED)
                slow.append(s)
            time.sleep(0.3)
            r = httpx.post(live.url + "/predict", content=wav_bytes(), headers={"Content-Type": "audio/wav"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
            assert "from 127.0.0.1" in r.json()["error"]["message"] and r.headers["Retry-After"] == "1"
            s = live.connect()
            s.sendall(STALLED)
            slow.append(s)
            time.sleep(0.3)
            h = httpx.get(live.url + "/health")
            assert h.status_code == 503 and h.json()["status"] == "busy" and "in flight" in h.json()["reason"]
        finally:
            for s in slow:
                s.close()
        time.sleep(0.3)
        h = httpx.get(live.url + "/health")
        assert h.status_code == 200 and h.json()["status"] == "ready", h.text


def test_a_non_numeric_content_length_gets_the_json_error(predictor):
    with served(predictor) as live:
        s = live.connect()
        s.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nContent-Length: abc\r\n\r\n"
        )
        head, body = read_response(s)
        s.close()
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower(), head
    err = json.loads(body)["error"]
    assert err["status"] == 400 and err["code"] == "bad_request" and "Content-Length" in err["message"]


def test_api_key(predictor):
    with served(predictor, api_key="s3cret") as live:
        ok_health = httpx.get(live.url + "/health")
        no_key = httpx.post(live.url + "/predict", content=wav_bytes(), headers={"Content-Type": "audio/wav"})
        wrong = httpx.get(live.url + "/info", headers={"Authorization": "Bearer nope"})
        right = httpx.post(
            live.url + "/predict",
            content=wav_bytes(),
            headers={"Content-Type": "audio/wav", "Authorization": "Bearer s3cret"},
        )
    assert ok_health.status_code == 200
    for r in (no_key, wrong):
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert right.status_code == 200, right.text


def test_request_deadline_answers_503(predictor, monkeypatch):
    import calm.audio

    real = calm.audio.load_audio

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    with served(predictor, request_timeout_s=0.5) as live:
        monkeypatch.setattr(calm.audio, "load_audio", slow)
        start = time.monotonic()
        r = httpx.post(live.url + "/predict", content=wav_bytes(), headers={"Content-Type": "audio/wav"})
        took = time.monotonic() - start
    assert r.status_code == 503 and r.json()["error"]["code"] == "request_timeout", r.text
    assert took < 1.4


def test_many_playlists_at_once_leave_the_service_ready(predictor, tmp_path):
    """Item 2: hostile uploads are refused at once, so they cannot pile up in the decode workers."""
    body = playlist(tmp_path / "a.wav", end=False).encode()
    headers = {"Content-Type": "audio/wav", "X-Filename": "live.m3u8"}
    with served(predictor) as live, ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda _: httpx.post(live.url + "/predict", content=body, headers=headers).status_code,
                range(16),
            )
        )
        start = time.monotonic()
        good = httpx.post(live.url + "/predict", content=wav_bytes(), headers={"Content-Type": "audio/wav"})
        assert good.status_code == 200 and time.monotonic() - start < 5
        assert httpx.get(live.url + "/health").json()["status"] == "ready"
    assert set(codes) == {415}


def test_a_connection_that_never_completes_its_headers_is_closed(predictor, monkeypatch):
    import calm.serve.server

    monkeypatch.setattr(calm.serve.server, "HEADER_TIMEOUT_S", 0.5)
    with served(predictor) as live:
        idle, partial = live.connect(), live.connect()
        partial.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
        for s in (idle, partial):
            s.settimeout(10)
            start = time.monotonic()
            assert s.recv(100) == b""  # closed by the server
            assert time.monotonic() - start < 5
            s.close()
        r = httpx.post(live.url + "/predict", content=wav_bytes(), headers={"Content-Type": "audio/wav"})
        assert r.status_code == 200


def test_rate_limit_per_client(predictor):
    with pytest.raises(ValueError, match="give e.g. 60/minute"):
        ServeConfig(rate_limit="lots")
    with served(predictor, rate_limit="3/minute") as live:
        codes = [httpx.get(live.url + "/info").status_code for _ in range(4)]
        limited = httpx.get(live.url + "/info")
        health = httpx.get(live.url + "/health")
    assert codes == [200, 200, 200, 429] and health.status_code == 200
    assert (
        limited.json()["error"]["code"] == "rate_limited" and 1 <= int(limited.headers["Retry-After"]) <= 60
    )
