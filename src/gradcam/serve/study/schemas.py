"""The study API's request and response bodies (they document themselves in the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

#: The question each pair asks; {class} is the class both robots predicted.
QUESTION = "Both robots recognised this image as \u201c{class}\u201d. Which robot is more reliable?"
#: The paper's five-point scale (Selvaraju et al. 2017, section 5.2), from +2 to -2.
SCALE = (
    (2, "Robot A is clearly more reliable than Robot B"),
    (1, "Robot A is slightly more reliable than Robot B"),
    (0, "Robot A and Robot B are equally reliable"),
    (-1, "Robot A is slightly less reliable than Robot B"),
    (-2, "Robot A is clearly less reliable than Robot B"),
)

Name = Annotated[str, Field(min_length=1, max_length=200)]
Token = Annotated[str, Field(min_length=1, max_length=64)]


class Problem(BaseModel):
    """Every error: one line naming the field or thing at fault and what was expected."""

    detail: str


class ScaleStep(BaseModel):
    answer: int = Field(description="The value sent as `answer` for this choice.")
    text: str = Field(description="The wording shown to raters.")


class Folder(BaseModel):
    name: str = Field(description='What to send as `folder` (".": the root of --study-images itself).')
    images: int = Field(description="Image files in it, its subfolders included.")
    annotations: list[str] = Field(description="JSON files at its top level, usable as `annotations`.")


class Folders(BaseModel):
    folders: list[Folder]


class StudyCreate(BaseModel):
    """A new study. Both models must be served by this server; the pairs are rendered before the reply,
    which can take a while for guided methods (about a second per image, model and method on a CPU)."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    stronger_model: Name = Field(description="The model expected to be better (the paper: VGG-16).")
    weaker_model: Name = Field(description="The other model (the paper: AlexNet).")
    methods: list[Name] = Field(
        min_length=1,
        max_length=32,
        description="Visualisation methods, e.g. guided-backprop, guided-gradcam.",
    )
    folder: Name = Field(description="One of the names GET /v1/admin/folders lists.")
    annotations: Name | None = Field(
        None,
        description='A JSON file at the folder\'s top level: {"<image file name>": <class index or name>}. '
        "Then only images annotated with the class both models predict are kept.",
    )
    max_images: int | None = Field(
        None, ge=1, le=100_000, description="Keep at most this many images, drawn at random (from `seed`)."
    )
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Seeds the sides and the image draw; random when omitted."
    )


class StudyAdmin(BaseModel):
    """A study as the admin sees it (with the model names, which raters never see)."""

    id: str
    name: str
    stronger_model: str
    weaker_model: str
    methods: list[str]
    folder: str
    annotations: str | None
    seed: int
    created: datetime
    pairs: int
    raters: int
    ratings: int
    rater_path: str = Field(description="The page to send raters to.")
    results_path: str = Field(description="The results page.")


class SkippedImage(BaseModel):
    image: str
    reason: str


class StudyCreated(StudyAdmin):
    kept: int = Field(description="Images kept (each gives one pair per method).")
    skipped: list[SkippedImage] = Field(description="Images left out, with why.")


class StudyList(BaseModel):
    studies: list[StudyAdmin]


class StudyPublic(BaseModel):
    """What a rater may know about a study: no model names."""

    id: str
    name: str
    pairs: int
    question: str = Field(description="Asked of each pair; {class} stands for the predicted class.")
    scale: list[ScaleStep]


class RaterIssued(BaseModel):
    rater: str = Field(description="The rater's id: keep it and send it with every call.")


class NextPair(BaseModel):
    """The rater's next pair, or ``done: true`` (and null pair fields) when every pair is rated. The same
    pair is returned until it is rated. The method is not shown to raters."""

    model_config = ConfigDict(populate_by_name=True)

    done: bool
    total: int = Field(description="Pairs in the study.")
    rated: int = Field(description="Pairs this rater has rated.")
    remaining: int = Field(description="Pairs this rater has still to rate (this one included).")
    pair: int | None = None
    class_index: int | None = None
    class_name: str | None = Field(None, alias="class", description="The class both robots predicted.")
    robot_a: str | None = Field(None, description="Robot A's picture: base64 PNG (no data: prefix).")
    robot_b: str | None = Field(None, description="Robot B's picture: base64 PNG (no data: prefix).")


class RatingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rater: Token
    pair: Annotated[int, Field(strict=True, ge=0, le=2**63 - 1)]  # a SQL BIGINT
    answer: Annotated[int, Field(strict=True, ge=-2, le=2, description="+2 .. -2, see `scale`.")]


class RatingStored(BaseModel):
    pair: int
    answer: int
    total: int
    rated: int
    remaining: int


class MethodResults(BaseModel):
    method: str
    pairs: int
    ratings: int
    raters: int = Field(description="Distinct raters who rated this method's pairs.")
    mean: float | None = Field(description="Mean score from the stronger model's side, -2..2; null: none.")
    ci_low: float | None = Field(description="Bootstrap 95% interval, lower end; null with < 2 ratings.")
    ci_high: float | None = Field(description="Bootstrap 95% interval, upper end; null with < 2 ratings.")
    ci_note: str | None = Field(description="Why the interval is missing or degenerate; else null.")
    counts: dict[str, int] = Field(description="Ratings per score from the stronger side, '-2'..'2'.")


class Results(BaseModel):
    study: str
    name: str
    stronger_model: str
    weaker_model: str
    confidence_level: float
    resamples: int
    bootstrap_seed: int
    ratings: int
    raters: int
    methods: list[MethodResults]
