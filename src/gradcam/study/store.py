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
answers are CHECKed to lie on :data:`gradcam.study.scale.SCALE`. A call returns only after its
transaction is committed, so whatever the service acknowledges is stored; a database that cannot be
reached or written, or a SQLite file deleted or replaced under the server, is one
:class:`DatabaseUnavailable` (the service's 503), never a success.

**Raters** are invited (:meth:`StudyStore.invite`: one secret token per person, of which only the SHA-256
is stored; :mod:`gradcam.study.invitations`) or, in an open study, join by themselves, a limited number
per client address (:meth:`StudyStore.join`). Pair and rater ids are opaque random tokens
(:func:`gradcam.study.rows.new_id`): they tell nothing about a pair's method or a rater's order. A rater
may rate only the pair :meth:`StudyStore.next_pair` served them (:class:`NotServed` otherwise): no
answers to pairs never seen.

A study has a state: ``queued`` and ``rendering`` while a service renders it in the background (with
``done`` of ``total`` images), then ``ready`` or ``failed`` (with its one-line ``error``). Raters can
only use a ready study (:class:`NotReady` otherwise). The tables are created on first use; a database
made by an older version (a column missing) is refused in one line: give another ``--db``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, inspect, select, update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from gradcam.study.database import DEFAULT_DB_URL, database_url, make_engine, sqlite_file
from gradcam.study.errors import (
    DatabaseUnavailable,
    DuplicateRating,
    InviteOnly,
    NotARater,
    NotFound,
    NotReady,
    NotServed,
    StudyError,
    TooManyRaters,
)
from gradcam.study.invitations import MAX_INVITATIONS, Invitation, new_invitation, token_hash
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
    new_id,
)
from gradcam.study.scale import ANSWERS, HIGHEST, LOWEST

__all__ = [
    "DEFAULT_DB_URL",
    "MAX_INVITATIONS",
    "SIDES",
    "STATES",
    "UNFINISHED",
    "DatabaseUnavailable",
    "DuplicateRating",
    "Invitation",
    "InviteOnly",
    "NotARater",
    "NotFound",
    "NotReady",
    "NotServed",
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
    "TooManyRaters",
    "database_url",
    "make_engine",
    "presentation_key",
    "sqlite_file",
]


def presentation_key(rater: str, pair: str) -> str:
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
        with self._unavailable():
            self._create_tables()
            self._check_schema()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._file = sqlite_file(url)
        self._identity = self._file_identity()

    def _create_tables(self) -> None:
        """Create the missing tables. Replicas starting together on a new database may race to create
        the same table; the one that loses finds it made on its next look."""
        for attempt in range(3):
            try:
                Base.metadata.create_all(self.engine)
                return
            except (IntegrityError, ProgrammingError):
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _check_schema(self) -> None:
        """Refuse, in one line, a database an older version made (``create_all`` adds no columns)."""
        found = inspect(self.engine)
        for table in Base.metadata.sorted_tables:
            missing = {c.name for c in table.columns} - {c["name"] for c in found.get_columns(table.name)}
            if missing:
                shown = self.engine.url.render_as_string(hide_password=True)
                raise StudyError(
                    f"database '{shown}' was made by an older gradcam (table {table.name} has no "
                    f"{', '.join(sorted(missing))}); give another --db or move it aside"
                )

    def _file_identity(self) -> tuple[int, int] | None:
        if self._file is None:
            return None
        try:
            status = os.stat(self._file)
        except OSError:
            return None
        return status.st_dev, status.st_ino

    def _check_file(self) -> None:
        """A SQLite file must still be the one the connections write to: a connection to a file that
        was deleted (or replaced) keeps writing to the old inode, and what it commits is lost. Then the
        pool is dropped (the next call opens the path again) and this call fails instead of being
        acknowledged."""
        if self._file is None:
            return
        now = self._file_identity()
        if now is not None and now == self._identity:
            return
        self.engine.dispose()
        self._identity = now
        state = "was replaced" if now is not None else "is gone"
        raise DatabaseUnavailable(f"the study database is unavailable (its file {state}); try again later")

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """A database that cannot be reached or written (not an integrity rule) is one domain error; a
        value it cannot store (PostgreSQL refuses a NUL character, or a string over a column's length) is
        bad input, not an outage."""
        try:
            yield
        except IntegrityError:
            raise
        except DataError as error:
            cause = str(error.orig or error).strip().splitlines()
            raise StudyError(
                f"a value the study database cannot store ({cause[0] if cause else 'data error'})"
            ) from None
        except DBAPIError as error:
            cause = str(error.orig or error).strip().splitlines()
            raise DatabaseUnavailable(
                "the study database is unavailable; try again later",
                detail=cause[0] if cause else type(error).__name__,
            ) from None

    def health(self) -> None:
        """Reach the database (a read of the study table, the SQLite file's identity); raises
        :class:`DatabaseUnavailable` when it cannot."""
        with self._session() as session:
            session.scalar(select(func.count()).select_from(StudyRow))

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> StudyStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """One transaction, committed when the block ends; only then, with the file checked, does the
        caller return (a write is acknowledged only once it is durable)."""
        with self._unavailable():
            self._check_file()
            with self._sessions() as session, session.begin():
                yield session
            self._check_file()

    # ---------------------------------------------------------------------------------- studies

    def create_study(self, *, pairs: Sequence[PairRow] = (), **fields: Any) -> StudyRow:
        """Store a new study made of ``fields`` and its pairs in one transaction (see :meth:`add_study`).

        ``fields`` are :class:`StudyRow`'s: ``name``, ``stronger_model``, ``weaker_model``, ``methods``,
        ``folder``, ``seed`` and optionally ``annotations``, ``open`` (default False: by invitation only),
        ``state`` (default ``ready``), ``total``, ``kept``, ``skipped``.
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

    def invite(self, study_id: str, count: int = 1) -> list[Invitation]:
        """``count`` new raters of the study, one per person: their ids and secret tokens (the only time
        a token is seen). A study still rendering may invite; a failed one may not."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_INVITATIONS:
            raise StudyError(f"count must be an integer from 1 to {MAX_INVITATIONS}, got {count!r}")
        made = [new_invitation() for _ in range(count)]
        with self._session() as session:
            study = self._study_row(session, study_id)
            if study.state == "failed":
                raise NotReady(_why_not_ready(study))
            session.add_all(
                RaterRow(id=i.rater, study_id=study_id, token_hash=token_hash(i.token)) for i in made
            )
        return made

    def join(self, study_id: str, client: str, *, limit: int, window_s: int) -> Invitation:
        """A self-service rater of an open study, for ``client`` (its network address): at most ``limit``
        per client in ``window_s`` seconds (TooManyRaters, with when to retry); InviteOnly for a study
        that is not open. Joins of a study run one at a time (its row is locked first), also across
        replicas, so the limit holds under concurrency."""
        made = new_invitation()
        with self._session() as session:
            # A write first: the study's row lock (PostgreSQL) or the write lock (SQLite) serialises joins.
            session.execute(update(StudyRow).where(StudyRow.id == study_id).values(done=StudyRow.done))
            study = self._ready_row(session, study_id)
            if not study.open:
                raise InviteOnly(
                    f"study '{study_id}' takes raters by invitation only; open the link its owner sent you"
                )
            now = datetime.now(UTC)
            recent = session.scalars(
                select(RaterRow.created)
                .where(
                    RaterRow.study_id == study_id,
                    RaterRow.client == client,
                    RaterRow.created >= now - timedelta(seconds=window_s),
                )
                .order_by(RaterRow.created)
            ).all()
            if len(recent) >= limit:
                retry = max(1, math.ceil((recent[0] + timedelta(seconds=window_s) - now).total_seconds()))
                raise TooManyRaters(
                    f"this address has joined study '{study_id}' as {limit} raters in the last "
                    f"{window_s} s; try again in {retry} s",
                    retry_after=retry,
                )
            session.add(
                RaterRow(
                    id=made.rater,
                    study_id=study_id,
                    token_hash=token_hash(made.token),
                    invited=False,
                    client=client[:100],
                )
            )
        return made

    def rater_of(self, study_id: str, token: str) -> str:
        """The id of the study's rater whose token this is; NotARater otherwise (NotFound, NotReady for
        the study)."""
        with self._session() as session:
            self._ready_row(session, study_id)
            rater = session.scalar(
                select(RaterRow.id).where(
                    RaterRow.token_hash == token_hash(token), RaterRow.study_id == study_id
                )
            )
        if rater is None:
            raise NotARater(f"this rater link is not one of study '{study_id}'; open the link you were sent")
        return rater

    @staticmethod
    def _rater_row(session: Session, study_id: str, rater: str) -> RaterRow:
        StudyStore._ready_row(session, study_id)
        row = session.get(RaterRow, rater)
        if row is None or row.study_id != study_id:
            raise NotARater(f"rater '{rater}' not found in study '{study_id}'")
        return row

    def progress(self, study_id: str, rater: str) -> Progress:
        """How many of the study's pairs the rater has rated, of how many."""
        with self._session() as session:
            self._rater_row(session, study_id, rater)
            return self._progress(session, study_id, rater)

    @staticmethod
    def _progress(session: Session, study_id: str, rater: str) -> Progress:
        total = session.scalar(select(func.count()).where(PairRow.study_id == study_id)) or 0
        rated = session.scalar(select(func.count()).where(RatingRow.rater_id == rater)) or 0
        return Progress(rated, total)

    def next_pair(self, study_id: str, rater: str) -> PairRow | None:
        """The next pair the rater has not rated (in the rater's own order), or None when all are rated;
        it is recorded as served: the one pair the rater may rate next.

        The same pair comes back until it is rated, so a reload shows the pair again, never a second one.
        """
        with self._session() as session:
            row = self._rater_row(session, study_id, rater)
            rated = select(RatingRow.pair_id).where(RatingRow.rater_id == rater)
            open_ids = session.scalars(
                select(PairRow.id).where(PairRow.study_id == study_id, PairRow.id.not_in(rated))
            ).all()
            chosen = min(open_ids, key=lambda pair: presentation_key(rater, pair)) if open_ids else None
            if row.served != chosen:
                row.served = chosen
            return session.get(PairRow, chosen) if chosen is not None else None

    # ---------------------------------------------------------------------------------- ratings

    def record_rating(self, study_id: str, rater: str, pair: str, answer: int) -> Progress:
        """Store one answer (on :data:`~gradcam.study.scale.SCALE`) to the pair :meth:`next_pair` served
        the rater; the rater's progress after it, returned once the rating is committed.

        Raises NotFound for an unknown study, NotARater for a rater not of this study, NotReady for a
        study that is not ready, DuplicateRating when this rater has rated this pair already (the
        database's UNIQUE constraint decides, so two concurrent submissions store one row), NotServed for
        a pair not served to this rater, StudyError for an answer off the scale, DatabaseUnavailable
        when nothing can be stored.
        """
        if isinstance(answer, bool) or not isinstance(answer, int) or answer not in ANSWERS:
            raise StudyError(f"answer must be an integer from {LOWEST} to {HIGHEST}, got {answer!r}")
        duplicate = DuplicateRating(f"this rater has already rated pair '{pair}'")
        try:
            with self._session() as session:
                row = self._rater_row(session, study_id, rater)
                done = select(RatingRow.id).where(RatingRow.rater_id == rater, RatingRow.pair_id == pair)
                if session.scalar(done) is not None:
                    raise duplicate
                if row.served != pair:
                    raise NotServed(
                        f"pair '{pair}' is not the pair served to this rater; ask for the next pair first"
                    )
                session.add(RatingRow(study_id=study_id, pair_id=pair, rater_id=rater, answer=answer))
                row.served = None
                session.flush()
                return self._progress(session, study_id, rater)
        except IntegrityError:
            raise duplicate from None

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
        row.id, row.study_id = new_id(), study_id
        rows.append(row)
    return rows
