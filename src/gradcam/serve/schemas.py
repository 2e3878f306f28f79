"""The JSON bodies of the service, documented field by field in its OpenAPI schema."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """Every error: one line naming the field or thing at fault and what was expected."""

    detail: str = Field(description="What was wrong and what was expected, in one line.")


class Health(BaseModel):
    status: str = Field(description='"ok" once the served models are loaded.')
    models: list[str] = Field(description="The served models, the default first.")


class ModelInfo(BaseModel):
    name: str = Field(description="The name to send as `model`.")
    default: bool = Field(description="True for the model used when a request names none.")
    input_size: list[int] = Field(description="(height, width) of the model's input in pixels.")
    classes: int = Field(description="Number of classes (targets are 0 .. classes - 1).")


class Models(BaseModel):
    models: list[ModelInfo]


class Labels(BaseModel):
    model: str
    labels: list[str] = Field(description="Class names by index.")


class MethodInfo(BaseModel):
    name: str = Field(description="The name to send as `method`.")
    description: str = Field(description="The method and its paper, in one line.")
    guided: bool = Field(description="True when the result is a guided (input-gradient) picture.")


class Methods(BaseModel):
    methods: list[MethodInfo]


class Prediction(BaseModel):
    index: int = Field(description="Class index.")
    class_: str = Field(alias="class", description="Class name.")
    probability: float = Field(description="Softmax probability.")


class TargetResult(BaseModel):
    index: int = Field(description="The explained class index.")
    class_: str = Field(alias="class", description="The explained class name.")
    probability: float = Field(description="Softmax probability of the class.")
    score: float = Field(description="Pre-softmax score y^c of the class (what the gradients are of).")
    heatmap: str | None = Field(
        description="Base64 PNG: the map through the jet colormap, the size of `picture` "
        "(null for guided-backprop)."
    )
    overlay: str | None = Field(
        description="Base64 PNG: the map over `picture` at opacity 0.5 (null for guided-backprop)."
    )
    guided: str | None = Field(
        description="Base64 PNG: the guided-backprop or guided-gradcam picture, in the model's input view "
        "(null for the CAM methods)."
    )
    raw_map: list[list[float]] | None = Field(
        description="The map at the layer's resolution, not normalised, when `raw` was true; else null."
    )


class Explained(BaseModel):
    model: str
    method: str
    layer: str | None = Field(description="The explained layer (automatic unless `layer` was sent).")
    size: list[int] = Field(description="(width, height) of the uploaded image.")
    picture: str = Field(
        description="Base64 PNG of the frame the maps register with (the whole image, or the crop the "
        "model sees), at most 512 pixels a side."
    )
    predictions: list[Prediction] = Field(description="The model's five best classes.")
    targets: list[TargetResult] = Field(description="One entry per explained class.")
    seconds: float = Field(description="Server time for this request.")


class Compared(BaseModel):
    left: Explained = Field(description="The first model or method.")
    right: Explained = Field(description="The second model or method.")
