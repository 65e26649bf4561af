"""Running the app under uvicorn: logging, JSON for malformed HTTP, draining on SIGTERM / Ctrl-C.

On SIGTERM or SIGINT uvicorn stops accepting connections and the requests in flight get until
`drain_timeout` seconds (less `DRAIN_MARGIN`) to finish: those still running then answer 503
`draining` (`calm.serve.deadlines`), before uvicorn's graceful-shutdown timeout would cancel them.
The app's lifespan ends the batcher after its last batch; a decode still running is abandoned. The
signal is then not re-raised (uvicorn would, killing the process with it): a drained server exits
normally. A request uvicorn's HTTP parser refuses (e.g. a `Content-Length` that is not a number)
gets the documented JSON 400 `bad_request` instead of uvicorn's plain text.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from calm.inference import Predictor
from calm.serve.app import ServeConfig, create_app

log = logging.getLogger("calm.serve")
#: seconds before `drain_timeout` at which the requests still in flight answer 503 `draining`
DRAIN_MARGIN = 0.5
LOOPBACK = ("127.0.0.1", "::1", "localhost")
#: seconds a new connection gets to send its first request's headers before it is closed
HEADER_TIMEOUT_S = 10.0


class JsonErrorProtocol(H11Protocol):
    """uvicorn's h11 protocol answering a malformed request with the JSON error body, and closing a
    new connection whose request headers are not complete within `HEADER_TIMEOUT_S` (uvicorn
    itself only times out idle keep-alive connections)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._headers_due = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_late)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None:
            self._headers_due.cancel()

    def handle_websocket_upgrade(self, event) -> None:
        self._headers_due.cancel()  # the headers came; the WebSocket protocol owns the connection now
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_due.cancel()
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        message = f"malformed HTTP request (e.g. a Content-Length that is not a number): {msg}"
        body = json.dumps({"error": {"status": 400, "code": "bad_request", "message": message}}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service, drain_timeout: float):
        super().__init__(config)
        self.service, self.drain_timeout = service, drain_timeout

    def handle_exit(self, sig: int, frame) -> None:
        service = self.service
        if not service.draining:
            log.info("signal %d: draining %d queued clips, then exiting", sig, service.admitted)
            service.draining = True
            loop = getattr(service, "loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(service.drain, max(0.0, self.drain_timeout - DRAIN_MARGIN))
        super().handle_exit(sig, frame)


def setup_logging(level: str = "info") -> None:
    """Access log: one JSON line per request on stdout; everything else on stderr."""
    access = logging.getLogger("calm.serve.access")
    access.handlers[:] = [logging.StreamHandler(sys.stdout)]
    access.propagate = False
    access.setLevel(logging.INFO)
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def serve(
    predictor: Predictor,
    config: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout: float = 30.0,
    log_level: str = "info",
) -> int:
    """Serve until SIGTERM / Ctrl-C; returns 0 once drained."""
    setup_logging(log_level)
    if host not in LOOPBACK and not config.api_key:
        log.warning(
            "listening on %s without --api-key (CALM_API_KEY): anyone who reaches it can use it", host
        )
    app = create_app(predictor, config)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=JsonErrorProtocol,
        log_config=None,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(drain_timeout),
        lifespan="on",
    )
    server = _DrainingServer(uv_config, app.state.service, drain_timeout)
    # uvicorn restores these handlers and re-raises the signal once it has drained: make that a no-op
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        return 1
    log.info(
        "drained: %d clips in %d batches", app.state.service.batcher.clips, app.state.service.batcher.batches
    )
    return 0
