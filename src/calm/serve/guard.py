"""Who may come in: the optional bearer token and the caps on requests in flight (ASGI middleware).

- `api_key`: every path but `/health` needs `Authorization: Bearer <key>` (compared in constant
  time), else 401 `unauthorized`.
- `max_connections`: HTTP requests in flight at once, in total; `max_per_client`: from one client
  address (None: no cap). Past either, 503 `too_many_connections` with `Retry-After`, before the
  request is read. `/health` is always answered.
"""

from __future__ import annotations

import hmac
from collections import Counter

from calm.serve.errors import CODES, error_response

OPEN_PATHS = ("/health",)


class InFlight:
    """The requests in flight, in total (`active`) and per client address (event loop only)."""

    def __init__(self) -> None:
        self.active = 0
        self.per_client: Counter[str] = Counter()


class Guard:
    """ASGI middleware: bearer token, then the in-flight caps counted in `inflight`."""

    def __init__(
        self,
        app,
        *,
        inflight: InFlight,
        api_key: str | None,
        max_connections: int,
        max_per_client: int | None = None,
    ) -> None:
        self.app = app
        self.inflight = inflight
        self.api_key = api_key.encode() if api_key else None
        self.max_connections, self.max_per_client = max_connections, max_per_client

    def _authorised(self, scope) -> bool:
        if self.api_key is None or scope.get("path") in OPEN_PATHS:
            return True
        value = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _refuse(self, scope, send, code: str, message: str, headers: dict[str, str]) -> None:
        state = scope.setdefault("state", {})
        state["error"] = code
        response = error_response(CODES[code][0], code, message, headers)
        await response(scope, _no_receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorised(scope):
            headers = {"WWW-Authenticate": "Bearer"}
            return await self._refuse(
                scope, send, "unauthorized", "send Authorization: Bearer <key>", headers
            )
        client = (scope.get("client") or ("?", 0))[0]
        counts = self.inflight
        if scope.get("path") not in OPEN_PATHS:
            message = None
            if counts.active >= self.max_connections:
                message = f"{counts.active} requests in flight (limit {self.max_connections})"
            elif self.max_per_client is not None and counts.per_client[client] >= self.max_per_client:
                message = f"{counts.per_client[client]} requests in flight from {client}"
                message += f" (limit {self.max_per_client})"
            if message is not None:
                return await self._refuse(scope, send, "too_many_connections", message, {"Retry-After": "1"})
        counts.active += 1
        counts.per_client[client] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            counts.active -= 1
            counts.per_client[client] -= 1
            if counts.per_client[client] <= 0:
                del counts.per_client[client]


async def _no_receive():  # the refused request's body is never read
    return {"type": "http.disconnect"}
