"""A tiny predictor and a real uvicorn server in a thread on 127.0.0.1 (fast serve tests).

`tiny_predictor()` pairs a SAV fitted on random features with `ToneExtractor`, a model-free
extractor whose features are a few statistics of the waveform decoded by `calm.audio` (the decode
path the service hardens is the real one). `LiveServer(app)` runs uvicorn with `calm serve`'s own
HTTP protocol on an ephemeral port and stops it on exit.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import numpy as np

RATE = 16000


class ToneExtractor:
    """2 heads x 4 statistics of a 16 kHz waveform (no model)."""

    model_id = "tone-stats"
    sample_rate = RATE
    max_seconds = 30.0
    key = {"model": "tone-stats"}
    head_names = [(0, 0, "encoder"), (0, 1, "encoder")]

    def load_input(self, path: Any) -> np.ndarray:
        from calm.audio import load_audio

        return load_audio(path, RATE, max_seconds=self.max_seconds)

    def extract(self, inputs) -> np.ndarray:
        rows = []
        for x in inputs:
            x = np.asarray(x, np.float32)
            stats = [np.abs(x).mean(), x.std(), np.abs(np.diff(x)).mean(), np.abs(x).max()]
            rows.append([stats, stats[::-1]])
        return np.asarray(rows, np.float32) + 1e-3


def tiny_predictor():
    from calm import SAV
    from calm.inference import Predictor

    rng = np.random.default_rng(0)
    X = rng.random((12, 2, 4)).astype(np.float32) + 0.1
    y = np.array(["low", "high"] * 6)
    return Predictor(SAV(k=2).fit(X, y), ToneExtractor())


def wav_bytes(seconds: float = 1.0) -> bytes:
    import io

    import soundfile as sf

    t = np.arange(int(seconds * RATE)) / RATE
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), RATE, format="WAV")
    return buf.getvalue()


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread (a context manager)."""

    def __init__(self, app, **config):
        import uvicorn

        from calm.serve.server import JsonErrorProtocol

        self.app = app
        cfg = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            http=JsonErrorProtocol,
            log_level="warning",
            lifespan="on",
            **config,
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)
