"""Engine set-up (SQLite pragmas, PostgreSQL driver) and schema migration.

SQLite: WAL so readers never block the writer, ``synchronous=FULL`` so a committed job survives a
power cut, a busy timeout so writers wait for each other instead of failing, foreign keys on, and
every transaction opened with ``BEGIN IMMEDIATE`` (the write lock up front, so two claimers
cannot both read the same queued job and then both take it). A transaction that only reads can
ask for a plain ``BEGIN`` with the execution option ``sqlite_begin="DEFERRED"``.
The BEGIN is emitted by us, as in SQLAlchemy's SQLite docs ("Using SQLAlchemy to emit BEGIN in
lieu of SQLite's transaction control"): pysqlite's own transaction handling is switched off.

Writers of one process also take turns on a lock of their own (:class:`_WriterTurns`) before
``BEGIN IMMEDIATE``. SQLite's busy handler makes a waiting writer sleep and poll (1, 2, 5 ... up to
100 ms between tries), so under many small writes a busy process spends its threads asleep while
the write lock stands free; a lock in the process hands the turn over the moment a commit ends.
The busy timeout still orders writers of different processes.

Start-up does not wait on another process's write lock: :func:`upgrade` reads the schema's
revision first and writes nothing when it is current, and :func:`check_writable` takes a lock
held elsewhere as the proof that the file can be written. PostgreSQL: a thread that serves
Discord's deadline (:func:`statement_timeout_in_this_thread`) gives every transaction a
``statement_timeout``, so a stalled server fails its statements instead of holding them.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL
from sqlalchemy.orm import sessionmaker

from db.errors import StorageError

DEFAULT_URL = "sqlite:///data/sdbot.sqlite3"
BUSY_TIMEOUT_MS = 30_000
MIGRATIONS = Path(__file__).with_name("migrations")
_TURNS: weakref.WeakKeyDictionary[Engine, _WriterTurns] = weakref.WeakKeyDictionary()
# pg_advisory_xact_lock key: two processes starting at once migrate one after the other.
_MIGRATION_LOCK = 0x5D_B0_7


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; plain ``postgresql://`` means psycopg 3, the driver we ship."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL = DEFAULT_URL, *, busy_timeout: float = BUSY_TIMEOUT_MS / 1000, **kwargs: Any) -> Engine:
    """An Engine for ``url`` (SQLite file or ``postgresql+psycopg://``), set up for the queue.

    ``busy_timeout``: seconds a SQLite writer waits for another's write lock before the statement
    fails with "database is locked" (which the queue runner waits out). PostgreSQL connections are
    pinged when taken from the pool, so a restarted server costs at most one failed call, and a
    connection attempt gives up after 10 s instead of hanging on an unreachable host.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, busy_timeout, **kwargs)
    kwargs.setdefault("pool_pre_ping", True)
    kwargs["connect_args"] = {"connect_timeout": 10, **kwargs.get("connect_args", {})}
    engine = create_engine(parsed, **kwargs)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        timeout = getattr(_this_thread, "statement_timeout", None)
        if timeout:
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")

    return engine


_this_thread = threading.local()


def statement_timeout_in_this_thread(seconds: float | None) -> None:
    """PostgreSQL: every transaction this thread begins from now on gives up a statement after
    ``seconds`` (None: no limit), with an error the caller reads as the database's fault. For
    threads that answer members within Discord's deadline (a ThreadPoolExecutor's initializer)."""
    _this_thread.statement_timeout = seconds


def _sqlite_engine(url: URL, busy_timeout: float, **kwargs: Any) -> Engine:
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        try:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(_unwritable(Path(url.database), error)) from None
    connect_args = {"timeout": busy_timeout, **kwargs.pop("connect_args", {})}
    engine = create_engine(url, connect_args=connect_args, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    turns = _TURNS[engine] = _WriterTurns(engine, busy_timeout)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        if mode == "DEFERRED":
            conn.exec_driver_sql("BEGIN DEFERRED")
            return
        turns.take(conn.connection)
        try:
            conn.exec_driver_sql(f"BEGIN {mode}")
        except BaseException:
            turns.give_back(conn.connection)
            raise

    return engine


def write_turn_taken(engine: Engine) -> bool:
    """Whether a writer of this process holds ``engine``'s write turn now (SQLite; for tests and
    diagnostics: after every transaction has ended it must be False)."""
    turns = _TURNS.get(engine)
    return turns is not None and turns.taken


class _WriterTurns:
    """One writing transaction at a time in this process, handed over when a commit or rollback
    has finished (not polled for, as SQLite's busy handler does).

    Taken at ``BEGIN IMMEDIATE``, given back after the dialect's commit or rollback of that DBAPI
    connection (the pool's rollback on return included). Waiting is bounded by the busy timeout;
    past it the writer goes on to SQLite's own locking, which reports a lock that is still held.
    """

    def __init__(self, engine: Engine, busy_timeout: float) -> None:
        self._lock = threading.Lock()
        self._busy_timeout = busy_timeout
        self._holder: Any = None
        dialect = engine.dialect
        commit, rollback = dialect.do_commit, dialect.do_rollback

        def do_commit(dbapi_connection: Any) -> None:
            try:
                commit(dbapi_connection)
            finally:
                self.give_back(dbapi_connection)

        def do_rollback(dbapi_connection: Any) -> None:
            try:
                rollback(dbapi_connection)
            finally:
                self.give_back(dbapi_connection)

        dialect.do_commit, dialect.do_rollback = do_commit, do_rollback  # this engine's dialect only
        # A connection that leaves the pool's hands in any other way ends its turn too.
        for name in ("checkin", "close", "close_detached", "invalidate", "soft_invalidate"):
            event.listen(engine, name, self._on_pool_event)

    def _on_pool_event(self, dbapi_connection: Any, *args: Any) -> None:
        self.give_back(dbapi_connection)

    @property
    def taken(self) -> bool:
        return self._lock.locked()

    def take(self, connection: Any) -> None:
        if self._lock.acquire(timeout=self._busy_timeout):
            self._holder = _raw(connection)

    def give_back(self, connection: Any) -> None:
        if self._holder is not None and self._holder is _raw(connection):
            self._holder = None
            self._lock.release()


def session_makers(engine: Engine) -> tuple[sessionmaker, sessionmaker]:
    """``(write, read)`` session factories over ``engine``, returning detached snapshots
    (``expire_on_commit=False``), safe to read in any thread. Reads need no write lock: on SQLite
    (WAL) a deferred BEGIN reads a snapshot."""
    write = sessionmaker(engine, expire_on_commit=False)
    read = sessionmaker(engine.execution_options(sqlite_begin="DEFERRED"), expire_on_commit=False)
    return write, read


def check_writable(engine: Engine) -> None:
    """Raise :class:`StorageError` when a SQLite database cannot be written (read-only file or
    folder), with one line naming the path and what to do; nothing for PostgreSQL, whose faults
    are waited out. One short write transaction that changes nothing."""
    path = _sqlite_file(engine)
    if path is None:
        return
    try:
        raw = engine.raw_connection()
    except (sa_exc.OperationalError, sqlite3.OperationalError) as error:  # raw from our connect hook
        raise _storage_error(path, getattr(error, "orig", None) or error) from None
    try:
        connection = raw.driver_connection
        # No wait: a write lock held by another process (a backup, a VACUUM) proves the file is
        # writable, and start-up must not wait for it.
        busy_timeout = connection.execute("PRAGMA busy_timeout").fetchone()[0]
        connection.execute("PRAGMA busy_timeout = 0")
        try:
            connection.execute("BEGIN IMMEDIATE")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            connection.execute(f"PRAGMA user_version = {int(version)}")  # a write, same value
            connection.execute("COMMIT")
        except sqlite3.OperationalError as error:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if "locked" in str(error).lower() or "busy" in str(error).lower():
                return
            raise _storage_error(path, error) from None
        finally:
            connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout)}")
    finally:
        raw.close()


def _storage_error(path: Path, error: BaseException) -> BaseException:
    message = str(error).lower()
    if any(word in message for word in ("readonly", "read-only", "unable to open", "disk i/o")):
        return StorageError(_unwritable(path, error))
    return error


def _sqlite_file(engine: Engine) -> Path | None:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).absolute()


def _unwritable(path: Path, error: BaseException) -> str:
    """What to tell the operator: which of the file and its folder is read-only, and the fix."""
    advice = "make it and its folder writable by this user (or set queue.database_url)"
    if path.exists() and not os.access(path, os.W_OK):
        return f"the database file {path} is read-only; {advice}"
    if not os.access(path.parent if path.parent.exists() else path.parent.parent, os.W_OK):
        return (
            f"the database folder {path.parent} is read-only; make it writable by this user, as SQLite "
            f"writes its journal next to {path.name} (or set queue.database_url)"
        )
    return f"the database file {path} cannot be written ({error}); {advice}"


def upgrade(engine_or_url: Engine | str | URL, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` (alembic ``upgrade head``), creating it if empty.

    Raises :class:`StorageError` (one line, for the operator) when a SQLite file cannot be written.
    """
    from alembic import command  # imported here: only start-up and tests migrate
    from alembic.config import Config

    engine = engine_or_url if isinstance(engine_or_url, Engine) else make_engine(engine_or_url)
    check_writable(engine)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if revision == "head" and _at_head(engine, config):  # nothing to write: no wait for a write lock
        if engine is not engine_or_url:
            engine.dispose()
        return
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    if engine is not engine_or_url:
        engine.dispose()


def _at_head(engine: Engine, config: Any) -> bool:
    """Whether the schema is at the newest revision already (a read)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.execution_options(sqlite_begin="DEFERRED").connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    return current == set(ScriptDirectory.from_config(config).get_heads())


def _raw(connection: Any) -> Any:
    """The DBAPI connection itself, from it or from the pool's proxy of it."""
    return getattr(connection, "dbapi_connection", connection)
