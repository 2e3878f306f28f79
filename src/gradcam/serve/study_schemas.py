"""The study API's request and response bodies (they document themselves in the OpenAPI schema).

A study as the admin sees it (:data:`StudyAdmin`) and as a rater sees it (:data:`StudyPublic`) are built
from :class:`gradcam.study.store.StudyRow` itself (:func:`gradcam.serve.schemas.schema_of`); the scale
comes from :data:`gradcam.study.scale.SCALE`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, computed_field

from gradcam.serve.schemas import FromRow, schema_of
from gradcam.study.scale import HIGHEST, LOWEST, QUESTION, SCALE
from gradcam.study.store import MAX_INVITATIONS, StudyRow

Name = Annotated[str, Field(min_length=1, max_length=200)]


class ScaleStep(BaseModel):
    answer: int = Field(description="The value sent as `answer` for this choice.")
    text: str = Field(description="The wording shown to raters.")


def _scale() -> list[ScaleStep]:
    return [ScaleStep(answer=answer, text=text) for answer, text in SCALE]


class Folder(BaseModel):
    name: str = Field(description='What to send as `folder` (".": the root of --study-images itself).')
    images: int = Field(description="Image files in it, its subfolders included.")
    annotations: list[str] = Field(description="JSON files at its top level, usable as `annotations`.")


class Folders(BaseModel):
    folders: list[Folder]


class StudyCreate(BaseModel):
    """A new study. Both models must be served by this server. The request is checked and answered at
    once (202); the pairs are rendered in the background (about a second per image, model and method
    on a CPU), and the study's `state` says how far it is."""

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
    open: bool = Field(
        False,
        description="Let raters join by themselves at the rater page (a limited number per client "
        "address); by default a study takes raters by invitation only (POST "
        "/v1/admin/studies/{id}/invitations).",
    )


class _StudyLinks(FromRow):
    id: str

    @computed_field(description="The page to send raters to.")  # type: ignore[prop-decorator]
    @property
    def rater_path(self) -> str:
        return f"/studies/{self.id}"

    @computed_field(description="The results page.")  # type: ignore[prop-decorator]
    @property
    def results_path(self) -> str:
        return f"/studies/{self.id}/results"

    @computed_field(description="Where the admin reads the study's state.")  # type: ignore[prop-decorator]
    @property
    def status_path(self) -> str:
        return f"/v1/admin/studies/{self.id}"


#: A study as the admin sees it: every column of the row (model names included, which raters never
#: see), its counts, its state and progress, and its pages.
StudyAdmin = schema_of(
    StudyRow, "StudyAdmin", base=_StudyLinks, doc="A study as the admin sees it (with the model names)."
)


class StudyList(BaseModel):
    studies: list[StudyAdmin]  # type: ignore[valid-type]


class _RaterView(FromRow):
    question: str = Field(QUESTION, description="Asked of each pair; {class} stands for the predicted class.")
    scale: list[ScaleStep] = Field(default_factory=_scale, description="The answers, from the top down.")


#: What a rater may know about a study: no model names.
StudyPublic = schema_of(
    StudyRow,
    "StudyPublic",
    include=("id", "name", "pairs", "open"),
    base=_RaterView,
    doc="What a rater may know about a study: no model names.",
)


class RaterJoined(BaseModel):
    """A new rater of an open study."""

    token: str = Field(
        description="The rater's secret: send it as `Authorization: Bearer <token>` with every rater call."
    )
    link: str = Field(description="The rater page with the token in its fragment (`/studies/<id>#<token>`).")


class InvitationsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: Annotated[int, Field(strict=True, ge=1, le=MAX_INVITATIONS, description="Invitations to issue.")]


class InvitationOut(BaseModel):
    rater: str = Field(description="The rater's id, as results and the ratings CSV name them.")
    link: str = Field(
        description="The rater page for one person, `/studies/<id>#<token>`: the token is in the fragment, "
        "which browsers never send (prefix it with the server's address). Shown once: only a hash of the "
        "token is stored."
    )


class Invitations(BaseModel):
    study: str
    invitations: list[InvitationOut]


class NextPair(BaseModel):
    """The rater's next pair, or ``done: true`` (and null pair fields) when every pair is rated. The same
    pair is returned until it is rated. The method is not shown to raters."""

    model_config = ConfigDict(populate_by_name=True)

    done: bool
    total: int = Field(description="Pairs in the study.")
    rated: int = Field(description="Pairs this rater has rated.")
    remaining: int = Field(description="Pairs this rater has still to rate (this one included).")
    pair: str | None = Field(None, description="The pair's opaque id: send it back with the answer.")
    class_index: int | None = None
    class_name: str | None = Field(None, alias="class", description="The class both robots predicted.")
    robot_a: str | None = Field(None, description="Robot A's picture: base64 PNG (no data: prefix).")
    robot_b: str | None = Field(None, description="Robot B's picture: base64 PNG (no data: prefix).")


class RatingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pair: Annotated[
        str,
        Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$", description="The pair /next served."),
    ]
    answer: Annotated[
        int, Field(strict=True, ge=LOWEST, le=HIGHEST, description="One of the answers of `scale`.")
    ]


class RatingStored(BaseModel):
    pair: str
    answer: int
    total: int
    rated: int
    remaining: int


class MethodResults(BaseModel):
    method: str
    pairs: int
    ratings: int
    raters: int = Field(description="Distinct raters who rated this method's pairs.")
    mean: float | None = Field(description="Mean score from the stronger model's side; null: none.")
    ci_low: float | None = Field(description="Bootstrap 95% interval, lower end; null with < 2 ratings.")
    ci_high: float | None = Field(description="Bootstrap 95% interval, upper end; null with < 2 ratings.")
    ci_note: str | None = Field(description="Why the interval is missing or degenerate; else null.")
    counts: dict[str, int] = Field(description="Ratings per score from the stronger side, lowest first.")


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
    scale: list[ScaleStep] = Field(default_factory=_scale, description="The answers, from the top down.")
