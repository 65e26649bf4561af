"""The FastAPI application of `calm serve`: endpoints, admission control and the request flow.

A request passes the `Guard` (bearer token, requests in flight), is refused at once with 503 and
Retry-After when `max_queue` clips are already in the service, has its upload read within the size
limit, the body deadline and the service's body memory, is admitted (its clips counted against
`max_queue`), each clip probed and decoded off the event loop (`calm.serve.decoding`), queued to the
`Batcher` (one model thread, dynamic batches, cut over `replicas` copies of the model) and
post-processed here, all within the request deadline (`calm.serve.deadlines`). Every failure is
answered for that request only (see `calm.serve.api_errors`).
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

import calm
from calm.audio import DecodeLimits
from calm.errors import ParameterError
from calm.inference import Predictor, Scored
from calm.methods import EXPLAIN_HEADS
from calm.serve.accesslog import AccessLog
from calm.serve.api_errors import CODES, ApiError, install_handlers
from calm.serve.batcher import Batcher, Replicas
from calm.serve.deadlines import Deadlines
from calm.serve.decoding import Decoder
from calm.serve.detect_routes import router_for as detect_router
from calm.serve.guard import Guard, InFlight
from calm.serve.openapi import AUDIO_BODY, BATCH_BODY, UPLOAD_ERRORS
from calm.serve.uploads import BodyBudget, Upload, read_uploads

log = logging.getLogger("calm.serve")
#: seconds the shutdown waits for the model thread to finish the clips already queued
STOP_WAIT_S = 10.0


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
    body_timeout_s: float = 30.0
    request_timeout_s: float = 120.0
    decode_timeout_s: float = 10.0
    max_audio_seconds: float = 600.0
    max_connections: int = 512
    max_per_client: int | None = None
    rate_limit: str | None = None
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.rate_limit:
            try:
                from limits import parse
            except ImportError:
                raise ValueError("a rate limit needs the limits package: pip install limits") from None
            try:
                parse(self.rate_limit)
            except ValueError:
                raise ValueError(f"rate limit {self.rate_limit!r}: give e.g. 60/minute or 5/second") from None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(timeout_s=self.decode_timeout_s, max_seconds=self.max_audio_seconds)


class Service:
    """What the endpoints share: the predictor, the batcher, the decode pool and the admission count."""

    def __init__(self, predictor: Predictor, config: ServeConfig):
        self.predictor, self.config = predictor, config
        self.replicas = Replicas([p.forward_scored for p in _copies(predictor, config.replicas)])
        self.batcher = Batcher(self.replicas, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1e3)
        self.decoder = Decoder(predictor, config.decode_limits, config.decode_workers)
        self.decode_pool = self.decoder.pool
        self.deadlines = Deadlines()
        self.bodies = BodyBudget(config.max_queue * config.max_upload_bytes)
        self.inflight = InFlight()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.admitted = 0  # clips in the service (decoding, queued or in the model); event loop only
        self.draining = False

    def drain(self, seconds: float) -> None:
        """Stop admitting; requests in flight answer within `seconds` (event loop only)."""
        self.draining = True
        self.deadlines.drain(seconds)

    def admit(self, n: int) -> None:
        """Count `n` more clips in (n = 0: only check there is room), or refuse with 503 when the
        queue would be over `max_queue`."""
        if self.draining:
            raise ApiError("draining", "the server is shutting down", headers={"Retry-After": "5"})
        if self.admitted + max(n, 1) > self.config.max_queue:
            wait = self.batcher.seconds_per_clip * self.admitted / max(1, self.config.max_batch)
            retry = str(min(60, max(1, math.ceil(wait))))
            raise ApiError(
                "queue_full",
                f"{self.admitted} clips queued (limit {self.config.max_queue}); retry after {retry} s",
                headers={"Retry-After": retry},
            )
        self.admitted += n

    def saturation(self) -> str | None:
        """Why the service cannot take a request now (None: it can)."""
        config = self.config
        if self.admitted >= config.max_queue:
            return f"queue full ({self.admitted} clips)"
        if self.inflight.active >= config.max_connections:
            return f"{self.inflight.active} requests in flight"
        if self.bodies.used >= self.bodies.limit:
            return "request bodies fill the upload memory"
        if self.decoder.stalled():
            return f"every decode worker busy for over {config.decode_timeout_s:g} s"
        return None

    async def label(
        self,
        request: Request,
        upload: Upload,
        top_k: int,
        alpha: float | None = None,
        explain: int | None = None,
    ) -> dict[str, Any]:
        """Decode, batch and post-process one upload: the /predict answer (raises ApiError); the
        label is the classifier's `unknown_label` where its reject option rejects the clip, with
        `alpha` the answer holds the conformal `prediction_set` and with `explain` (heads per
        class) the `explanation` of the top-k classes (`calm.inference.Predictor.postprocess`)."""
        clip = await self.decoder.decode(upload.data, upload.name)
        if await request.is_disconnected():
            raise ClientDisconnect()
        output, batch_size = await asyncio.wrap_future(self.batcher.submit(clip.waveform))
        request.state.batch_size = max(batch_size, getattr(request.state, "batch_size", 0) or 0)
        if isinstance(output, str):
            code = "model_error" if output.startswith("model error") else "non_finite_features"
            raise ApiError(code, f"{upload.name}: {output}")
        scored: Scored = output
        try:
            pred = self.predictor.postprocess(
                clip,
                scored.probabilities,
                top_k=top_k,
                alpha=alpha,
                known=scored.known,
                explain=explain,
                features=scored.features,
            )
        except ParameterError as exc:  # e.g. explain=true for a classifier that cannot explain
            raise ApiError("invalid_parameter", str(exc)) from None
        answer = {
            "filename": upload.name,
            "label": pred.label,
            "probability": pred.probability,
            "top_k": [{"label": lab, "probability": p} for lab, p in pred.top_k],
            "duration": pred.duration,
            "model": self.predictor.model_id,
            "batch_size": batch_size,
        }
        if pred.prediction_set is not None:
            answer["prediction_set"] = pred.prediction_set
        if pred.explanation is not None:
            answer["explanation"] = pred.explanation
        return answer


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


router = APIRouter()
TOP_K = Query(1, ge=1, description="How many classes to list, most probable first")
ALPHA = Query(
    None,
    gt=0,
    lt=1,
    description="Also return the conformal prediction set at this level (e.g. 0.1: it holds the true "
    "class about 90 % of the time; empty when no class fits)",
)
EXPLAIN = Query(
    False,
    description="Also return why: the top_k classes' scores and probabilities and, for each, the `top` "
    "heads that carried its score (layer, head, source, weight, similarity, contribution)",
)
TOP = Query(EXPLAIN_HEADS, ge=1, description="With explain: how many heads to list per class")


def _service(request: Request) -> Service:
    return request.app.state.service


async def _label_all(
    request: Request,
    uploads: list[Upload],
    top_k: int,
    alpha: float | None = None,
    explain: int | None = None,
) -> list[Any]:
    service = _service(request)
    top_k = min(top_k, len(service.predictor.classes))
    return await asyncio.gather(
        *(service.label(request, u, top_k, alpha, explain) for u in uploads), return_exceptions=True
    )


async def _guarded(request: Request, answer, *, batch: bool):
    """Check there is room, read the uploads (body deadline), admit their clips, call
    `answer(uploads)` (request deadline); release the queue slots and body bytes after."""
    service = _service(request)
    config = service.config
    service.admit(0)
    held = 0
    try:
        with (
            service.deadlines.watch(config.request_timeout_s, "request_timeout") as deadline,
            service.bodies.hold() as body,
        ):
            answer_by, code = deadline.when, deadline.code or "request_timeout"
            if config.body_timeout_s < config.request_timeout_s:
                deadline.set(config.body_timeout_s, "body_timeout")
            uploads = await read_uploads(
                request, config.max_upload_bytes, max_files=config.max_files, held=body
            )
            deadline.at(answer_by, code)
            n = len(uploads) if batch else 1
            service.admit(n)
            held = n
            request.state.clips = len(uploads)
            return await answer(uploads)
    except ClientDisconnect:
        request.state.error = "client_disconnected"
        return JSONResponse({}, status_code=499)
    finally:
        service.admitted -= held


@router.post("/predict", openapi_extra=AUDIO_BODY, responses=UPLOAD_ERRORS)
async def predict(
    request: Request, top_k: int = TOP_K, alpha: float | None = ALPHA, explain: bool = EXPLAIN, top: int = TOP
):
    """Label one audio file sent as the body (Content-Type audio/*) or as a multipart file part
    ("unknown" when the classifier's reject option rejects it)."""

    async def one(uploads: list[Upload]):
        if len(uploads) != 1:
            raise ApiError("too_many_files", f"{len(uploads)} files: /predict takes one, use /predict/batch")
        result = (await _label_all(request, uploads, top_k, alpha, top if explain else None))[0]
        if isinstance(result, BaseException):
            raise result
        return result

    return await _guarded(request, one, batch=False)


@router.post("/predict/batch", openapi_extra=BATCH_BODY, responses=UPLOAD_ERRORS)
async def predict_batch(
    request: Request, top_k: int = TOP_K, alpha: float | None = ALPHA, explain: bool = EXPLAIN, top: int = TOP
):
    """Label several files of one multipart request; a file that fails gets its own error entry."""

    async def many(uploads: list[Upload]):
        results = []
        labelled = await _label_all(request, uploads, top_k, alpha, top if explain else None)
        for u, r in zip(uploads, labelled, strict=True):
            if isinstance(r, ApiError):
                r = {"filename": u.name, "error": {"status": r.status, "code": r.code, "message": r.message}}
            elif isinstance(r, BaseException):
                raise r
            results.append(r)
        return {"model": _service(request).predictor.model_id, "results": results}

    return await _guarded(request, many, batch=True)


@router.get("/health")
async def health(request: Request):
    """200 `ready` while serving; 503 `busy` (with the reason) while saturated, `draining` once
    shutting down."""
    service = _service(request)
    busy = None if service.draining else service.saturation()
    status = "draining" if service.draining else "busy" if busy else "ready"
    body = {
        "status": status,
        "queued": service.admitted,
        "max_queue": service.config.max_queue,
        "requests": service.inflight.active,
        "max_connections": service.config.max_connections,
        "decoding": len(service.decode_pool.busy_since()),
    }
    if busy:
        body["reason"] = busy
    return JSONResponse(body, status_code=200 if status == "ready" else 503)


@router.get("/info")
async def info(request: Request):
    """Classes, model, prompt, heads, whether probabilities are calibrated, how the classifier
    rejects (`reject`: accept rate, threshold, label; null without a reject option), limits and
    package version."""
    service = _service(request)
    config = service.config
    limits: tuple[str, ...] = ("max_batch", "max_wait_ms", "max_queue", "max_upload_mb", "max_files")
    limits += (
        "body_timeout_s",
        "request_timeout_s",
        "decode_timeout_s",
        "max_audio_seconds",
        "max_connections",
        "max_per_client",
        "rate_limit",
    )
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
        service.loop = asyncio.get_running_loop()  # the drain on SIGTERM is scheduled on it
        service.batcher.start()
        yield
        service.draining = True
        # the clips already queued are finished; a decode still running is abandoned (daemon threads)
        await asyncio.get_running_loop().run_in_executor(None, partial(service.batcher.stop, STOP_WAIT_S))
        service.replicas.close()
        service.decode_pool.shutdown(wait=False)

    app = FastAPI(
        title="calm serve",
        version=calm.__version__,
        description="A few-shot audio classifier (CALM / SAV) fitted with calm-audio. Errors: "
        + "; ".join(f"`{c}` ({s})" for c, (s, _) in CODES.items()),
        lifespan=lifespan,
    )
    app.state.service = service
    install_handlers(app)
    config = service.config
    app.add_middleware(
        Guard,
        inflight=service.inflight,
        api_key=config.api_key,
        max_connections=config.max_connections,
        max_per_client=config.max_per_client,
        rate_limit=config.rate_limit,
    )
    app.add_middleware(AccessLog)  # outermost: refusals by the Guard are logged too
    app.include_router(router)
    app.include_router(detect_router(_guarded))  # POST /detect, WebSocket /stream
    return app
