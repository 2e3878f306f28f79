"""The service's exception handlers: every domain error is mapped to its status and one line of JSON
(``{"detail": "..."}``) here, once; routes raise the domain's errors and never translate them.

- :class:`~gradcam.errors.ImageLoadError`: 413 over the pixel limit, 415 not an image, else 422;
- :class:`~gradcam.serve.batcher.Overloaded` (too many images waiting),
  :class:`~gradcam.serve.limits.DecodingBusy` (too many pixels being decoded) and
  :class:`~gradcam.study.jobs.Busy` (too many studies waiting): 503 with Retry-After;
- :class:`~gradcam.study.store.NotFound`: 404 (a study, pair, folder or annotations file);
- :class:`~gradcam.study.store.NotARater`: 401 (no token of this study),
  :class:`~gradcam.study.store.InviteOnly`: 403, :class:`~gradcam.study.store.TooManyRaters`: 429 with
  Retry-After;
- :class:`~gradcam.study.store.DuplicateRating`, :class:`~gradcam.study.store.NotServed` and
  :class:`~gradcam.study.store.NotReady`: 409;
- :class:`~gradcam.study.store.DatabaseUnavailable` (and any database error that escaped the store): 503
  with Retry-After, the driver's detail logged, never sent;
- any other :class:`~gradcam.errors.GradCAMError` (a bad field, an unserved model): 422;
- ``RuntimeError``: 500, the model's own code failed on this input;
- request validation: 422 naming the first invalid field; HTTP errors keep their status (413 from the
  body limit names ``--max-upload``; 408 from :class:`~gradcam.serve.limits.BodyTimeout` names its option).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.serve.batcher import Overloaded
from gradcam.serve.limits import DecodingBusy, too_large_message
from gradcam.study.jobs import Busy
from gradcam.study.store import (
    DatabaseUnavailable,
    DuplicateRating,
    InviteOnly,
    NotARater,
    NotFound,
    NotReady,
    NotServed,
    StudyError,
    TooManyRaters,
)

log = logging.getLogger("gradcam.serve")
#: Seconds a client is asked to wait when the database is unavailable.
DATABASE_RETRY_S = 5

#: Status of each domain error (the most specific class registered wins).
STATUS: dict[type[Exception], int] = {
    GradCAMError: 422,
    StudyError: 422,
    NotFound: 404,
    DuplicateRating: 409,
    NotServed: 409,
    NotReady: 409,
    InviteOnly: 403,
}
#: Reasons of :class:`ImageLoadError` with a status of their own (else 422).
IMAGE_STATUS = {"too-large": 413, "format": 415}


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body: ``{"detail": "<one line>"}``."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _fixed(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    async def handler(request: Request, error: Exception) -> JSONResponse:
        return problem(status, str(error))

    return handler


async def _image_error(request: Request, error: Exception) -> JSONResponse:
    reason = getattr(error, "reason", None)
    return problem(IMAGE_STATUS.get(reason or "", 422), str(error))


async def _busy(request: Request, error: Exception) -> JSONResponse:
    retry = getattr(error, "retry_after", 1)
    return problem(503, str(error), {"Retry-After": str(retry)})


async def _too_many_raters(request: Request, error: Exception) -> JSONResponse:
    return problem(429, str(error), {"Retry-After": str(getattr(error, "retry_after", 60))})


async def _not_a_rater(request: Request, error: Exception) -> JSONResponse:
    return problem(401, str(error), {"WWW-Authenticate": "Bearer"})


async def _database(request: Request, error: Exception) -> JSONResponse:
    detail = getattr(error, "detail", "") or str(getattr(error, "orig", "") or error).strip()
    log.error("study database unavailable on %s %s: %s", request.method, request.url.path, detail)
    message = str(error) if isinstance(error, DatabaseUnavailable) else "the study database is unavailable"
    return problem(503, message, {"Retry-After": str(DATABASE_RETRY_S)})


async def _model_failure(request: Request, error: Exception) -> JSONResponse:
    # The model's own code failed on this input: a server-side failure, still one line of JSON.
    text = str(error).strip()
    first = text.splitlines()[0][:300] if text else type(error).__name__
    return problem(500, f"the model failed on this request ({first})")


async def _invalid(request: Request, error: Exception) -> JSONResponse:
    errors = error.errors() if isinstance(error, RequestValidationError) else []
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
    return problem(422, f"field '{where}': {first.get('msg')}" if where else str(first.get("msg")))


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    detail = str(error.detail)
    if error.status_code == 413:
        detail = too_large_message(request.app.state.settings.max_upload)
    return problem(error.status_code, detail, getattr(error, "headers", None))


def install(app: FastAPI) -> None:
    """Register every handler on ``app``."""
    for error_type, status in STATUS.items():
        app.add_exception_handler(error_type, _fixed(status))
    app.add_exception_handler(ImageLoadError, _image_error)
    app.add_exception_handler(Overloaded, _busy)
    app.add_exception_handler(DecodingBusy, _busy)
    app.add_exception_handler(Busy, _busy)
    app.add_exception_handler(TooManyRaters, _too_many_raters)
    app.add_exception_handler(NotARater, _not_a_rater)
    app.add_exception_handler(DatabaseUnavailable, _database)
    app.add_exception_handler(SQLAlchemyError, _database)
    app.add_exception_handler(RuntimeError, _model_failure)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
