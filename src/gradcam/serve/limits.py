"""Upload size limits, enforced before a body is read.

Two layers: :class:`DeclaredSizeLimit` answers 413 (JSON, like every error here) at once when a request
declares a ``Content-Length`` over the limit, without reading any of the body; Starlette's
``RequestBodyLimitMiddleware`` (installed inside it) stops a body without a declared length (chunked) as
soon as the bytes received pass the limit.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

MEGABYTE = 1024 * 1024


def too_large_message(limit: int) -> str:
    return f"upload too large: the limit is {limit / MEGABYTE:g} MB (--max-upload)"


class DeclaredSizeLimit:
    """ASGI middleware: 413 for a request whose Content-Length exceeds ``max_body_size``."""

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app, self.max_body_size = app, max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = Headers(scope=scope).get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_size:
                body = json.dumps({"detail": too_large_message(self.max_body_size)}).encode()
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ]
                await send({"type": "http.response.start", "status": 413, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
