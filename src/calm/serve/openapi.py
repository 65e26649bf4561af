"""The OpenAPI description of `calm serve`'s request bodies and error answers (FastAPI `openapi_extra`
and `responses`), built from `calm.serve.api_errors.CODES` so that the schema lists every documented code.
"""

from __future__ import annotations

from typing import Any

from calm.serve.api_errors import CODES, error_schema


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
    "unsupported_audio_format",
    "body_timeout",
    "invalid_audio",
    "non_finite_features",
    "invalid_parameter",
    "too_many_files",
    "queue_full",
    "busy",
    "too_many_connections",
    "request_timeout",
    "draining",
    "unauthorized",
    "rate_limited",
    "model_error",
)
