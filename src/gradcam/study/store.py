"""Where studies, pre-rendered pairs, raters and ratings live: SQLAlchemy 2.x ORM over any database URL.

A SQLite file by default (:data:`DEFAULT_DB_URL`), opened in WAL mode with a busy timeout so concurrent
raters wait for each other instead of failing; ``check_same_thread`` is off because the service runs
calls on a thread pool (each call here opens its own short session, so no connection is shared by two
threads at once). Any other SQLAlchemy URL works as well (``postgresql+psycopg://user@host/db``).

**Records are declared once.** The rows are SQLAlchemy dataclasses
(:class:`~sqlalchemy.orm.MappedAsDataclass`): :class:`StudyRow`, :class:`PairRow`, :class:`RaterRow` and
:class:`RatingRow` are at once the tables, the records the store returns (detached, every column loaded:
no lazy load can hit a closed session) and, for the HTTP API, the source its schemas are built from
(:func:`gradcam.serve.schemas.schema_of`). A study's counts are column properties of its row;
:class:`Rating` is a read-only mapping of a rating joined with its pair (no pictures). The PNG blobs
are only read by :meth:`StudyStore.next_pair`.

Integrity is the database's job, not the application's: a rating is UNIQUE per (pair, rater), so two
concurrent submissions of one answer store exactly one row and the other gets :class:`DuplicateRating`;
answers are CHECKed to lie on :data:`gradcam.study.scale.SCALE`.

A study has a state: ``queued`` and ``rendering`` while a service renders it in the background (with
``done`` of ``total`` images), then ``ready`` or ``failed`` (with its one-line ``error``). Raters can only
use a ready study (:class:`NotReady` otherwise). The tables are created on first use; a database made by
an older version without the state columns has to be recreated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    TypeDecorator,
    UniqueConstraint,
    case,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    MappedAsDataclass,
    Session,
    column_property,
    mapped_column,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool

from gradcam.errors import GradCAMError
from gradcam.study.scale import ANSWERS, HIGHEST, LOWEST

#: The database ``gradcam study`` and ``gradcam serve`` use when no ``--db`` is given: a SQLite file in
#: the working directory.
DEFAULT_DB_URL = "sqlite:///gradcam-study.db"
#: Seconds a SQLite writer waits for another writer's lock before giving up.
BUSY_TIMEOUT_S = 30
SIDES = ("A", "B")
#: A study's life: queued and rendering (a service's background job), then ready or failed.
StudyState = Literal["queued", "rendering", "ready", "failed"]
STATES: tuple[str, ...] = get_args(StudyState)
#: The states a study is still being made in.
UNFINISHED = ("queued", "rendering")


class StudyError(GradCAMError):
    """A study call that cannot be done (the message says why, in one line)."""


class NotFound(StudyError):
    """An unknown study, rater, pair or folder (or one of another study)."""


class DuplicateRating(StudyError):
    """The rater has already rated this pair."""


class NotReady(StudyError):
    """The study is still being rendered, or its rendering failed: raters cannot use it."""


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
    else ``robot_b`` (PNG bytes). Made without ``id`` and ``study_id``; the store sets them."""

    __tablename__ = "study_pair"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True, init=False)
    study_id: Mapped[str] = mapped_column(
        ForeignKey("study.id", ondelete="CASCADE"), index=True, init=False, repr=False
    )
    image: Mapped[str] = mapped_column(String(1000))
    class_index: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(100))
    stronger_side: Mapped[str] = mapped_column(String(1))
    robot_a: Mapped[bytes] = mapped_column(LargeBinary, repr=False)
    robot_b: Mapped[bytes] = mapped_column(LargeBinary, repr=False)

    __table_args__ = (CheckConstraint("stronger_side IN ('A', 'B')", name="pair_side"),)


class RaterRow(MappedAsDataclass, Base):
    __tablename__ = "study_rater"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    created: Mapped[datetime] = mapped_column(_UTCDateTime, init=False, default_factory=_now)


class RatingRow(MappedAsDataclass, Base):
    __tablename__ = "study_rating"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True, init=False)
    study_id: Mapped[str] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("study_pair.id", ondelete="CASCADE"))
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
    stronger_model: Mapped[str] = mapped_column(String(100), doc="The model expected to be better.")
    weaker_model: Mapped[str] = mapped_column(String(100), doc="The other model.")
    methods: Mapped[list[str]] = mapped_column(JSON, doc="The visualisation methods, one pair each.")
    folder: Mapped[str] = mapped_column(String(1000), doc="The image folder.")
    seed: Mapped[int] = mapped_column(Integer, doc="Seeds the sides and the image draw.")
    annotations: Mapped[str | None] = mapped_column(
        String(1000), default=None, doc="The annotations file, or null."
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
StudyRow.raters = _count(RaterRow, "Raters issued.")
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


# ------------------------------------------------------------------------------------------ engine


def database_url(text: str) -> str:
    """A ``--db`` value as a SQLAlchemy URL: a URL stays as it is, a plain file path becomes a SQLite URL."""
    return text if "://" in text else f"sqlite:///{Path(text).expanduser()}"


def make_engine(url: str) -> Engine:
    """An engine safe to share between threads; SQLite files in WAL mode with a busy timeout, foreign keys
    on. ``sqlite://`` (in memory) shares one connection and suits single-threaded tests only."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StudyError(f"database URL '{url}' is not a SQLAlchemy URL (e.g. {DEFAULT_DB_URL})") from None
    shown = parsed.render_as_string(hide_password=True)
    memory = parsed.database in (None, "", ":memory:")
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and not memory:
        parent = Path(parsed.database).expanduser().resolve().parent
        if not parent.is_dir():
            raise StudyError(f"database URL '{shown}': folder '{parent}' does not exist")
    options: dict = {"pool_pre_ping": True}
    if sqlite:
        options = {"connect_args": {"check_same_thread": False, "timeout": BUSY_TIMEOUT_S}}
        if memory:
            options["poolclass"] = StaticPool
    try:
        engine = create_engine(parsed, **options)
    except ImportError as error:
        raise StudyError(f"database URL '{shown}': its driver is not installed ({error})") from None
    except ArgumentError as error:
        raise StudyError(f"database URL '{shown}': {error}") from None
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas(memory))
    return engine


def _sqlite_pragmas(memory: bool) -> Callable[[Any, Any], None]:
    def apply(connection: Any, _record: Any) -> None:  # a DBAPI connection
        cursor = connection.cursor()
        if not memory:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return apply


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser()


# ------------------------------------------------------------------------------------------- store


def presentation_key(rater: str, pair: int) -> str:
    """The order a rater sees pairs in: sorted by this hash, so each rater has their own random order
    (against order effects), the same after a reload or a restart."""
    return hashlib.sha256(f"{rater}/{pair}".encode()).hexdigest()


def _why_not_ready(study: StudyRow) -> str:
    if study.state == "failed":
        return f"study '{study.id}' failed: {study.error}"
    if study.state == "queued":
        return f"study '{study.id}' is not ready yet: it is queued for rendering; try again later"
    progress = f"rendering, {study.done} of {study.total} images"
    return f"study '{study.id}' is not ready yet: {progress}; try again later"


class StudyStore:
    """Studies, pairs, raters and ratings in one database (created on first use). Every record returned
    is a detached row with its columns loaded."""

    def __init__(self, url: str = DEFAULT_DB_URL) -> None:
        self.url = url
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> StudyStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    # ---------------------------------------------------------------------------------- studies

    def create_study(self, *, pairs: Sequence[PairRow] = (), **fields: Any) -> StudyRow:
        """Store a new study made of ``fields`` and its pairs in one transaction (see :meth:`add_study`).

        ``fields`` are :class:`StudyRow`'s: ``name``, ``stronger_model``, ``weaker_model``, ``methods``,
        ``folder``, ``seed`` and optionally ``annotations``, ``state`` (default ``ready``), ``total``,
        ``kept``, ``skipped``.
        """
        return self.add_study(StudyRow(**fields), pairs)

    def add_study(self, study: StudyRow, pairs: Sequence[PairRow] = ()) -> StudyRow:
        """Store a copy of ``study`` under a fresh random id, with copies of ``pairs``, in one
        transaction (the caller's objects stay as they were); the stored study."""
        row = dataclasses.replace(study)
        row.id = secrets.token_urlsafe(9)
        with self._session() as session:
            session.add(row)
            session.flush()
            session.add_all(_pair_rows(row.id, pairs))
        return self.get_study(row.id)

    def add_pairs(self, study_id: str, pairs: Sequence[PairRow]) -> None:
        """Add pre-rendered pairs to a study."""
        with self._session() as session:
            self._study_row(session, study_id)
            session.add_all(_pair_rows(study_id, pairs))

    def start_rendering(self, study_id: str, total: int) -> None:
        """Mark a queued study as rendering ``total`` images."""
        self._update(study_id, state="rendering", done=0, total=total)

    def record_progress(self, study_id: str, done: int, total: int) -> None:
        """``done`` of ``total`` images looked at."""
        self._update(study_id, done=done, total=total)

    def finish(
        self, study_id: str, pairs: Sequence[PairRow], *, kept: int, skipped: Sequence[Skipped]
    ) -> StudyRow:
        """Store a rendered study's pairs and mark it ready, in one transaction."""
        with self._session() as session:
            row = self._study_row(session, study_id)
            session.add_all(_pair_rows(study_id, pairs))
            row.state, row.done, row.kept, row.skipped = "ready", row.total, kept, list(skipped)
        return self.get_study(study_id)

    def fail(self, study_id: str, error: str) -> None:
        """Mark a study as failed, with its one-line ``error``."""
        line = " ".join(error.split())
        self._update(study_id, state="failed", error=line[:1000] or "failed")

    def fail_unfinished(self, error: str) -> int:
        """Mark every queued or rendering study as failed (a service starting again: whoever rendered
        them is gone); how many there were."""
        with self._session() as session:
            result = session.execute(
                update(StudyRow).where(StudyRow.state.in_(UNFINISHED)).values(state="failed", error=error)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def _update(self, study_id: str, **values: Any) -> None:
        with self._session() as session:
            row = self._study_row(session, study_id)
            for name, value in values.items():
                setattr(row, name, value)

    def study(self, study_id: str) -> StudyRow | None:
        """The study with its counts, or None."""
        with self._session() as session:
            return session.get(StudyRow, study_id)

    def ready_study(self, study_id: str) -> StudyRow:
        """The study, when raters may use it; NotFound or NotReady otherwise."""
        with self._session() as session:
            return self._ready_row(session, study_id)

    def list_studies(self) -> list[StudyRow]:
        """Every study, newest first."""
        with self._session() as session:
            return list(session.scalars(select(StudyRow).order_by(StudyRow.created.desc(), StudyRow.id)))

    def get_study(self, study_id: str) -> StudyRow:
        """The study with its counts; NotFound when there is none."""
        found = self.study(study_id)
        if found is None:
            raise NotFound(f"study '{study_id}' not found")
        return found

    @staticmethod
    def _study_row(session: Session, study_id: str) -> StudyRow:
        row = session.get(StudyRow, study_id)
        if row is None:
            raise NotFound(f"study '{study_id}' not found")
        return row

    @staticmethod
    def _ready_row(session: Session, study_id: str) -> StudyRow:
        row = StudyStore._study_row(session, study_id)
        if row.state != "ready":
            raise NotReady(_why_not_ready(row))
        return row

    # ----------------------------------------------------------------------------------- raters

    def issue_rater(self, study_id: str) -> str:
        """A new rater id (a random token) for the study."""
        rater = secrets.token_urlsafe(16)
        with self._session() as session:
            self._ready_row(session, study_id)
            session.add(RaterRow(id=rater, study_id=study_id))
        return rater

    @staticmethod
    def _check_rater(session: Session, study_id: str, rater: str) -> None:
        StudyStore._ready_row(session, study_id)
        row = session.get(RaterRow, rater)
        if row is None or row.study_id != study_id:
            raise NotFound(f"rater '{rater}' not found in study '{study_id}'; ask for a new rater id")

    def progress(self, study_id: str, rater: str) -> Progress:
        """How many of the study's pairs the rater has rated, of how many."""
        with self._session() as session:
            self._check_rater(session, study_id, rater)
            total = session.scalar(select(func.count()).where(PairRow.study_id == study_id)) or 0
            rated = session.scalar(select(func.count()).where(RatingRow.rater_id == rater)) or 0
        return Progress(rated, total)

    def next_pair(self, study_id: str, rater: str) -> PairRow | None:
        """The next pair the rater has not rated (in the rater's own order), or None when all are rated.

        The same pair comes back until it is rated, so a reload shows the pair again, never a second one.
        """
        with self._session() as session:
            self._check_rater(session, study_id, rater)
            rated = select(RatingRow.pair_id).where(RatingRow.rater_id == rater)
            open_ids = session.scalars(
                select(PairRow.id).where(PairRow.study_id == study_id, PairRow.id.not_in(rated))
            ).all()
            if not open_ids:
                return None
            return session.get(PairRow, min(open_ids, key=lambda pair: presentation_key(rater, pair)))

    # ---------------------------------------------------------------------------------- ratings

    def record_rating(self, study_id: str, rater: str, pair: int, answer: int) -> Progress:
        """Store one answer (on :data:`~gradcam.study.scale.SCALE`); the rater's progress after it.

        Raises NotFound for an unknown study, rater or pair (or one of another study), NotReady for a
        study that is not ready, DuplicateRating when this rater has rated this pair already (the
        database's UNIQUE constraint decides, so two concurrent submissions store one row), StudyError
        for an answer off the scale.
        """
        if isinstance(answer, bool) or not isinstance(answer, int) or answer not in ANSWERS:
            raise StudyError(f"answer must be an integer from {LOWEST} to {HIGHEST}, got {answer!r}")
        try:
            with self._session() as session:
                self._check_rater(session, study_id, rater)
                row = session.get(PairRow, pair)
                if row is None or row.study_id != study_id:
                    raise NotFound(f"pair {pair} not found in study '{study_id}'")
                session.add(RatingRow(study_id=study_id, pair_id=pair, rater_id=rater, answer=answer))
        except IntegrityError:
            raise DuplicateRating(f"rater '{rater}' has already rated pair {pair}") from None
        return self.progress(study_id, rater)

    def ratings(self, study_id: str) -> list[Rating]:
        """Every rating of the study with its pair's data, in the order they were stored."""
        with self._session() as session:
            self._study_row(session, study_id)
            query = select(Rating).where(Rating.study == study_id).order_by(Rating.id)
            return list(session.scalars(query))

    def pair_methods(self, study_id: str) -> dict[str, int]:
        """Number of pairs per method."""
        query = (
            select(PairRow.method, func.count()).where(PairRow.study_id == study_id).group_by(PairRow.method)
        )
        with self._session() as session:
            return {method: n for method, n in session.execute(query)}


def _pair_rows(study_id: str, pairs: Sequence[PairRow]) -> list[PairRow]:
    """Fresh rows of ``pairs`` for ``study_id`` (copies: a pair given twice is stored twice)."""
    rows = []
    for pair in pairs:
        if pair.stronger_side not in SIDES:
            raise StudyError(f"stronger_side must be 'A' or 'B', got {pair.stronger_side!r}")
        row = dataclasses.replace(pair)
        row.study_id = study_id
        rows.append(row)
    return rows
