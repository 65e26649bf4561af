"""Who may come in: the optional bearer token and the caps on requests in flight (ASGI middleware).

- `api_key`: every path but `/health` needs `Authorization: Bearer <key>` (compared in constant
  time), else 401 `unauthorized`.
- `rate_limit` (off by default): at most that many requests per client address in a moving
  window (the `limits` library, e.g. "60/minute"); past it, 429 `rate_limited` with `Retry-After`.
- `max_connections`: HTTP requests in flight at once, in total; `max_per_client`: from one client
  address (None: no cap). Past either, 503 `too_many_connections` with `Retry-After`, before the
  request is read. `/health` is always answered.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import Counter

from calm.serve.api_errors import CODES, error_response

OPEN_PATHS = ("/health",)


class InFlight:
    """The requests in flight, in total (`active`) and per client address (event loop only)."""

    def __init__(self) -> None:
        self.active = 0
        self.per_client: Counter[str] = Counter()


class RateLimit:
    """At most `rate` requests per client address ("60/minute": the `limits` library's notation)."""

    def __init__(self, rate: str):
        from limits import parse
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.rate = rate
        self.item = parse(rate)  # ValueError for a rate it cannot read
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, client: str) -> int | None:
        """Count a request of `client`: None when allowed, else the seconds until it would be."""
        if self.limiter.hit(self.item, client):
            return None
        reset = self.limiter.get_window_stats(self.item, client).reset_time
        return max(1, math.ceil(reset - time.time()))


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
        rate_limit: str | None = None,
    ) -> None:
        self.app = app
        self.rate = RateLimit(rate_limit) if rate_limit else None
        self.inflight = inflight
        self.api_key = api_key.encode() if api_key else None
        self.max_connections, self.max_per_client = max_connections, max_per_client

    def _authorised(self, scope) -> bool:
        if self.api_key is None or scope.get("path") in OPEN_PATHS:
            return True
        return bearer_ok(scope, self.api_key)

    def _over_limits(self, client: str) -> tuple[str, str, dict[str, str]] | None:
        """(code, message, headers) when `client` may not come in now, else None."""
        counts = self.inflight
        if self.rate is not None and (wait := self.rate.hit(client)) is not None:
            message = f"more than {self.rate.rate} requests from {client}; retry after {wait} s"
            return "rate_limited", message, {"Retry-After": str(wait)}
        if counts.active >= self.max_connections:
            message = f"{counts.active} requests in flight (limit {self.max_connections})"
            return "too_many_connections", message, {"Retry-After": "1"}
        if self.max_per_client is not None and counts.per_client[client] >= self.max_per_client:
            message = (
                f"{counts.per_client[client]} requests in flight from {client} (limit {self.max_per_client})"
            )
            return "too_many_connections", message, {"Retry-After": "1"}
        return None

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
        refusal = None if scope.get("path") in OPEN_PATHS else self._over_limits(client)
        if refusal is not None:
            return await self._refuse(scope, send, *refusal)
        counts.active += 1
        counts.per_client[client] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            counts.active -= 1
            counts.per_client[client] -= 1
            if counts.per_client[client] <= 0:
                del counts.per_client[client]


def bearer_ok(scope, api_key: bytes) -> bool:
    """Whether the request (or WebSocket handshake) of `scope` sends `Authorization: Bearer <api_key>`
    (compared in constant time)."""
    value = dict(scope.get("headers") or []).get(b"authorization", b"")
    scheme, _, token = value.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key)


async def _no_receive():  # the refused request's body is never read
    return {"type": "http.disconnect"}
