"""The FastAPI application: the explanation API, the web app at ``/`` and the trust study.

Model work never runs on the event loop: uploads are decoded and PNGs encoded in the thread pool, and
explanations go through the :class:`~gradcam.serve.batcher.Batcher` into a bounded pool of worker
threads, one model call at a time per model, concurrent requests merged into one forward/backward.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from gradcam import io, models, targets, viz
from gradcam.errors import GradCAMError, ImageLoadError
from gradcam.serve.batcher import Batcher, Overloaded
from gradcam.serve.limits import MEGABYTE, DeclaredSizeLimit, too_large_message
from gradcam.serve.models import ModelPool
from gradcam.serve.render import GUIDED, METHODS, SLOW, ImageView, check_method, describe, prepare
from gradcam.serve.schemas import (
    Compared,
    Explained,
    Health,
    Labels,
    MethodInfo,
    Methods,
    ModelInfo,
    Models,
    Problem,
)

STATIC = Path(__file__).parent / "static"
#: Most classes one request may name (as many as ``topk`` allows).
MAX_TARGETS = 10


@dataclass
class ServeSettings:
    """What ``gradcam serve`` was started with."""

    models: list[str] = field(default_factory=lambda: [models.DEFAULT])
    device: str = "cpu"
    max_upload: int = 20 * MEGABYTE
    max_pixels: int = 50_000_000
    db_url: str | None = None  # None: the study's default SQLite file
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    study_images: Path | None = None
    workers: int = 2
    max_batch: int = 16
    slow_methods: bool = False  # offer Score-CAM and Ablation-CAM (minutes per image on a CPU)
    loader: object = None  # a models.load stand-in (tests serve random-weight models)


ERRORS = {
    413: {
        "model": Problem,
        "description": "The upload is over --max-upload, or the image over the pixel limit.",
    },
    415: {"model": Problem, "description": "The upload is not an image format the server reads."},
    422: {"model": Problem, "description": "A corrupt image, or a field out of range or unknown."},
    503: {"model": Problem, "description": "Too many images waiting; retry after the Retry-After seconds."},
}

ImageField = Annotated[
    UploadFile, File(description="The image: any format Pillow reads (JPEG, PNG, WebP ...).")
]
TargetField = Annotated[
    list[str] | None,
    Form(description="Class to explain: an index or a class name (any case); repeat for several (at most "
         "10). None: the `topk` best classes."),
]  # fmt: skip
TopkField = Annotated[
    int, Form(ge=1, le=10, description="Explain the k best classes when no target is sent.")
]
LayerField = Annotated[
    str | None, Form(max_length=200, description="Qualified module name to explain (default: automatic).")
]
RawField = Annotated[bool, Form(description="Also return the raw map as a list of lists.")]


def _b64(picture) -> str | None:  # type: ignore[no-untyped-def]
    return None if picture is None else base64.b64encode(viz.encode_png(picture)).decode("ascii")


def _body(view: ImageView, size: tuple[int, int], raw: bool, seconds: float) -> dict:
    """The JSON of one explained image (PNG encoding included: run it off the event loop)."""
    return {
        "model": view.model,
        "method": view.method,
        "layer": view.layer,
        "size": list(size),
        "picture": _b64(view.picture),
        "predictions": [{"index": i, "class": name, "probability": p} for i, name, p in view.predictions],
        "targets": [
            {
                "index": t.index,
                "class": t.name,
                "probability": t.probability,
                "score": t.score,
                "heatmap": _b64(t.heatmap),
                "overlay": _b64(t.overlay),
                "guided": _b64(t.guided),
                "raw_map": t.raw.tolist() if raw and t.raw is not None else None,
            }
            for t in view.targets
        ],
        "seconds": round(seconds, 4),
    }


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """The service: API under ``/v1``, the web app at ``/``, the study pages under ``/studies``."""
    settings = settings or ServeSettings()
    loader = settings.loader or models.load
    pool = ModelPool(settings.models, device=settings.device, loader=loader)  # type: ignore[arg-type]

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="gradcam-model")
        for name in pool.names:  # loaded once, before the first request
            await run_in_threadpool(pool.get, name)
        app.state.batcher = Batcher(pool, executor, max_batch=settings.max_batch)
        try:
            yield
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            app.state.study_store.close()

    app = FastAPI(
        title="gradcam",
        summary="Grad-CAM, the CAM family and Guided Grad-CAM for image classifiers, over HTTP.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads its assets from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.pool, app.state.settings = pool, settings
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_upload)
    app.add_middleware(DeclaredSizeLimit, max_body_size=settings.max_upload)  # outermost: runs first

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
        )
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    _handlers(app, settings)

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> dict:
        """Liveness: the served models (all loaded before the first request is answered)."""
        return {"status": "ok", "models": pool.names}

    @app.get("/v1/models", response_model=Models, tags=["service"])
    async def list_models() -> dict:
        """The served models; the first is the default."""
        infos = []
        for name in pool.names:
            loaded = pool.get(name)
            infos.append(
                ModelInfo(
                    name=name,
                    default=name == pool.default,
                    input_size=list(loaded.input_size),
                    classes=len(loaded.labels),
                )
            )
        return {"models": infos}

    @app.get(
        "/v1/models/{model:path}/labels",
        response_model=Labels,
        responses={404: {"model": Problem}, 422: {"model": Problem}},
        tags=["service"],
    )
    async def labels(model: str) -> dict:
        """The class names of a served model, by index."""
        if model not in pool.names:
            raise StarletteHTTPException(
                404, f"model '{model}' is not served here; choose from {', '.join(pool.names)}"
            )
        return {"model": model, "labels": pool.get(model).labels}

    @app.get("/v1/methods", response_model=Methods, tags=["service"])
    async def list_methods() -> dict:
        """The explanation methods."""
        return {"methods": [MethodInfo(name=m, description=describe(m), guided=m in GUIDED) for m in offered]}

    offered = [m for m in METHODS if settings.slow_methods or m not in SLOW]
    # Decoding holds a full-size picture; only this many at once (the batcher then holds small tensors).
    decoding = asyncio.Semaphore(max(2, 2 * settings.workers))

    def check_request(model: str, method: str, target: list[str] | None) -> list[int]:
        """Checks that need no image, made before the upload is decoded: the target class ids."""
        pool.check(model)
        check_method(method, offered)
        if len(target or []) > MAX_TARGETS:
            raise GradCAMError(f"field 'target': at most {MAX_TARGETS} classes per request")
        labels = pool.get(model).labels
        return [targets.parse_class(spec, labels) for spec in target or []]

    async def read_image(image: UploadFile, for_models: list[str]) -> tuple[tuple[int, int], dict]:
        """Decode the upload and prepare it for each model; the full-size picture is dropped here."""
        data = await image.read()
        # The name is only shown back in messages: never a path.
        name = "image" if not image.filename else f"image '{image.filename[:80]}'"

        def decode_and_prepare() -> tuple[tuple[int, int], dict]:
            picture = io.decode_image(data, name, max_pixels=settings.max_pixels)
            return picture.size, {m: prepare(pool.get(m), picture) for m in dict.fromkeys(for_models)}

        async with decoding:
            return await run_in_threadpool(decode_and_prepare)

    async def explain_one(
        prepared, size, model: str, method: str, wanted: list[int], topk: int, layer: str | None, raw: bool
    ) -> dict:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        batcher: Batcher = app.state.batcher
        view = await batcher.explain(model, method, prepared, wanted, topk=topk, layer=layer or None)
        return await run_in_threadpool(_body, view, size, raw, time.perf_counter() - started)

    @app.post("/v1/explain", response_model=Explained, responses=ERRORS, tags=["explain"])
    async def explain(
        image: ImageField,
        model: Annotated[
            str | None, Form(max_length=100, description="A served model (default: the first).")
        ] = None,
        method: Annotated[
            str, Form(max_length=100, description="An explanation method, see /v1/methods.")
        ] = "gradcam",
        target: TargetField = None,
        topk: TopkField = 1,
        layer: LayerField = None,
        raw: RawField = False,
    ) -> dict:
        """Explain one image: the top-5 predictions and, per target class, the map and overlay as PNG."""
        model = model or pool.default
        wanted = check_request(model, method, target)
        size, prepared = await read_image(image, [model])
        return await explain_one(prepared[model], size, model, method, wanted, topk, layer, raw)

    @app.post("/v1/compare", response_model=Compared, responses=ERRORS, tags=["explain"])
    async def compare(
        image: ImageField,
        model: Annotated[
            list[str] | None, Form(description="One served model, or two to compare (default: the first).")
        ] = None,
        method: Annotated[list[str] | None, Form(description="One method, or two to compare.")] = None,
        target: TargetField = None,
        topk: TopkField = 1,
        layer: LayerField = None,
        raw: RawField = False,
    ) -> dict:
        """The same image through two models (one method) or two methods (one model), side by side."""
        chosen_models = model or [pool.default]
        chosen_methods = method or ["gradcam"]
        if len(chosen_models) > 2 or len(chosen_methods) > 2:
            raise GradCAMError("compare takes at most two models and two methods")
        if (len(chosen_models) == 2) == (len(chosen_methods) == 2):
            raise GradCAMError("compare needs exactly two models (one method) or two methods (one model)")
        pairs = [
            (chosen_models[min(i, len(chosen_models) - 1)], chosen_methods[min(i, len(chosen_methods) - 1)])
            for i in range(2)
        ]
        wanted = [check_request(m, meth, target) for m, meth in pairs]
        size, prepared = await read_image(image, chosen_models)
        left, right = await asyncio.gather(
            *(
                explain_one(prepared[m], size, m, meth, ids, topk, layer, raw)
                for (m, meth), ids in zip(pairs, wanted, strict=True)
            )
        )
        return {"left": left, "right": right}

    _include_study(app, settings, pool)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/studies/{study_id}", include_in_schema=False)
    async def study_page(study_id: str) -> FileResponse:
        return FileResponse(STATIC / "study.html")

    @app.get("/studies/{study_id}/results", include_in_schema=False)
    async def results_page(study_id: str) -> FileResponse:
        return FileResponse(STATIC / "results.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _include_study(app: FastAPI, settings: ServeSettings, pool: ModelPool) -> None:
    from gradcam.serve.study.routes import study_router
    from gradcam.serve.study.store import DEFAULT_DB_URL, StudyStore

    store = StudyStore(settings.db_url or DEFAULT_DB_URL)
    app.state.study_store = store
    app.include_router(study_router(store, pool, settings.admin_token, settings.study_images))


def _problem(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _handlers(app: FastAPI, settings: ServeSettings) -> None:
    @app.exception_handler(ImageLoadError)
    async def image_error(request: Request, error: ImageLoadError) -> JSONResponse:
        status = {"too-large": 413, "format": 415}.get(error.reason, 422)
        return _problem(status, str(error))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, error: Overloaded) -> JSONResponse:
        return _problem(503, str(error), {"Retry-After": "1"})

    @app.exception_handler(RuntimeError)
    async def model_failure(request: Request, error: RuntimeError) -> JSONResponse:
        # The model's own code failed on this input: a server-side failure, still one line of JSON.
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        return _problem(500, f"the model failed on this request ({first})")

    @app.exception_handler(GradCAMError)
    async def caller_error(request: Request, error: GradCAMError) -> JSONResponse:
        return _problem(422, str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
        return _problem(422, f"field '{where}': {first.get('msg')}" if where else str(first.get("msg")))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail
        if error.status_code == 413:
            detail = too_large_message(settings.max_upload)
        return _problem(error.status_code, str(detail), getattr(error, "headers", None))
