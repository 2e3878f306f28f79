"""Opening a study database: ``--db`` values as SQLAlchemy URLs, engines safe to share between threads.

A SQLite file by default (:data:`DEFAULT_DB_URL`), opened in WAL mode with a busy timeout so concurrent
raters wait for each other instead of failing; ``check_same_thread`` is off because the service runs
calls on a thread pool. Any other SQLAlchemy URL works as well; PostgreSQL through psycopg 3
(``postgresql+psycopg://user@host/db``, or ``postgresql+psycopg://user@/db?host=/run/postgresql`` for a
Unix socket) is tested (tests/test_study_postgres.py), the store's rules included: one rating per pair and
rater under concurrent submissions, the CHECK constraints, JSON columns. Pooled connections are checked
before use (``pool_pre_ping``): one the server dropped (a restart) is replaced instead of failing a call.

Every PostgreSQL session runs in UTC (``SET TIME ZONE 'UTC'`` on connect): timestamps are stored as
instants either way, but they are read back in the session's zone, and a server configured for another
one would otherwise give the CSV and the API local offsets instead of the UTC they promise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import StaticPool

from gradcam.study.errors import StudyError

#: The database ``gradcam study`` and ``gradcam serve`` use when no ``--db`` is given: a SQLite file in
#: the working directory.
DEFAULT_DB_URL = "sqlite:///gradcam-study.db"
#: Seconds a SQLite writer waits for another writer's lock before giving up.
BUSY_TIMEOUT_S = 30


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
        hint = ""
        if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "psycopg":
            hint = "; for psycopg 3 (pip install 'psycopg[binary]') write postgresql+psycopg://"
        raise StudyError(f"database URL '{shown}': its driver is not installed ({error}){hint}") from None
    except ArgumentError as error:
        raise StudyError(f"database URL '{shown}': {error}") from None
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas(memory))
    elif parsed.get_backend_name() == "postgresql":
        event.listen(engine, "connect", _utc_session)
    return engine


def _utc_session(connection: Any, _record: Any) -> None:  # a DBAPI connection
    cursor = connection.cursor()
    cursor.execute("SET TIME ZONE 'UTC'")
    cursor.close()
    connection.commit()  # a SET made in a transaction lasts for the session once it is committed


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
