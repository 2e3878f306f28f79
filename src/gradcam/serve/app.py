"""The app factory: the explanation API, the web app at ``/`` and the trust study on one FastAPI app.

:func:`create_app` builds the shared resources and hangs them on ``app.state`` (the settings, the
:class:`~gradcam.models.pool.ModelPool`, the study store and its background jobs; the batcher and its
worker pool once the app starts), installs the upload limits (:mod:`gradcam.serve.limits`: size, pace
and the pixels decoded at once), security headers and exception handlers (:mod:`gradcam.serve.errors`),
and includes the module-level routers (:mod:`gradcam.serve.routers`), which reach the resources through
:mod:`gradcam.serve.dependencies`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from gradcam import models
from gradcam.models.pool import ModelPool
from gradcam.serve import errors
from gradcam.serve.batcher import Batcher
from gradcam.serve.limits import MEGABYTE, BodyTimeout, DeclaredSizeLimit, DecodingBudget
from gradcam.serve.routers import admin, explain, pages, study
from gradcam.serve.routers.pages import STATIC
from gradcam.serve.settings import ServeSettings
from gradcam.study.jobs import StudyJobs
from gradcam.study.store import DEFAULT_DB_URL, StudyStore

__all__ = ["MEGABYTE", "ServeSettings", "create_app"]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
)
#: Studies a previous run left queued or rendering fail with this when the service starts again.
RESTARTED = "the server restarted before the study was rendered; create it again"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ServeSettings = app.state.settings
    pool: ModelPool = app.state.pool
    executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="gradcam-model")
    for name in pool.names:  # loaded once, before the first request
        await run_in_threadpool(pool.get, name)
    app.state.batcher = Batcher(pool, executor, max_batch=settings.max_batch)
    await run_in_threadpool(app.state.study_store.fail_unfinished, RESTARTED)
    try:
        yield
    finally:
        app.state.study_jobs.close()
        executor.shutdown(wait=True, cancel_futures=True)
        app.state.study_store.close()


async def _security_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    response = await call_next(request)
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """The service: API under ``/v1``, the web app at ``/``, the study pages under ``/studies``."""
    settings = settings or ServeSettings()
    pool = ModelPool(settings.models, device=settings.device, loader=settings.loader or models.load)
    store = StudyStore(settings.db_url or DEFAULT_DB_URL)
    app = FastAPI(
        title="gradcam",
        summary="Grad-CAM, the CAM family and Guided Grad-CAM for image classifiers, over HTTP.",
        version="1",
        lifespan=_lifespan,
        docs_url=None,  # Swagger UI loads its assets from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.settings, app.state.pool, app.state.study_store = settings, pool, store
    app.state.study_jobs = StudyJobs(store, pool, capacity=settings.study_queue)
    # Decoding holds a full-size picture: only this many pixels at once, all uploads together (more: 503;
    # the batcher then holds small tensors).
    app.state.decoding = DecodingBudget(settings.decoding_budget)
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_upload)
    app.add_middleware(BodyTimeout, read_timeout=settings.read_timeout, body_timeout=settings.body_timeout)
    app.add_middleware(DeclaredSizeLimit, max_body_size=settings.max_upload)  # before the body is read
    app.middleware("http")(_security_headers)
    errors.install(app)
    for router in (explain.router, admin.router, study.router, pages.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
