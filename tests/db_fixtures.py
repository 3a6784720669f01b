"""Database fixtures: every queue test runs on SQLite (a temp file) and on PostgreSQL.

PostgreSQL is the local server (``SDBOT_TEST_PG_URL``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``); each test gets a fresh schema, dropped
afterwards. Where the server is unreachable the PostgreSQL cases are skipped, saying why,
except under CI (env ``CI`` set), where they fail instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, make_url

from db.queue import Queue
from db.session import make_engine, upgrade

PG_URL = os.environ.get("SDBOT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class FakeClock:
    """A clock the test moves by hand: leases expire without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _pg_conninfo() -> str:
    return make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)


def _pg_unreachable() -> str | None:
    try:
        psycopg.connect(_pg_conninfo(), connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"PostgreSQL at {PG_URL} is unreachable ({exc}); set SDBOT_TEST_PG_URL or start it"
    return None


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """Conninfo of the PostgreSQL test database; skips (fails under CI) when unreachable."""
    reason = _pg_unreachable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return _pg_conninfo()


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'sdbot.sqlite3'}"  # data/ does not exist yet


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL whose connections work in a fresh, empty schema of the test database."""
    admin = request.getfixturevalue("pg_admin_url")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield (
            make_url(PG_URL)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind."""
    if request.param == "sqlite":
        return _sqlite_url(tmp_path)
    return request.getfixturevalue("pg_url")


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    """A migrated database (alembic ``upgrade head``)."""
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(db_engine: Engine, clock: FakeClock) -> Iterator[Queue]:
    """A Queue with a hand-moved clock: pending limit 5, 3 attempts, 60 s leases."""
    q = Queue(db_engine, pending_limit=5, max_attempts=3, lease_seconds=60, clock=clock)
    yield q
    q.close()
