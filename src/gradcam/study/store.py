"""Where studies, pre-rendered pairs, raters and ratings live: SQLAlchemy 2.x ORM over any database URL.

Databases are opened by :mod:`gradcam.study.database` (SQLite by default, any SQLAlchemy URL), the
rows are declared in :mod:`gradcam.study.rows`, the errors in :mod:`gradcam.study.errors`; their names are
importable from here too.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    Session,
    sessionmaker,
)

from gradcam.study.database import DEFAULT_DB_URL, database_url, make_engine, sqlite_file
from gradcam.study.errors import DuplicateRating, NotFound, NotReady, StudyError
from gradcam.study.rows import (
    SIDES,
    STATES,
    UNFINISHED,
    Base,
    PairRow,
    Progress,
    RaterRow,
    Rating,
    RatingRow,
    Skipped,
    StudyRow,
    StudyState,
)
from gradcam.study.scale import ANSWERS, HIGHEST, LOWEST

__all__ = [
    "DEFAULT_DB_URL",
    "SIDES",
    "STATES",
    "UNFINISHED",
    "DuplicateRating",
    "NotFound",
    "NotReady",
    "PairRow",
    "Progress",
    "RaterRow",
    "Rating",
    "RatingRow",
    "Skipped",
    "StudyError",
    "StudyRow",
    "StudyState",
    "StudyStore",
    "database_url",
    "make_engine",
    "presentation_key",
    "sqlite_file",
]


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
