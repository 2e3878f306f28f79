"""The study's records, declared once: SQLAlchemy dataclasses that are at once the tables and the records
the store returns (see :mod:`gradcam.study.store`)."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    TypeDecorator,
    UniqueConstraint,
    case,
    func,
    select,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    MappedAsDataclass,
    column_property,
    mapped_column,
)

from gradcam.study.scale import HIGHEST, LOWEST

SIDES = ("A", "B")
#: A study's life: queued and rendering (a service's background job), then ready or failed.
StudyState = Literal["queued", "rendering", "ready", "failed"]
STATES: tuple[str, ...] = get_args(StudyState)
#: The states a study is still being made in.
UNFINISHED = ("queued", "rendering")
#: Characters of the random tokens that are a study's pair and rater ids (URL-safe base64, 96 bits).
ID_BYTES = 12


def new_id() -> str:
    """An opaque random id (a pair's, a rater's): it tells nothing about what it names or its order."""
    return secrets.token_urlsafe(ID_BYTES)


@dataclass(frozen=True)
class Skipped:
    """An image a study left out, and why."""

    image: str
    reason: str


def _now() -> datetime:
    return datetime.now(UTC)


class _UTCDateTime(TypeDecorator[datetime]):
    """A time zone aware timestamp; SQLite keeps no zone, and what was written there is UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value if value is None or value.tzinfo is not None else value.replace(tzinfo=UTC)


class _SkippedList(TypeDecorator[list[Skipped]]):
    """A list of :class:`Skipped` as JSON."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Sequence[Skipped] | None, dialect: Dialect) -> list[dict]:
        return [dataclasses.asdict(item) for item in value or ()]

    def process_result_value(self, value: list[dict] | None, dialect: Dialect) -> list[Skipped]:
        return [Skipped(**item) for item in value or ()]


# --------------------------------------------------------------------------------------------- rows


class Base(DeclarativeBase):
    pass


class PairRow(MappedAsDataclass, Base):
    """A pre-rendered pair: the stronger model's picture is ``robot_a`` when ``stronger_side`` is "A",
    else ``robot_b`` (PNG bytes). Made without ``id`` and ``study_id``; the store sets them. The id is
    an opaque random token (:func:`new_id`): sequential ids, made image by image and method by method,
    would tell a rater which method made the pictures."""

    __tablename__ = "study_pair"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, init=False)
    study_id: Mapped[str] = mapped_column(
        ForeignKey("study.id", ondelete="CASCADE"), index=True, init=False, repr=False
    )
    image: Mapped[str] = mapped_column(String(4096))  # a path under the folder
    class_index: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(1000))
    method: Mapped[str] = mapped_column(String(100))
    stronger_side: Mapped[str] = mapped_column(String(1))
    robot_a: Mapped[bytes] = mapped_column(LargeBinary, repr=False)
    robot_b: Mapped[bytes] = mapped_column(LargeBinary, repr=False)

    __table_args__ = (CheckConstraint("stronger_side IN ('A', 'B')", name="pair_side"),)


class RaterRow(MappedAsDataclass, Base):
    """A rater of one study. ``id`` is the opaque id results and the CSV name them by; the credential is
    a separate random token, of which only the SHA-256 (``token_hash``) is stored: a copy of the
    database lets nobody rate as someone else. ``invited``: made by an invitation, else self-service
    (an open study) from ``client``. ``served`` is the pair ``/next`` last served, the only one the
    rater may rate."""

    __tablename__ = "study_rater"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, repr=False)
    invited: Mapped[bool] = mapped_column(Boolean, default=True)
    client: Mapped[str | None] = mapped_column(String(100), default=None)
    served: Mapped[str | None] = mapped_column(
        ForeignKey("study_pair.id", ondelete="SET NULL"), default=None, repr=False
    )
    created: Mapped[datetime] = mapped_column(_UTCDateTime, init=False, default_factory=_now)

    __table_args__ = (Index("rater_client", "study_id", "client", "created"),)


class RatingRow(MappedAsDataclass, Base):
    __tablename__ = "study_rating"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True, init=False)
    study_id: Mapped[str] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    pair_id: Mapped[str] = mapped_column(ForeignKey("study_pair.id", ondelete="CASCADE"))
    rater_id: Mapped[str] = mapped_column(ForeignKey("study_rater.id", ondelete="CASCADE"))
    answer: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(_UTCDateTime, init=False, default_factory=_now)

    __table_args__ = (
        UniqueConstraint("pair_id", "rater_id", name="one_rating_per_pair_and_rater"),
        CheckConstraint(f"answer BETWEEN {LOWEST} AND {HIGHEST}", name="rating_answer"),
    )


def _count(table: type[PairRow] | type[RaterRow] | type[RatingRow], doc: str) -> Any:
    """A study's number of rows of ``table``, as a column property of :class:`StudyRow`."""
    query = select(func.count(table.id)).where(table.study_id == StudyRow.id).correlate_except(table)
    return column_property(query.scalar_subquery(), doc=doc)


class StudyRow(MappedAsDataclass, Base):
    """A study, as stored and as the admin sees it (raters never see the model names)."""

    __tablename__ = "study"

    id: Mapped[str] = mapped_column(
        String(32), primary_key=True, init=False, doc="The study's id (a random token the store gives)."
    )
    name: Mapped[str] = mapped_column(String(200), doc="The study's name.")
    stronger_model: Mapped[str] = mapped_column(String(1000), doc="The model expected to be better.")
    weaker_model: Mapped[str] = mapped_column(String(1000), doc="The other model.")
    methods: Mapped[list[str]] = mapped_column(JSON, doc="The visualisation methods, one pair each.")
    folder: Mapped[str] = mapped_column(String(4096), doc="The image folder.")
    seed: Mapped[int] = mapped_column(Integer, doc="Seeds the sides and the image draw.")
    annotations: Mapped[str | None] = mapped_column(
        String(4096), default=None, doc="The annotations file, or null."
    )
    open: Mapped[bool] = mapped_column(
        Boolean,
        default=False,
        doc="Open to self-service raters (a limited number per client); else by invitation only.",
    )
    state: Mapped[StudyState] = mapped_column(
        String(16), default="ready", doc="queued, rendering (done of total images), ready or failed."
    )
    done: Mapped[int] = mapped_column(Integer, default=0, doc="Images looked at so far.")
    total: Mapped[int] = mapped_column(Integer, default=0, doc="Images to look at.")
    error: Mapped[str | None] = mapped_column(
        String(1000), default=None, doc="Why the study failed, in one line; else null."
    )
    kept: Mapped[int] = mapped_column(Integer, default=0, doc="Images kept (each gives one pair per method).")
    skipped: Mapped[list[Skipped]] = mapped_column(
        _SkippedList, default_factory=list, doc="Images left out, with why."
    )
    created: Mapped[datetime] = mapped_column(
        _UTCDateTime, init=False, default_factory=_now, doc="When the study was created (UTC)."
    )

    __table_args__ = (CheckConstraint(f"state IN {STATES!r}", name="study_state"),)


# Declared after StudyRow: they refer to its id.
StudyRow.pairs = _count(PairRow, "Pairs stored.")
StudyRow.raters = _count(RaterRow, "Raters invited or joined.")
StudyRow.ratings = _count(RatingRow, "Ratings stored.")

_RATINGS = (
    select(
        RatingRow.id,
        RatingRow.study_id.label("study"),
        RatingRow.pair_id.label("pair"),
        PairRow.image,
        PairRow.class_index,
        PairRow.class_name,
        PairRow.method,
        PairRow.stronger_side,
        RatingRow.rater_id.label("rater"),
        RatingRow.answer,
        RatingRow.created,
    )
    .join(PairRow, PairRow.id == RatingRow.pair_id)
    .subquery("rating_with_pair")
)


class Rating(Base):
    """One stored rating with what is needed to score it (no pictures): a read-only mapping of a rating
    joined with its pair. Attributes: ``id``, ``study``, ``pair`` (ids), ``image``, ``class_index``,
    ``class_name``, ``method``, ``stronger_side``, ``rater``, ``answer``, ``created`` and ``score``."""

    __table__ = _RATINGS
    __mapper_args__ = {"primary_key": [_RATINGS.c.id]}  # noqa: RUF012 (SQLAlchemy's own attribute)

    #: The answer from the stronger model's side: +2 means "the stronger model is clearly more
    #: reliable", whichever robot it was shown as.
    score = column_property(
        case((_RATINGS.c.stronger_side == "A", _RATINGS.c.answer), else_=-_RATINGS.c.answer)
    )

    def __repr__(self) -> str:
        return f"Rating(pair={self.pair}, rater={self.rater!r}, answer={self.answer})"


@dataclass(frozen=True)
class Progress:
    rated: int
    total: int

    @property
    def remaining(self) -> int:
        return self.total - self.rated
