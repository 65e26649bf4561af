"""One WebSocket `/stream` session: the start message, PCM chunks, events as they close, a summary.

Protocol (docs/serve.md "WebSocket /stream"): the client sends a JSON text message `{"sample_rate":
<the model's rate>, "format": "f32le" | "s16le", "window", "hop", "threshold", "thresholds",
"median", "background", "scores"}` (all but `sample_rate` optional), then binary chunks of
little-endian mono PCM of any size (a sample may straddle two chunks), then `{"end": true}`. The
server answers `{"type": "ready", ...}`, `{"type": "event", onset, offset, label, score}` for each
event once it is final, `{"type": "scores", "windows": [...]}` when asked, and `{"type":
"summary", ...}` before closing with 1000. A protocol error or a limit is one `{"type": "error",
"error": {"code", "message"}}` message and a close code (`CLOSE_CODES`). Windows run on the
service's model thread (`Batcher`); the loop only awaits them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from calm.detection import (
    DEFAULT_HOP,
    DEFAULT_MEDIAN,
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW,
    check_settings,
    class_thresholds,
)
from calm.errors import CalmError, ParameterError
from calm.inference import probabilities_of
from calm.serve.api_errors import ApiError
from calm.serve.guard import bearer_ok
from calm.serve.stream_detect import StreamDetector

#: sample formats of the binary chunks -> numpy dtype and the scale to [-1, 1]
FORMATS = {"f32le": ("<f4", 1.0), "s16le": ("<i2", 1 / 32768)}
#: error code -> WebSocket close code
CLOSE_CODES = {
    "bad_message": 1003,
    "invalid_parameter": 1007,
    "invalid_audio": 1007,
    "unauthorized": 1008,
    "idle_timeout": 1008,
    "stream_too_long": 1009,
    "model_error": 1011,
    "queue_full": 1013,
    "draining": 1013,
}
START_KEYS = {"sample_rate", "format", "window", "hop", "threshold", "thresholds", "median", "background"}
START_KEYS |= {"scores"}


class StreamError(CalmError):
    """A protocol error or a limit of a `/stream`: sent as the error message, then the close code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _number(start: dict[str, Any], key: str, default: float) -> float:
    value = start.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise StreamError("invalid_parameter", f"{key} must be a number, got {value!r}")
    return float(value)


def parse_start(text: str | None, predictor: Any) -> tuple[StreamDetector, str, bool]:
    """(detector, sample format, whether to send window scores) from the start message."""
    try:
        start = json.loads(text) if text is not None else None
    except ValueError:
        start = None
    if not isinstance(start, dict):
        raise StreamError("bad_message", 'the first message must be a JSON object {"sample_rate": ...}')
    unknown = sorted(set(start) - START_KEYS)
    if unknown:
        raise StreamError("bad_message", f"unknown keys {unknown}; known: {sorted(START_KEYS)}")
    rate = int(predictor.extractor.sample_rate)
    if start.get("sample_rate") != rate:
        raise StreamError(
            "invalid_parameter",
            f"sample_rate must be the model's {rate} Hz, got {start.get('sample_rate')!r}",
        )
    fmt = start.get("format", "f32le")
    if fmt not in FORMATS:
        raise StreamError("invalid_parameter", f"format must be one of {list(FORMATS)}, got {fmt!r}")
    window, hop = _number(start, "window", DEFAULT_WINDOW), _number(start, "hop", DEFAULT_HOP)
    median = _number(start, "median", DEFAULT_MEDIAN)
    threshold = _number(start, "threshold", DEFAULT_THRESHOLD)
    per_class = start.get("thresholds") or {}
    background = start.get("background") or []
    if not isinstance(per_class, dict) or not isinstance(background, list):
        raise StreamError("invalid_parameter", "thresholds must be an object, background a list")
    classes = list(predictor.classes)
    try:
        if median != int(median):
            raise ParameterError(f"median must be an odd number of windows >= 1, got {median:g}")
        check_settings(predictor, window, hop, int(median), 1, background)
        thresholds = class_thresholds(classes, threshold, per_class)
    except (ParameterError, TypeError, ValueError) as exc:
        raise StreamError("invalid_parameter", str(exc)) from None
    detector = StreamDetector(classes, rate, window, hop, thresholds, int(median), background)
    return detector, fmt, bool(start.get("scores", False))


class Session:
    """The state of one stream: the detector, the byte and second caps, leftover bytes."""

    def __init__(self, websocket: WebSocket, service: Any):
        self.websocket, self.service = websocket, service
        self.config = service.config
        self.detector: StreamDetector | None = None
        self.dtype, self.scale, self.scores = "<f4", 1.0, False
        self.pending = b""
        self.received = 0
        self.scored = 0  # windows whose scores were sent

    async def receive(self) -> Any:
        try:
            return await asyncio.wait_for(self.websocket.receive(), self.config.body_timeout_s)
        except TimeoutError:
            raise StreamError(
                "idle_timeout", f"no message within {self.config.body_timeout_s:g} s (--body-timeout)"
            ) from None

    def samples(self, data: bytes) -> np.ndarray:
        """The samples of a binary chunk (a partial sample waits for the next chunk), within the caps."""
        self.received += len(data)
        if self.received > self.config.max_upload_bytes:
            raise StreamError(
                "stream_too_long", f"over {self.config.max_upload_bytes} bytes (--max-upload-mb)"
            )
        data, width = self.pending + data, np.dtype(self.dtype).itemsize
        cut = len(data) - len(data) % width
        self.pending = data[cut:]
        wave = np.frombuffer(data[:cut], dtype=self.dtype).astype(np.float32) * np.float32(self.scale)
        if not np.isfinite(wave).all():
            raise StreamError("invalid_audio", "NaN or infinite samples")
        assert self.detector is not None
        seconds = (self.detector.samples + len(wave)) / self.detector.rate
        cap = self.config.max_audio_seconds
        if cap is not None and seconds > cap:
            raise StreamError("stream_too_long", f"more than {cap:g} s of audio (--max-audio-seconds)")
        return wave

    async def run_windows(self, windows: list[tuple[int, np.ndarray]]) -> None:
        """Score the windows on the model thread, then send what closed."""
        assert self.detector is not None
        if not windows and not self.detector.ended:
            return
        try:
            futures = [asyncio.wrap_future(self.service.batcher.submit(w)) for _, w in windows]
        except RuntimeError as exc:  # the batcher stopped: the server is shutting down
            raise StreamError("draining", f"the server is shutting down ({exc})") from None
        try:
            results = await asyncio.gather(*futures)
        except Exception as exc:  # a model batch failed (logged by the batcher)
            raise StreamError("model_error", f"the model failed: {type(exc).__name__}: {exc}") from None
        for (start, _), (output, _) in zip(windows, results, strict=True):  # `Predictor.forward_scored`'s
            self.detector.add(start, probabilities_of(output))
        if self.scores and len(self.detector.rows) > self.scored:
            await self.websocket.send_json(
                {"type": "scores", "windows": self.detector.window_scores(self.scored)}
            )
            self.scored = len(self.detector.rows)
        for event in self.detector.closed():
            await self.websocket.send_json({"type": "event", **event.as_dict()})

    async def start(self) -> None:
        message = await self.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        self.detector, fmt, self.scores = parse_start(message.get("text"), self.service.predictor)
        self.dtype, self.scale = FORMATS[fmt]
        ready = {
            "type": "ready",
            "sample_rate": self.detector.rate,
            "format": fmt,
            "window": self.detector.window,
        }
        ready |= {"hop": self.detector.hop, "classes": [str(c) for c in self.detector.classes]}
        await self.websocket.send_json(ready)

    async def run(self) -> bool:
        """Read chunks until the end message; False when the client closed first."""
        assert self.detector is not None
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                return False
            if message.get("bytes") is not None:
                await self.run_windows(self.detector.feed(self.samples(message["bytes"])))
                continue
            try:
                end = json.loads(message.get("text") or "")
            except ValueError:
                end = None
            if end != {"end": True}:
                raise StreamError(
                    "bad_message", 'after the start message: binary PCM chunks, then {"end": true}'
                )
            return True

    async def finish(self) -> None:
        assert self.detector is not None
        windows = self.detector.end()
        if not self.detector.rows and not windows:
            raise StreamError(
                "invalid_audio", f"too short: shorter than one window ({self.detector.window:g} s)"
            )
        await self.run_windows(windows)
        await self.websocket.send_json({"type": "summary", **self.detector.summary()})


async def stream_session(websocket: WebSocket) -> None:
    """Serve one `/stream` connection (see the module docstring)."""
    service = websocket.app.state.service
    await websocket.accept()
    admitted = False
    try:
        key = service.config.api_key
        if key and not bearer_ok(websocket.scope, key.encode()):
            raise StreamError("unauthorized", "send Authorization: Bearer <key>")
        try:
            service.admit(1)
            admitted = True
        except ApiError as exc:
            raise StreamError(exc.code, exc.message) from None
        session = Session(websocket, service)
        await session.start()
        if await session.run():
            await session.finish()
            await websocket.close(1000)
    except StreamError as exc:
        try:
            await websocket.send_json({"type": "error", "error": {"code": exc.code, "message": exc.message}})
            await websocket.close(CLOSE_CODES[exc.code])
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client is gone
    except WebSocketDisconnect:
        pass
    finally:
        if admitted:
            service.admitted -= 1
