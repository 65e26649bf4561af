"""Reading uploaded audio from a request, within the size limit, without trusting its headers.

A single clip comes as the raw request body (`Content-Type: audio/*` or
`application/octet-stream`) or as the file part of a `multipart/form-data` body; several clips as
several file parts. The body is counted as it arrives: a declared `Content-Length` over the limit is
refused before anything is read, and a body that grows past it is cut off with 413. A client that
disconnects mid-upload raises `ClientDisconnect` and nothing is decoded. The bytes of all bodies in
the service count against one `BodyBudget` (503 `busy` past it), so slow uploads cannot hold more
memory than the admitted clips could.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from calm.serve.api_errors import ApiError

RAW_TYPES = ("audio/", "video/", "application/octet-stream")
CURL_HINT = (
    "send audio bytes with Content-Type audio/... (curl --data-binary @x.wav -H 'Content-Type: audio/wav')"
)
CURL_HINT += " or a multipart upload (curl -F file=@x.wav)"


@dataclass(frozen=True)
class Upload:
    """One uploaded file: its name (the part's filename, or `body`) and bytes."""

    name: str
    data: bytes


class Held:
    """The body bytes one request holds in a `BodyBudget`."""

    def __init__(self, budget: BodyBudget):
        self.budget, self.bytes = budget, 0

    def take(self, n: int) -> None:
        budget = self.budget
        if budget.used + n > budget.limit:
            raise ApiError(
                "busy",
                f"the bodies being read hold {budget.used} bytes (limit {budget.limit}); retry later",
                headers={"Retry-After": "1"},
            )
        budget.used += n
        self.bytes += n


class BodyBudget:
    """Bytes of request bodies held by the service at once (event loop only)."""

    def __init__(self, limit: int):
        self.limit, self.used = int(limit), 0

    @contextmanager
    def hold(self) -> Iterator[Held]:
        """A request's share, given back when the block ends."""
        held = Held(self)
        try:
            yield held
        finally:
            self.used -= held.bytes


def _declared_length(request: Request, limit: int) -> None:
    value = request.headers.get("content-length")
    if value is None:
        return
    if not value.strip().isdigit():
        raise ApiError("bad_request", f"Content-Length {value!r} is not a number")
    if int(value) > limit:
        raise ApiError("payload_too_large", f"the body declares {int(value)} bytes; the limit is {limit}")


async def _limited(request: Request, limit: int, held: Held | None) -> AsyncGenerator[bytes, None]:
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise ApiError("payload_too_large", f"the body is over the limit of {limit} bytes")
        if held is not None:
            held.take(len(chunk))
        yield chunk


async def _raw(request: Request, limit: int, held: Held | None) -> Upload:
    body = bytearray()
    async for chunk in _limited(request, limit, held):
        body += chunk
    return Upload(request.headers.get("x-filename") or "body", bytes(body))


async def _multipart(request: Request, limit: int, max_files: int, held: Held | None) -> list[Upload]:
    body = _limited(request, limit, held)
    parser = MultiPartParser(request.headers, body, max_files=max_files, max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        code = "too_many_files" if "files" in str(exc).lower() else "bad_request"
        raise ApiError(code, f"multipart body: {exc}") from None
    uploads = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, str):  # a text field, not a file part
                continue
            uploads.append(Upload(value.filename or "upload", await value.read()))
    finally:
        await form.close()
    if not uploads:
        raise ApiError("no_file", "the multipart body has no file part (use -F file=@clip.wav)")
    return uploads


async def read_uploads(
    request: Request, limit: int, *, max_files: int, held: Held | None = None
) -> list[Upload]:
    """The uploaded files of `request` (one for a raw body), at most `limit` bytes in all, each
    chunk counted in `held` as it arrives."""
    _declared_length(request, limit)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _multipart(request, limit, max_files, held)
    if kind.startswith(RAW_TYPES):
        return [await _raw(request, limit, held)]
    shown = kind or "no Content-Type"
    raise ApiError("unsupported_media_type", f"{shown} is not an audio upload: {CURL_HINT}")
