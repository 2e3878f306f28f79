"""The JSON bodies of the service, documented field by field in its OpenAPI schema, and
:func:`schema_of`, which builds a body from an ORM row's own declaration."""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model
from sqlalchemy import inspect


class FromRow(BaseModel):
    """The base of :func:`schema_of`'s bodies: read from an object's attributes (an ORM row)."""

    model_config = ConfigDict(from_attributes=True)


def schema_of(
    row: type,
    name: str,
    *,
    include: Sequence[str] | None = None,
    base: type[FromRow] = FromRow,
    doc: str | None = None,
) -> type[FromRow]:
    """A pydantic body with the columns of the ORM class ``row`` (only ``include``, in that order, when
    given): each typed as the row declares it (a column property by its SQL type) and described by its
    ``doc``, so that no field list is written twice. ``base`` adds fields of its own."""
    hints = typing.get_type_hints(row)
    attributes = {attr.key: attr for attr in inspect(row).column_attrs}
    chosen = list(attributes) if include is None else list(include)
    fields: dict[str, Any] = {}
    for key in chosen:
        attr = attributes[key]
        hint = hints.get(key)
        kind = typing.get_args(hint)[0] if hint is not None else attr.expression.type.python_type
        fields[key] = (kind, Field(description=attr.doc))
    return create_model(name, __base__=base, __doc__=doc or row.__doc__, __module__=base.__module__, **fields)


class Problem(BaseModel):
    """Every error: one line naming the field or thing at fault and what was expected."""

    detail: str = Field(description="What was wrong and what was expected, in one line.")


class Health(BaseModel):
    status: str = Field(description='"ok" once the served models are loaded and the database answers.')
    models: list[str] = Field(description="The served models, the default first.")
    database: str = Field(description='"ok": the study database answered a read just now.')


class ModelInfo(BaseModel):
    name: str = Field(description="The name to send as `model`.")
    default: bool = Field(description="True for the model used when a request names none.")
    task: str = Field(
        description="classification, segmentation or detection: what `target`, `topk` and `min_score` "
        "choose and which task fields (`detection`, `mask`) the targets carry."
    )
    input_size: list[int] = Field(
        description="(height, width) of the model's input in pixels (a segmenter resizes the shorter "
        "side and keeps the aspect, a detector takes the image as it is: a representative size)."
    )
    classes: int = Field(description="Number of classes (targets are 0 .. classes - 1).")


class Models(BaseModel):
    models: list[ModelInfo]


class Labels(BaseModel):
    model: str
    labels: list[str] = Field(description="Class names by index.")


class MethodInfo(BaseModel):
    name: str = Field(description="The name to send as `method`.")
    kind: str = Field(description="cam, attention, pixel or baseline (see gradcam.methods.registry).")
    slow: bool = Field(description="One forward per channel of the layer: offered with --slow-methods.")
    description: str = Field(description="The method and its paper, in one line.")
    guided: bool = Field(description="True when the result is a guided (input-gradient) picture.")


class Methods(BaseModel):
    methods: list[MethodInfo]


class Prediction(BaseModel):
    index: int = Field(description="Class index.")
    class_: str = Field(alias="class", description="Class name.")
    probability: float = Field(description="Softmax probability.")


class Detection(BaseModel):
    """One of a detector's own detections (the explained target)."""

    index: int = Field(description="Its rank among the image's explained detections, best first (0..).")
    box: list[float] = Field(
        description="[x0, y0, x1, y1] in the uploaded image's pixels (`size`), to 0.1 pixel; scale by "
        "the picture's width / size[0] to draw it on `picture`."
    )
    score: float = Field(description="The detector's score of the detection (the class score explained).")


class Mask(BaseModel):
    """A segmented class's predicted mask: the pixels whose argmax over the segmenter's output is the
    class."""

    png: str = Field(
        description="Base64 PNG, grayscale: 255 inside the mask, 0 outside, on the segmenter's output "
        "pixels (its input: the image resized with its aspect kept); stretched over `picture` it lies on "
        "the image (the web app draws its outline)."
    )
    size: list[int] = Field(description="(width, height) of the mask PNG.")
    area: int = Field(
        description="The mask's area in the uploaded image's pixels (fraction x width x height)."
    )
    fraction: float = Field(description="The mask's share of the image, 0..1.")


class TargetResult(BaseModel):
    index: int = Field(
        description="The explained class index (a segmenter's class; a detector's label, for torchvision "
        "a COCO category id)."
    )
    class_: str = Field(alias="class", description="The explained class name.")
    probability: float | None = Field(
        description="Softmax probability of the class; null for a target without one (a segmented "
        "class, a detection)."
    )
    score: float = Field(
        description="The score the gradients are of: a classifier's pre-softmax y^c, a segmenter's sum "
        "of the class's logits over its predicted mask, a detection's class score."
    )
    heatmap: str | None = Field(
        description="Base64 PNG: the map through the jet colormap, the size of `picture` (null for "
        "guided-backprop). Drawn over `picture` at any opacity it is the overlay (the web app does so)."
    )
    guided: str | None = Field(
        description="Base64 PNG: the guided-backprop or guided-gradcam picture, in the model's input view "
        "(null for the CAM methods)."
    )
    raw_map: list[list[float]] | None = Field(
        description="The map at the layer's resolution, not normalised, when `raw` was true; else null "
        "(a detector's: the layer's grid over its resized, padded input)."
    )
    detection: Detection | None = Field(description="A detector's target: the detection; else null.")
    mask: Mask | None = Field(description="A segmenter's target: the class's predicted mask; else null.")


class Explained(BaseModel):
    model: str
    method: str
    task: str = Field(description="The model's task: classification, segmentation or detection.")
    layer: str | None = Field(
        description="The explained layer (automatic unless `layer` was sent); null for guided-backprop."
    )
    size: list[int] = Field(description="(width, height) of the uploaded image.")
    picture: str = Field(
        description="Base64 PNG of the frame the maps register with (the whole image, or the crop the "
        "model sees), at most 512 pixels a side."
    )
    predictions: list[Prediction] = Field(
        description="A classifier's five best classes (empty for a segmenter or detector)."
    )
    targets: list[TargetResult] = Field(
        description="One entry per explained class or detection; empty when a segmenter or detector "
        "found nothing to explain (`none` says why)."
    )
    none: str | None = Field(
        description="Why `targets` is empty (no detection scored at least `min_score`, no class but the "
        "background predicted); null when it is not."
    )
    seconds: float = Field(description="Server time for this request.")


class Compared(BaseModel):
    left: Explained = Field(description="The first model or method.")
    right: Explained = Field(description="The second model or method.")
