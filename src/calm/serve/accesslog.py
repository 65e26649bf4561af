"""Structured access logs: one JSON line per request on the `calm.serve.access` logger.

Fields: `time` (UTC, ISO 8601), `method`, `path`, `status` (499: the client went away before the
answer), `duration_ms`, `batch_size` (the model batch the request's clip ran in; for
/predict/batch the largest of its clips'), `clips`, `client`, and `error` (the error code) when
there was one. Endpoints put `batch_size`, `clips` and `error` into `request.state`.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

access_log = logging.getLogger("calm.serve.access")


class AccessLog:
    """ASGI middleware writing the access log line once the response is sent (or abandoned)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 499}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except Exception:  # answered with 500 by Starlette's outermost middleware
            status["code"] = 500
            raise
        finally:
            state = scope.get("state") or {}
            client = scope.get("client")
            record = {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status["code"],
                "duration_ms": round(1000 * (time.perf_counter() - start), 2),
                "batch_size": state.get("batch_size"),
                "clips": state.get("clips"),
                "client": f"{client[0]}:{client[1]}" if client else None,
            }
            if state.get("error"):
                record["error"] = state["error"]
            access_log.info(json.dumps(record))
