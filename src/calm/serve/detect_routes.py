"""Detection endpoints of `calm serve`: `POST /detect` (a long file) and the WebSocket `/stream`.

`POST /detect` takes an upload like `/predict` (same size limit, body and request deadlines,
admission) and answers what `calm detect` prints for the same file: the bytes go to a temporary
file that `calm.detection.detect` streams (the same allow-list probe, `--decode-timeout` per read),
in a daemon thread, with every batch of windows run by the service's model thread (`Batcher`), so
the event loop never waits on the model. `--max-audio-seconds` caps the audio it reads.

`/stream` is the live form: a JSON start message, binary PCM chunks, `{"end": true}`; events are
sent as they close (`calm.serve.stream_detect`). docs/serve.md describes both.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from fastapi import APIRouter, Query, Request, WebSocket

from calm.audio import AudioError, DecodeLimits, UnsupportedAudioError, decode_limits
from calm.audio_inputs import bytes_file
from calm.detection import DEFAULT_HOP, DEFAULT_MEDIAN, DEFAULT_THRESHOLD, DEFAULT_WINDOW, detect
from calm.errors import ParameterError
from calm.inference import ClipError, Predictor, probabilities_of
from calm.serve.api_errors import ApiError
from calm.serve.decoding import DaemonPool
from calm.serve.openapi import AUDIO_BODY, UPLOAD_ERRORS
from calm.serve.uploads import Upload

#: `_guarded(request, answer, batch=...)` of `calm.serve.app`: upload, admission and deadlines
Guarded = Callable[..., Awaitable[Any]]


class BatchedPredictor:
    """A `Predictor` whose `forward` runs on the service's model thread (its `Batcher`); `stop`
    set abandons the work (the request's deadline passed)."""

    def __init__(self, predictor: Predictor, batcher: Any, stop: threading.Event):
        self._predictor, self._batcher, self._stop = predictor, batcher, stop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def forward(self, waves: Sequence[Any]) -> list[Any]:
        if self._stop.is_set():
            raise TimeoutError("abandoned: the request's deadline passed")
        try:
            futures = [self._batcher.submit(w) for w in waves]
        except RuntimeError:  # the batcher stopped
            raise ApiError("draining", "the server is shutting down", headers={"Retry-After": "5"}) from None
        return [probabilities_of(f.result()[0]) for f in futures]  # of `Predictor.forward_scored`'s


def _pool(request: Request) -> DaemonPool:
    """The detection threads, one per decode worker (kept apart from the decode pool, whose
    workers `/health` watches for stalls)."""
    state = request.app.state
    if getattr(state, "detect_pool", None) is None:
        state.detect_pool = DaemonPool(state.service.config.decode_workers, name="calm-detect")
    return state.detect_pool


def _run(service: Any, upload: Upload, options: dict[str, Any], stop: threading.Event) -> dict[str, Any]:
    """`calm.detection.detect` on the upload's bytes (in a detection thread)."""
    config = service.config
    cap = config.max_audio_seconds

    def progress(p: Any) -> None:
        if stop.is_set():
            raise TimeoutError("abandoned: the request's deadline passed")
        if cap is not None and p.audio_seconds > cap:
            raise AudioError(upload.name, f"more than --max-audio-seconds ({cap:g} s) of audio")

    limits = DecodeLimits(timeout_s=config.decode_timeout_s, max_seconds=None)
    with bytes_file(upload.data, upload.name) as path, decode_limits(limits):
        proxy = cast(Predictor, BatchedPredictor(service.predictor, service.batcher, stop))
        result = detect(proxy, path, progress=progress, batch_size=config.max_batch, **options)
    return {
        **result.as_dict(),
        "source": upload.name,
        "filename": upload.name,
        "model": service.predictor.model_id,
    }


async def detect_upload(request: Request, upload: Upload, options: dict[str, Any]) -> dict[str, Any]:
    """The /detect answer for one upload (raises ApiError naming the file)."""
    if not upload.data:
        raise ApiError("empty_body", f"{upload.name}: no audio data")
    stop = threading.Event()
    service = request.app.state.service
    try:
        return await asyncio.wrap_future(_pool(request).submit(lambda: _run(service, upload, options, stop)))
    except UnsupportedAudioError as exc:
        raise ApiError("unsupported_audio_format", f"{upload.name}: {exc.reason}") from None
    except (AudioError, ClipError) as exc:
        raise ApiError("invalid_audio", f"{upload.name}: {exc.reason}") from None
    except ParameterError as exc:
        raise ApiError("invalid_parameter", str(exc)) from None
    finally:
        stop.set()  # a deadline that cancelled the await stops the thread at its next batch


def router_for(guarded: Guarded) -> APIRouter:
    """The detection routes; `guarded` is the app's upload / admission / deadline wrapper."""
    from calm.serve.stream_session import stream_session

    router = APIRouter()

    @router.post("/detect", openapi_extra=AUDIO_BODY, responses=UPLOAD_ERRORS)
    async def detect_events(
        request: Request,
        window: float = Query(DEFAULT_WINDOW, gt=0, allow_inf_nan=False, description="Window seconds"),
        hop: float = Query(DEFAULT_HOP, gt=0, allow_inf_nan=False, description="Seconds between windows"),
        threshold: float = Query(DEFAULT_THRESHOLD, ge=0, le=1, description="Score an event needs"),
        median: int = Query(DEFAULT_MEDIAN, ge=1, description="Median filter length in windows (odd)"),
        background: list[str] = Query([], description="Classes that are never events (repeatable)"),
    ):
        """Events (onset, offset, label, score) in one long audio file, as `calm detect` finds them."""
        options: dict[str, Any] = {"window": window, "hop": hop, "threshold": threshold, "median": median}
        options["background"] = tuple(background)

        async def one(uploads: list[Upload]):
            if len(uploads) != 1:
                raise ApiError("too_many_files", f"{len(uploads)} files: /detect takes one")
            return await detect_upload(request, uploads[0], options)

        return await guarded(request, one, batch=False)

    @router.websocket("/stream")
    async def stream(websocket: WebSocket):
        await stream_session(websocket)

    return router
