"""The FastAPI application of `calm serve`: endpoints, admission control and the request flow.

A request is admitted (or answered 503 with Retry-After when `max_queue` clips are already in the
service), its upload read within the size limit, each clip decoded in a thread pool (off the event
loop), queued to the `Batcher` (one model thread, dynamic batches, cut over `replicas` copies of the
model) and post-processed here. Every
failure is answered for that request only (see `calm.serve.errors`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

import calm
from calm.inference import ClipError, Predictor
from calm.serve.accesslog import AccessLog
from calm.serve.batcher import Batcher, Replicas
from calm.serve.errors import CODES, ApiError, error_schema, install_handlers
from calm.serve.uploads import Upload, read_uploads

log = logging.getLogger("calm.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Service limits (the `calm serve` options)."""

    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_queue: int = 256
    max_upload_mb: float = 50.0
    max_files: int = 64
    decode_workers: int = 2
    replicas: int = 1
    model_file: str | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Service:
    """What the endpoints share: the predictor, the batcher, the decode pool and the admission count."""

    def __init__(self, predictor: Predictor, config: ServeConfig):
        self.predictor, self.config = predictor, config
        self.replicas = Replicas([p.forward for p in _copies(predictor, config.replicas)])
        self.batcher = Batcher(self.replicas, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1e3)
        self.decode_pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="calm-decode")
        self.admitted = 0  # clips in the service (reading, decoding, queued or in the model); event loop only
        self.draining = False

    def admit(self, n: int) -> None:
        """Count `n` more clips in, or refuse with 503 when the queue would be over `max_queue`."""
        if self.draining:
            raise ApiError("draining", "the server is shutting down", headers={"Retry-After": "5"})
        if self.admitted + n > self.config.max_queue:
            wait = self.batcher.seconds_per_clip * self.admitted / max(1, self.config.max_batch)
            retry = str(min(60, max(1, math.ceil(wait))))
            raise ApiError(
                "queue_full",
                f"{self.admitted} clips queued (limit {self.config.max_queue}); retry after {retry} s",
                headers={"Retry-After": retry},
            )
        self.admitted += n

    async def label(self, request: Request, upload: Upload, top_k: int) -> dict[str, Any]:
        """Decode, batch and post-process one upload: the /predict answer (raises ApiError)."""
        loop = asyncio.get_running_loop()
        try:
            clip = await loop.run_in_executor(
                self.decode_pool, partial(self.predictor.preprocess, upload.data, name=upload.name)
            )
        except ClipError as exc:
            code = "empty_body" if not upload.data else "invalid_audio"
            raise ApiError(code, f"{upload.name}: {exc.reason}") from None
        if await request.is_disconnected():
            raise ClientDisconnect()
        output, batch_size = await asyncio.wrap_future(self.batcher.submit(clip.waveform))
        request.state.batch_size = max(batch_size, getattr(request.state, "batch_size", 0) or 0)
        if isinstance(output, str):
            code = "model_error" if output.startswith("model error") else "non_finite_features"
            raise ApiError(code, f"{upload.name}: {output}")
        pred = self.predictor.postprocess(clip, output, top_k=top_k)
        return {
            "filename": upload.name,
            "label": pred.label,
            "probability": pred.probability,
            "top_k": [{"label": lab, "probability": p} for lab, p in pred.top_k],
            "duration": pred.duration,
            "model": self.predictor.model_id,
            "batch_size": batch_size,
        }


def _copies(predictor: Predictor, n: int) -> list[Predictor]:
    """`predictor` and n - 1 copies of its model; a model that cannot be copied is served alone
    (logged), since the copies only add throughput."""
    copies = [predictor]
    for _ in range(n - 1):
        try:
            copies.append(predictor.replicate())
        except Exception as exc:  # e.g. a model holding a lock or a handle that cannot be copied
            log.warning(
                "could not copy the model (%s: %s); copies in use: %d",
                type(exc).__name__,
                exc,
                len(copies),
            )
            break
    return copies


def _errors(*codes: str) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        status = CODES[code][0]
        out.setdefault(status, {"description": "", "content": error_schema()})
        out[status]["description"] += (
            "; " if out[status]["description"] else ""
        ) + f"{code}: {CODES[code][1]}"
    return out


AUDIO_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "audio/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            }
        },
    }
}
UPLOAD_ERRORS = _errors(
    "bad_request",
    "payload_too_large",
    "unsupported_media_type",
    "empty_body",
    "no_file",
    "invalid_audio",
    "non_finite_features",
    "invalid_parameter",
    "too_many_files",
    "queue_full",
    "model_error",
)


router = APIRouter()
TOP_K = Query(1, ge=1, description="How many classes to list, most probable first")


def _service(request: Request) -> Service:
    return request.app.state.service


async def _label_all(request: Request, uploads: list[Upload], top_k: int) -> list[Any]:
    service = _service(request)
    top_k = min(top_k, len(service.predictor.classes))
    return await asyncio.gather(*(service.label(request, u, top_k) for u in uploads), return_exceptions=True)


async def _guarded(request: Request, answer, *, batch: bool):
    """Admit the request, read its uploads, call `answer(uploads)`; release the queue slots after."""
    service = _service(request)
    config = service.config
    service.admit(1)
    held = 1
    try:
        uploads = await read_uploads(request, config.max_upload_bytes, max_files=config.max_files)
        if batch and len(uploads) > 1:
            service.admit(len(uploads) - 1)
            held = len(uploads)
        request.state.clips = len(uploads)
        return await answer(uploads)
    except ClientDisconnect:
        request.state.error = "client_disconnected"
        return JSONResponse({}, status_code=499)
    finally:
        service.admitted -= held


@router.post("/predict", openapi_extra=AUDIO_BODY, responses=UPLOAD_ERRORS)
async def predict(request: Request, top_k: int = TOP_K):
    """Label one audio file sent as the body (Content-Type audio/*) or as a multipart file part."""

    async def one(uploads: list[Upload]):
        if len(uploads) != 1:
            raise ApiError("too_many_files", f"{len(uploads)} files: /predict takes one, use /predict/batch")
        result = (await _label_all(request, uploads, top_k))[0]
        if isinstance(result, BaseException):
            raise result
        return result

    return await _guarded(request, one, batch=False)


@router.post("/predict/batch", openapi_extra=BATCH_BODY, responses=UPLOAD_ERRORS)
async def predict_batch(request: Request, top_k: int = TOP_K):
    """Label several files of one multipart request; a file that fails gets its own error entry."""

    async def many(uploads: list[Upload]):
        results = []
        for u, r in zip(uploads, await _label_all(request, uploads, top_k), strict=True):
            if isinstance(r, ApiError):
                r = {"filename": u.name, "error": {"status": r.status, "code": r.code, "message": r.message}}
            elif isinstance(r, BaseException):
                raise r
            results.append(r)
        return {"model": _service(request).predictor.model_id, "results": results}

    return await _guarded(request, many, batch=True)


@router.get("/health")
async def health(request: Request):
    """200 `ready` while serving; 503 `draining` once shutting down."""
    service = _service(request)
    body = {
        "status": "draining" if service.draining else "ready",
        "queued": service.admitted,
        "max_queue": service.config.max_queue,
    }
    return JSONResponse(body, status_code=503 if service.draining else 200)


@router.get("/info")
async def info(request: Request):
    """Classes, model, prompt, heads, limits and package version."""
    service = _service(request)
    config = service.config
    limits = ("max_batch", "max_wait_ms", "max_queue", "max_upload_mb", "max_files")
    return {
        **service.predictor.info(),
        "classifier": Path(config.model_file).name if config.model_file else None,
        "version": calm.__version__,
        # replicas: the copies in use (fewer than asked for when the model cannot be copied)
        "limits": {**{name: getattr(config, name) for name in limits}, "replicas": len(service.replicas)},
    }


def create_app(predictor: Predictor, config: ServeConfig | None = None) -> FastAPI:
    """The ASGI app serving `predictor`; the batcher thread runs for the app's lifespan."""
    service = Service(predictor, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        yield
        service.draining = True
        await asyncio.get_running_loop().run_in_executor(None, service.batcher.stop)
        service.replicas.close()
        service.decode_pool.shutdown(wait=True)

    app = FastAPI(
        title="calm serve",
        version=calm.__version__,
        description="A few-shot audio classifier (CALM / SAV) fitted with calm-audio. Errors: "
        + "; ".join(f"`{c}` ({s})" for c, (s, _) in CODES.items()),
        lifespan=lifespan,
    )
    app.state.service = service
    install_handlers(app)
    app.add_middleware(AccessLog)
    app.include_router(router)
    return app
