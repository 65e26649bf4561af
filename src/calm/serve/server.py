"""Running the app under uvicorn: logging, and draining on SIGTERM / Ctrl-C with exit status 0.

On SIGTERM or SIGINT uvicorn stops accepting connections, lets the requests in flight finish (at
most `drain_timeout` seconds), then the app's lifespan ends the batcher after its last batch. The
signal is then not re-raised (uvicorn would, killing the process with it): a drained server exits
normally.
"""

from __future__ import annotations

import logging
import math
import signal
import sys

import uvicorn

from calm.inference import Predictor
from calm.serve.app import ServeConfig, create_app

log = logging.getLogger("calm.serve")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame) -> None:
        if not self.service.draining:
            log.info("signal %d: draining %d queued clips, then exiting", sig, self.service.admitted)
        self.service.draining = True
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
    app = create_app(predictor, config)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=math.ceil(drain_timeout),
        lifespan="on",
    )
    server = _DrainingServer(uv_config, app.state.service)
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
