"""Issue 10 §4: clear words for storage faults.

A full disk (SQLite's max_page_count makes inserts fail with SQLITE_FULL for real) refuses a new
job with a message the member understands, logged once; a read-only database file or folder at
start-up stops ``python -m engine worker`` with one line naming the path and what to do.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import event

from db.errors import StorageFull
from db.faults import is_database_fault, is_storage_full
from db.queue import Queue
from db.session import make_engine, upgrade

ROOT = Path(__file__).resolve().parent.parent
FULL = "The bot's storage is full, so your job was not queued; the server's owner has been told."


def test_a_full_disk_refuses_jobs_clearly_and_is_logged_once(tmp_path: Path, caplog) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'q.sqlite3'}")
    upgrade(engine)
    queue = Queue(engine, pending_limit=100)
    queue.enqueue(requester_id=1, prompt="fits")
    with engine.connect() as connection:
        pages = connection.exec_driver_sql("PRAGMA page_count").scalar()
    limit = {"pages": pages}  # the disk is full: the file may not grow by a page

    @event.listens_for(engine, "connect")
    def _small_disk(dbapi_connection, record) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {limit['pages']}")

    engine.dispose()  # new connections, with the limit
    caplog.set_level(logging.WARNING, logger="db.queue.core")
    big = b"x" * 200_000  # needs pages the file does not have
    for _ in range(3):  # three members' commands
        with pytest.raises(StorageFull) as refused:
            queue.enqueue(requester_id=2, prompt="too big", init_image=big)
        assert str(refused.value) == FULL
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "storage is full" in errors[0].getMessage()

    limit["pages"] = 1_000_000  # room again
    engine.dispose()
    job = queue.enqueue(requester_id=2, prompt="fits now", init_image=big)
    assert queue.get(job.id).init_image == big
    assert len(queue.pending_for(2)) == 1  # the refused ones left nothing behind
    engine.dispose()


def test_postgresql_disk_full_is_storage_full_and_waited_out() -> None:
    disk_full = psycopg.errors.DiskFull("could not extend file: No space left on device")
    assert is_storage_full(disk_full) and is_database_fault(disk_full)
    assert not is_storage_full(psycopg.errors.UniqueViolation("duplicate key"))


# -- a read-only database at start-up ----------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder outside pytest's root-only tmp dir, so another user can reach it."""
    root = Path(tempfile.mkdtemp(prefix="sdbot-ro-"))
    root.chmod(0o755)
    yield root
    for path in (root, *root.rglob("*")):
        path.chmod(0o777)
    shutil.rmtree(root, ignore_errors=True)


def as_unprivileged(command: list[str]) -> list[str]:
    """Root may write anything: as root, run without capabilities (file modes then bind root too)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file read-only for the worker")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", *command]


@pytest.mark.slow
@pytest.mark.parametrize("read_only", ["file", "folder"])
def test_worker_says_in_one_line_that_the_database_is_read_only(shared_dir: Path, read_only: str) -> None:
    folder = shared_dir / "data"
    folder.mkdir()
    path = folder / "sdbot.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    if read_only == "file":
        folder.chmod(0o777)
        path.chmod(0o444)
        expected = f"error: the database file {path} is read-only; make it and its folder writable by this user"
    else:
        path.chmod(0o666)
        folder.chmod(0o555)
        expected = f"error: the database folder {folder} is read-only"
    config = shared_dir / "config.toml"
    config.write_text(f'[engine]\ndevice = "cpu"\n[queue]\ndatabase_url = "sqlite:///{path}"\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        as_unprivileged([sys.executable, "-m", "engine", "worker", "--config", str(config)]),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), done.stderr
    assert "Traceback" not in done.stderr and "(or set queue.database_url)" in errors[0]


@pytest.mark.slow
def test_the_bot_says_in_one_line_that_the_database_is_read_only(shared_dir: Path) -> None:
    folder = shared_dir / "data"
    folder.mkdir()
    path = folder / "sdbot.sqlite3"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    folder.chmod(0o777)
    path.chmod(0o444)
    config = shared_dir / "config.toml"
    config.write_text(f'[engine]\ndevice = "cpu"\n[queue]\ndatabase_url = "sqlite:///{path}"\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "DISCORD_TOKEN": "unused"}
    done = subprocess.run(
        as_unprivileged([sys.executable, "-m", "bot", "--no-engine", "--config", str(config)]),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: the database file {path} is read-only"), done.stderr
    assert "Traceback" not in done.stderr
