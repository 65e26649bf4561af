"""The JSON errors `calm serve` answers with: `{"error": {"status", "code", "message"}}`.

Every 4xx / 5xx the service sends has this shape (FastAPI's own validation errors and Starlette's
404 / 405 included), so a client reads one field whatever went wrong. The codes are documented in
docs/serve.md.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("calm.serve")

#: code -> (HTTP status, meaning), as documented in docs/serve.md
CODES = {
    "bad_request": (400, "malformed request (bad Content-Length, malformed multipart body or HTTP)"),
    "unauthorized": (401, "--api-key is set and the request has no matching Authorization: Bearer"),
    "not_found": (404, "no such endpoint"),
    "method_not_allowed": (405, "wrong HTTP method for this endpoint"),
    "body_timeout": (408, "the body did not arrive within --body-timeout seconds"),
    "payload_too_large": (413, "the request body is larger than --max-upload-mb"),
    "unsupported_media_type": (415, "the body is neither audio bytes nor multipart/form-data"),
    "unsupported_audio_format": (415, "not an allowed audio container / codec (e.g. a playlist)"),
    "empty_body": (422, "no audio data in the request"),
    "no_file": (422, "a multipart request without a file part"),
    "invalid_audio": (
        422,
        "not decodable audio, silent, non-finite, too short or too long, or slow to decode",
    ),
    "non_finite_features": (422, "the model gave NaN or infinite features for this clip"),
    "rate_limited": (429, "more requests from this client than --rate-limit allows"),
    "invalid_parameter": (422, "a query parameter out of range (e.g. top_k=0)"),
    "too_many_files": (422, "more files in one /predict/batch request than allowed"),
    "queue_full": (503, "the queue holds --max-queue clips: retry after Retry-After seconds"),
    "busy": (503, "the bodies being read fill the upload memory (--max-queue x --max-upload-mb)"),
    "too_many_connections": (
        503,
        "--max-connections requests in flight (or --max-per-client from one client)",
    ),
    "request_timeout": (503, "the answer took longer than --request-timeout seconds"),
    "draining": (503, "the server is shutting down"),
    "model_error": (500, "the model failed on this clip"),
    "internal_error": (500, "a bug: the traceback is in the server log"),
}


class ApiError(Exception):
    """An error answer: `code` (see `CODES`) sets the status; `headers` e.g. Retry-After."""

    def __init__(self, code: str, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.status = CODES[code][0]
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    body = {"error": {"status": status, "code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_schema() -> dict:
    """OpenAPI response schema of the error body."""
    return {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "status": {"type": "integer"},
                            "code": {"type": "string", "enum": sorted(CODES)},
                            "message": {"type": "string"},
                        },
                    }
                },
            }
        }
    }


def install_handlers(app: FastAPI) -> None:
    """Route every error through `error_response`."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        request.state.error = exc.code
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        request.state.error = "invalid_parameter"
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{where}: {e.get('msg')}")
        return error_response(422, "invalid_parameter", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        request.state.error = code
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        request.state.error = "internal_error"
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__} (see the server log)")
