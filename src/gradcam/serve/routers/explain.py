"""The explanation API: the served models and methods, ``POST /v1/explain`` and ``POST /v1/compare``.

Classifiers, segmenters and detectors (:data:`gradcam.serve.render.IMAGE_TASKS`): ``target`` names a
classifier's or segmenter's classes to explain (a segmenter's default: its largest predicted class) or
the classes a detector's detections are kept of; ``min_score`` and ``topk`` choose a detector's
detections. A target carries its task's numbers (``detection``: box, score; ``mask``: the predicted mask
as a PNG, its area), which the web app draws over the picture.

Model work never runs on the event loop: uploads are decoded (within a budget of pixels decoded at once)
and PNGs encoded in the thread pool, and explanations go through the
:class:`~gradcam.serve.batcher.Batcher` into a bounded pool of worker threads, concurrent requests for
one model, method and layer merged into one forward/backward.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from gradcam import io, targets, viz
from gradcam.errors import GradCAMError
from gradcam.methods import registry
from gradcam.models.pool import ModelPool
from gradcam.serve.dependencies import BatcherDep, Decoding, Pool, Settings, Store
from gradcam.serve.render import (
    MAX_TARGETS,
    MIN_SCORE,
    ImageView,
    Prepared,
    TargetView,
    check_task,
    default_topk,
    method_entry,
    offered,
    prepare,
)
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

ERRORS = {
    408: {
        "model": Problem,
        "description": "The body arrived too slowly (--read-timeout between chunks, --body-timeout in all).",
    },
    413: {
        "model": Problem,
        "description": "The upload is over --max-upload, or the image over the pixel limit.",
    },
    415: {
        "model": Problem,
        "description": "The upload is not a JPEG, PNG, WebP, GIF, BMP or TIFF image (no other is tried).",
    },
    422: {"model": Problem, "description": "A corrupt image, or a field out of range or unknown."},
    503: {
        "model": Problem,
        "description": "Too many images waiting, or too many pixels being decoded at once "
        "(--max-decoding-pixels); retry after the Retry-After seconds.",
    },
}

ImageField = Annotated[
    UploadFile,
    File(
        description="The image: JPEG, PNG, WebP, GIF, BMP or TIFF (any other format: 415), at most "
        "--max-pixels pixels (413, told from its header before it is decoded); of an animated or "
        "multi-page file, the first frame."
    ),
]
TargetField = Annotated[
    list[str] | None,
    Form(description="Class to explain: an index or a class name (any case); repeat for several (at most "
         "10). None: the `topk` best classes (a segmenter's: its `topk` largest predicted classes). For a "
         "detector: explain only detections of these classes."),
]  # fmt: skip
TopkField = Annotated[
    int | None,
    Form(ge=1, le=MAX_TARGETS,
         description="Explain the k best classes when no target is sent (default 1); a segmenter's k "
         "largest predicted classes (default 1); a detector's k best detections (default 10)."),
]  # fmt: skip
MinScoreField = Annotated[
    float,
    Form(ge=0, le=1, allow_inf_nan=False,
         description="A detector's detections scoring at least this are explained (0..1); ignored by "
         "other models."),
]  # fmt: skip
LayerField = Annotated[
    str | None, Form(max_length=200, description="Qualified module name to explain (default: automatic).")
]
RawField = Annotated[bool, Form(description="Also return the raw map as a list of lists.")]

router = APIRouter()


@router.get(
    "/healthz",
    response_model=Health,
    tags=["service"],
    responses={503: {"model": Problem, "description": "The study database cannot be reached."}},
)
async def healthz(pool: Pool, store: Store) -> dict:
    """Readiness: the served models (all loaded before the first request is answered) and the study
    database, reached with a read (503 when it cannot be, or when its SQLite file is gone)."""
    await run_in_threadpool(store.health)
    return {"status": "ok", "models": pool.names, "database": "ok"}


@router.get("/v1/models", response_model=Models, tags=["service"])
async def list_models(pool: Pool) -> dict:
    """The served models; the first is the default."""
    infos = []
    for name in pool.names:
        loaded = pool.get(name)
        infos.append(
            ModelInfo(
                name=name,
                default=name == pool.default,
                task=loaded.task,
                input_size=list(loaded.input_size),
                classes=len(loaded.labels),
            )
        )
    return {"models": infos}


@router.get(
    "/v1/models/{model:path}/labels",
    response_model=Labels,
    responses={404: {"model": Problem}, 422: {"model": Problem}},
    tags=["service"],
)
async def labels(model: str, pool: Pool) -> dict:
    """The class names of a served model, by index."""
    if model not in pool.names:
        raise HTTPException(404, f"model '{model}' is not served here; choose from {', '.join(pool.names)}")
    return {"model": model, "labels": pool.get(model).labels}


@router.get("/v1/methods", response_model=Methods, tags=["service"])
async def list_methods(settings: Settings) -> dict:
    """The explanation methods this server offers (the registry's methods that need a model; the slow
    ones only when started with --slow-methods)."""
    entries = [registry.get(name) for name in offered(settings.slow_methods)]
    return {
        "methods": [
            MethodInfo(
                name=m.name, kind=m.kind, slow=m.slow, description=m.description, guided=m.kind == "pixel"
            )
            for m in entries
        ]
    }


def _b64(picture: Image.Image | None) -> str | None:
    return None if picture is None else base64.b64encode(viz.encode_png(picture)).decode("ascii")


def _body(view: ImageView, size: tuple[int, int], raw: bool, seconds: float) -> dict:
    """The JSON of one explained image (PNG encoding included: run it off the event loop)."""
    return {
        "model": view.model,
        "method": view.method,
        "task": view.task,
        "layer": view.layer,
        "size": list(size),
        "picture": _b64(view.picture),
        "predictions": [{"index": i, "class": name, "probability": p} for i, name, p in view.predictions],
        "targets": [_target(t, raw) for t in view.targets],
        "none": view.none,
        "seconds": round(seconds, 4),
    }


def _target(target: TargetView, raw: bool) -> dict:
    mask = None
    if target.mask is not None and target.mask_picture is not None:
        mask = {**target.mask, "png": _b64(target.mask_picture), "size": list(target.mask_picture.size)}
    return {
        "index": target.index,
        "class": target.name,
        "probability": target.probability,
        "score": target.score,
        "heatmap": _b64(target.heatmap),
        "guided": _b64(target.guided),
        "raw_map": target.raw.tolist() if raw and target.raw is not None else None,
        "detection": target.detection,
        "mask": mask,
    }


def _check_request(
    pool: ModelPool, choices: list[str], model: str, method: str, target: list[str] | None
) -> list[int]:
    """Checks that need no image, made before the upload is decoded: the target class ids."""
    pool.check(model)
    method_entry(method, choices)
    if len(target or []) > MAX_TARGETS:
        raise GradCAMError(f"field 'target': at most {MAX_TARGETS} classes per request")
    loaded = pool.get(model)
    check_task(loaded, method)
    return [targets.parse_class(spec, loaded.labels) for spec in target or []]


async def _read_image(
    image: UploadFile, for_models: list[str], pool: Pool, settings: Settings, decoding: Decoding
) -> tuple[tuple[int, int], dict[str, Prepared]]:
    """Decode the upload (of :data:`gradcam.io.UPLOAD_FORMATS` only) and prepare it for each model; the
    full-size picture is dropped here. Its pixels, known from its header, are reserved in the decoding
    budget before any is decoded, and held until it is prepared (none left: 503, never a queue)."""
    data = await image.read()
    # The name is only shown back in messages: never a path.
    name = "image" if not image.filename else f"image '{image.filename[:80]}'"

    def decode_and_prepare() -> tuple[tuple[int, int], dict[str, Prepared]]:
        with decoding.share() as reserve:
            picture = io.decode_image(
                data, name, max_pixels=settings.max_pixels, formats=io.UPLOAD_FORMATS, reserve=reserve
            )
            return picture.size, {m: prepare(pool.get(m), picture) for m in dict.fromkeys(for_models)}

    return await run_in_threadpool(decode_and_prepare)


async def _explain_one(
    batcher: BatcherDep,
    prepared: Prepared,
    size: tuple[int, int],
    model: str,
    method: str,
    wanted: list[int],
    topk: int | None,
    layer: str | None,
    raw: bool,
    min_score: float,
) -> dict:
    started = time.perf_counter()
    k = topk or default_topk(batcher.pool.get(model).task)
    view = await batcher.explain(
        model, method, prepared, wanted, topk=k, layer=layer or None, min_score=min_score
    )
    return await run_in_threadpool(_body, view, size, raw, time.perf_counter() - started)


@router.post("/v1/explain", response_model=Explained, responses=ERRORS, tags=["explain"])
async def explain(
    image: ImageField,
    pool: Pool,
    settings: Settings,
    batcher: BatcherDep,
    decoding: Decoding,
    model: Annotated[
        str | None, Form(max_length=100, description="A served model (default: the first).")
    ] = None,
    method: Annotated[
        str, Form(max_length=100, description="An explanation method, see /v1/methods.")
    ] = "gradcam",
    target: TargetField = None,
    topk: TopkField = None,
    layer: LayerField = None,
    raw: RawField = False,
    min_score: MinScoreField = MIN_SCORE,
) -> dict:
    """Explain one image: a classifier's top-5 predictions and, per target class or detection, the
    heatmap (or guided picture) as PNG, with a detection's box or a segmented class's mask."""
    model = model or pool.default
    wanted = _check_request(pool, offered(settings.slow_methods), model, method, target)
    size, prepared = await _read_image(image, [model], pool, settings, decoding)
    return await _explain_one(
        batcher, prepared[model], size, model, method, wanted, topk, layer, raw, min_score
    )


@router.post("/v1/compare", response_model=Compared, responses=ERRORS, tags=["explain"])
async def compare(
    image: ImageField,
    pool: Pool,
    settings: Settings,
    batcher: BatcherDep,
    decoding: Decoding,
    model: Annotated[
        list[str] | None, Form(description="One served model, or two to compare (default: the first).")
    ] = None,
    method: Annotated[list[str] | None, Form(description="One method, or two to compare.")] = None,
    target: TargetField = None,
    topk: TopkField = None,
    layer: LayerField = None,
    raw: RawField = False,
    min_score: MinScoreField = MIN_SCORE,
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
    choices = offered(settings.slow_methods)
    wanted = [_check_request(pool, choices, m, meth, target) for m, meth in pairs]
    size, prepared = await _read_image(image, chosen_models, pool, settings, decoding)
    left, right = await asyncio.gather(
        *(
            _explain_one(batcher, prepared[m], size, m, meth, ids, topk, layer, raw, min_score)
            for (m, meth), ids in zip(pairs, wanted, strict=True)
        )
    )
    return {"left": left, "right": right}
