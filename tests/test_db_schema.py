"""The migrations build exactly the models' schema; SQLite gets the durable settings."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from db.models import Base
from db.session import make_engine, normalize_url, upgrade

REPO = Path(__file__).resolve().parents[1]


def test_migrations_match_models(db_engine: Engine) -> None:
    with db_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_upgrade_twice_is_harmless(db_engine: Engine) -> None:
    upgrade(db_engine)
    tables = set(inspect(db_engine).get_table_names())
    assert {"jobs", "result_images", "posted_messages", "members", "alembic_version"} <= tables


@pytest.mark.slow  # starts a Python process
def test_processes_starting_at_once_migrate_in_turn(db_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = "import sys; from db.session import upgrade; upgrade(sys.argv[1])"
    starts = [subprocess.Popen([sys.executable, "-c", script, db_url], env=env) for _ in range(3)]
    assert [p.wait(timeout=120) for p in starts] == [0, 0, 0]


def test_sqlite_file_is_durable_and_its_folder_made(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "data" / "sdbot.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("synchronous") == 2  # FULL
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") >= 1000
    engine.dispose()
    assert path.exists()


def test_sqlite_transactions_take_the_write_lock_up_front(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)  # another process, say
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM jobs").scalar()  # only a read, yet it locks
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        assert other.execute("SELECT count(*) FROM jobs").fetchone() == (0,)  # WAL: reads go on
        # A read-only transaction may ask for a deferred BEGIN: it does not wait for the writer.
        with engine.connect() as reader:
            reader = reader.execution_options(sqlite_begin="DEFERRED")
            with reader.begin():
                assert reader.exec_driver_sql("SELECT count(*) FROM jobs").scalar() == 0
    other.execute("BEGIN IMMEDIATE")  # free again after commit
    other.execute("ROLLBACK")
    other.close()
    engine.dispose()


def test_plain_postgresql_url_means_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


@pytest.mark.slow  # starts a Python process
def test_db_imports_neither_bot_nor_engine() -> None:
    script = (
        "import sys, db.queue, db.session, db.models, db.errors, db.community; "
        "top = {m.split('.')[0] for m in sys.modules}; "
        "print(sorted(top & {'bot', 'engine', 'torch', 'discord'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
