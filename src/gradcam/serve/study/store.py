"""Where studies, pre-rendered pairs, raters and ratings live: SQLAlchemy 2.x ORM over any database URL.

A SQLite file by default (:data:`DEFAULT_DB_URL`), opened in WAL mode with a busy timeout so concurrent
raters wait for each other instead of failing; ``check_same_thread`` is off because FastAPI runs sync
handlers on a thread pool (each call here opens its own short session, so no connection is shared by two
threads at once). Any other SQLAlchemy URL works as well (``postgresql+psycopg://user@host/db``).

Integrity is the database's job, not the application's: a rating is UNIQUE per (pair, rater), so two
concurrent submissions of one answer store exactly one row and the other gets :class:`DuplicateRating`;
answers are CHECKed to lie in -2..2.

Every method returns plain dataclasses (never live ORM objects), so callers cannot trigger lazy loads on a
closed session. The PNG blobs are only read by :meth:`StudyStore.next_pair`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import Subquery

from gradcam.errors import GradCAMError

#: The database ``gradcam study`` and ``gradcam serve`` use when no ``--db`` is given: a SQLite file in
#: the working directory.
DEFAULT_DB_URL = "sqlite:///gradcam-study.db"
#: Seconds a SQLite writer waits for another writer's lock before giving up.
BUSY_TIMEOUT_S = 30
#: The answers of the five-point scale.
ANSWERS = (2, 1, 0, -1, -2)
SIDES = ("A", "B")


class StudyError(GradCAMError):
    """A study call that cannot be done (the message says why, in one line)."""


class NotFound(StudyError):
    """An unknown study, rater or pair (or one of another study)."""


class DuplicateRating(StudyError):
    """The rater has already rated this pair."""


# --------------------------------------------------------------------------------------------- ORM


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


class StudyRow(Base):
    __tablename__ = "study"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    stronger_model: Mapped[str] = mapped_column(String(100))
    weaker_model: Mapped[str] = mapped_column(String(100))
    methods: Mapped[list[str]] = mapped_column(JSON)
    folder: Mapped[str] = mapped_column(String(1000))
    annotations: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    seed: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class PairRow(Base):
    __tablename__ = "study_pair"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    image: Mapped[str] = mapped_column(String(1000))
    class_index: Mapped[int] = mapped_column(Integer)
    class_name: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(100))
    stronger_side: Mapped[str] = mapped_column(String(1))
    robot_a: Mapped[bytes] = mapped_column(LargeBinary)
    robot_b: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (CheckConstraint("stronger_side IN ('A', 'B')", name="pair_side"),)


class RaterRow(Base):
    __tablename__ = "study_rater"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class RatingRow(Base):
    __tablename__ = "study_rating"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("study_pair.id", ondelete="CASCADE"))
    rater_id: Mapped[str] = mapped_column(ForeignKey("study_rater.id", ondelete="CASCADE"))
    answer: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)

    __table_args__ = (
        UniqueConstraint("pair_id", "rater_id", name="one_rating_per_pair_and_rater"),
        CheckConstraint("answer BETWEEN -2 AND 2", name="rating_answer"),
    )


# ------------------------------------------------------------------------------------- plain records


@dataclass(frozen=True)
class NewPair:
    """A pre-rendered pair to store: the stronger model's picture is ``robot_a`` when ``stronger_side`` is
    "A", else ``robot_b``."""

    image: str
    class_index: int
    class_name: str
    method: str
    stronger_side: str
    robot_a: bytes
    robot_b: bytes


@dataclass(frozen=True)
class Study:
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


@dataclass(frozen=True)
class Pair(NewPair):
    """One stored pair as shown to a rater (the blobs are PNG bytes)."""

    id: int = 0


@dataclass(frozen=True)
class Progress:
    rated: int
    total: int

    @property
    def remaining(self) -> int:
        return self.total - self.rated


@dataclass(frozen=True)
class Rating:
    """One stored rating with what is needed to score it (no pictures)."""

    study: str
    pair: int
    image: str
    class_index: int
    class_name: str
    method: str
    stronger_side: str
    rater: str
    answer: int
    created: datetime

    @property
    def score(self) -> int:
        """The answer from the stronger model's side: +2 means "the stronger model is clearly more
        reliable", whichever robot it was shown as."""
        return self.answer if self.stronger_side == "A" else -self.answer


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no time zone: what was written is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


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


class StudyStore:
    """Studies, pairs, raters and ratings in one database (created on first use)."""

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

    def create_study(
        self,
        *,
        name: str,
        stronger_model: str,
        weaker_model: str,
        methods: Sequence[str],
        folder: str,
        seed: int,
        pairs: Sequence[NewPair] = (),
        annotations: str | None = None,
    ) -> Study:
        """Store a new study and its pairs in one transaction; the id is a fresh random token."""
        study_id = secrets.token_urlsafe(9)
        with self._session() as session:
            session.add(
                StudyRow(
                    id=study_id,
                    name=name,
                    stronger_model=stronger_model,
                    weaker_model=weaker_model,
                    methods=list(methods),
                    folder=folder,
                    annotations=annotations,
                    seed=seed,
                )
            )
            session.flush()
            session.add_all(_pair_rows(study_id, pairs))
        found = self.study(study_id)
        assert found is not None
        return found

    def add_pairs(self, study_id: str, pairs: Sequence[NewPair]) -> None:
        """Add pre-rendered pairs to a study."""
        with self._session() as session:
            self._study_row(session, study_id)
            session.add_all(_pair_rows(study_id, pairs))

    def study(self, study_id: str) -> Study | None:
        """The study with counts, or None."""
        found = self._summaries(study_id)
        return found[0] if found else None

    def list_studies(self) -> list[Study]:
        """Every study, newest first."""
        return self._summaries(None)

    def _summaries(self, study_id: str | None) -> list[Study]:
        def counts(table: type[PairRow] | type[RaterRow] | type[RatingRow]) -> Subquery:
            query = select(table.study_id, func.count().label("n")).group_by(table.study_id)
            return (query if study_id is None else query.where(table.study_id == study_id)).subquery()

        pairs, raters, ratings = counts(PairRow), counts(RaterRow), counts(RatingRow)
        query = (
            select(StudyRow, pairs.c.n, raters.c.n, ratings.c.n)
            .outerjoin(pairs, pairs.c.study_id == StudyRow.id)
            .outerjoin(raters, raters.c.study_id == StudyRow.id)
            .outerjoin(ratings, ratings.c.study_id == StudyRow.id)
            .order_by(StudyRow.created.desc(), StudyRow.id)
        )
        if study_id is not None:
            query = query.where(StudyRow.id == study_id)
        with self._session() as session:
            return [
                Study(
                    id=row.id,
                    name=row.name,
                    stronger_model=row.stronger_model,
                    weaker_model=row.weaker_model,
                    methods=list(row.methods),
                    folder=row.folder,
                    annotations=row.annotations,
                    seed=row.seed,
                    created=_utc(row.created),
                    pairs=n_pairs or 0,
                    raters=n_raters or 0,
                    ratings=n_ratings or 0,
                )
                for row, n_pairs, n_raters, n_ratings in session.execute(query)
            ]

    @staticmethod
    def _study_row(session: Session, study_id: str) -> StudyRow:
        row = session.get(StudyRow, study_id)
        if row is None:
            raise NotFound(f"study '{study_id}' not found")
        return row

    # ----------------------------------------------------------------------------------- raters

    def issue_rater(self, study_id: str) -> str:
        """A new rater id (a random token) for the study."""
        rater = secrets.token_urlsafe(16)
        with self._session() as session:
            self._study_row(session, study_id)
            session.add(RaterRow(id=rater, study_id=study_id))
        return rater

    @staticmethod
    def _check_rater(session: Session, study_id: str, rater: str) -> None:
        StudyStore._study_row(session, study_id)
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

    def next_pair(self, study_id: str, rater: str) -> Pair | None:
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
            chosen = min(open_ids, key=lambda pair: presentation_key(rater, pair))
            row = session.get(PairRow, chosen)
            assert row is not None
            return Pair(
                row.image,
                row.class_index,
                row.class_name,
                row.method,
                row.stronger_side,
                row.robot_a,
                row.robot_b,
                id=row.id,
            )

    # ---------------------------------------------------------------------------------- ratings

    def record_rating(self, study_id: str, rater: str, pair: int, answer: int) -> Progress:
        """Store one answer (-2..2); the rater's progress after it.

        Raises NotFound for an unknown study, rater or pair (or one of another study), DuplicateRating
        when this rater has rated this pair already (the database's UNIQUE constraint decides, so two
        concurrent submissions store one row), StudyError for an answer off the scale.
        """
        if isinstance(answer, bool) or not isinstance(answer, int) or answer not in ANSWERS:
            raise StudyError(f"answer must be an integer from -2 to 2, got {answer!r}")
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
        query = (
            select(
                RatingRow,
                PairRow.image,
                PairRow.class_index,
                PairRow.class_name,
                PairRow.method,
                PairRow.stronger_side,
            )
            .join(PairRow, PairRow.id == RatingRow.pair_id)
            .where(RatingRow.study_id == study_id)
            .order_by(RatingRow.id)
        )
        with self._session() as session:
            self._study_row(session, study_id)
            return [
                Rating(
                    study_id,
                    r.pair_id,
                    image,
                    index,
                    name,
                    method,
                    side,
                    r.rater_id,
                    r.answer,
                    _utc(r.created),
                )
                for r, image, index, name, method, side in session.execute(query)
            ]

    def pair_methods(self, study_id: str) -> dict[str, int]:
        """Number of pairs per method."""
        query = (
            select(PairRow.method, func.count()).where(PairRow.study_id == study_id).group_by(PairRow.method)
        )
        with self._session() as session:
            return {method: n for method, n in session.execute(query)}


def _pair_rows(study_id: str, pairs: Sequence[NewPair]) -> list[PairRow]:
    rows = []
    for pair in pairs:
        if pair.stronger_side not in SIDES:
            raise StudyError(f"stronger_side must be 'A' or 'B', got {pair.stronger_side!r}")
        rows.append(
            PairRow(
                study_id=study_id,
                image=pair.image,
                class_index=pair.class_index,
                class_name=pair.class_name,
                method=pair.method,
                stronger_side=pair.stronger_side,
                robot_a=pair.robot_a,
                robot_b=pair.robot_b,
            )
        )
    return rows
