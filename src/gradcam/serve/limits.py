"""Upload limits: the body's size and pace, enforced as it is read, and the pixels decoded at once.

- :class:`DeclaredSizeLimit` answers 413 (JSON, like every error here) at once when a request declares a
  ``Content-Length`` over the limit, without reading any of the body; Starlette's
  ``RequestBodyLimitMiddleware`` (installed inside it) stops a body without a declared length (chunked)
  as soon as the bytes received pass the limit.
- :class:`BodyTimeout` answers 408 when a body stalls (``--read-timeout`` between two chunks) or drags
  (``--body-timeout`` in all): uvicorn itself waits for a body for ever, one open request per slow client.
- :class:`DecodingBudget` bounds the pixels being decoded at once, all uploads together: each upload
  reserves its image's pixel count, known from the headers before any pixel is decoded, and one that
  does not fit is refused at once (503 with Retry-After) rather than queued.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradcam.errors import GradCAMError

MEGABYTE = 1024 * 1024


def too_large_message(limit: int) -> str:
    return f"upload too large: the limit is {limit / MEGABYTE:g} MB (--max-upload)"


async def _answer(send: Send, status: int, detail: str) -> None:
    """A one-line JSON error sent straight from a middleware; the connection is closed after it (the
    rest of the body is not read)."""
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class DeclaredSizeLimit:
    """ASGI middleware: 413 for a request whose Content-Length exceeds ``max_body_size``."""

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app, self.max_body_size = app, max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = Headers(scope=scope).get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_size:
                await _answer(send, 413, too_large_message(self.max_body_size))
                return
        await self.app(scope, receive, send)


class SlowBody(HTTPException):
    """The client sent its body too slowly (408; the connection is closed)."""

    def __init__(self, detail: str) -> None:
        super().__init__(408, detail, headers={"Connection": "close"})


class BodyTimeout:
    """ASGI middleware: 408 for a request body that stalls more than ``read_timeout`` seconds between
    two chunks, or takes more than ``body_timeout`` seconds from its first read to its end.

    The wait is timed inside ``receive``, so only time spent waiting for the client counts. Raised there
    as an HTTP error, a route's handlers answer it as they answer a 413; should it escape them, it is
    answered here.
    """

    def __init__(self, app: ASGIApp, read_timeout: float, body_timeout: float) -> None:
        self.app, self.read_timeout, self.body_timeout = app, read_timeout, body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        finished = responded = False

        async def receive_in_time() -> Message:
            nonlocal deadline, finished
            if finished:  # the body is in; what follows (a disconnect) may take its time
                return await receive()
            now = loop.time()
            deadline = now + self.body_timeout if deadline is None else deadline
            stall = deadline - now >= self.read_timeout
            try:
                async with asyncio.timeout(min(self.read_timeout, deadline - now)):
                    message = await receive()
            except TimeoutError:
                raise SlowBody(
                    f"the request body stalled: nothing arrived for {self.read_timeout:g} s (--read-timeout)"
                    if stall
                    else f"the request body took longer than {self.body_timeout:g} s (--body-timeout)"
                ) from None
            finished = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_noted(message: Message) -> None:
            nonlocal responded
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_in_time, send_noted)
        except SlowBody as error:
            if responded:
                raise
            await _answer(send, 408, error.detail)


class DecodingBusy(GradCAMError):
    """More pixels would be decoded at once than ``--max-decoding-pixels`` allows (503, Retry-After)."""

    retry_after = 1


class DecodingBudget:
    """The pixels being decoded at once, all uploads together, at most ``pixels``.

    Thread-safe: shares are taken in the worker threads that decode, at Pillow's pixel checkpoints
    (:func:`gradcam.io.decode_image`'s ``reserve``), and never waited for.
    """

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise GradCAMError(f"the decoding budget must be at least 1 pixel, not {pixels}")
        self.pixels = pixels
        self.in_use = 0
        self._lock = threading.Lock()

    @contextmanager
    def share(self) -> Iterator[Callable[[int], None]]:
        """One upload's share: the function to call with its pixel count (again with a larger count
        should it grow; a smaller one keeps what is held). Released when the block ends."""
        held = 0

        def reserve(pixels: int) -> None:
            nonlocal held
            with self._lock:
                extra = pixels - held
                if extra <= 0:
                    return
                if self.in_use + extra > self.pixels:
                    raise DecodingBusy(
                        f"too many pixels being decoded: {self.in_use} of the {self.pixels} allowed at once "
                        f"(--max-decoding-pixels) are in use, and this image needs {pixels}; retry after "
                        f"{DecodingBusy.retry_after} s"
                    )
                self.in_use += extra
                held = pixels

        try:
            yield reserve
        finally:
            with self._lock:
                self.in_use -= held
