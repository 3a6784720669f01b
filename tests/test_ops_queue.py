"""Queue depth and database reachability for /metrics, read from a real database.

Each test runs on SQLite and on PostgreSQL (see db_fixtures), with jobs put in through the
queue itself.
"""

from __future__ import annotations

import threading

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, insert
from sqlalchemy.exc import OperationalError

from db.models import Member
from db.queue import Queue
from db.session import make_engine
from ops import Metrics, OpsServer, OpsSettings, database_reachable, queue_counts

ALICE, BOB = 101, 202


def test_counts_by_status(queue: Queue, db_engine: Engine) -> None:
    assert queue_counts(db_engine) == {}
    for member in (ALICE, ALICE, BOB):
        queue.enqueue(requester_id=member, prompt="a lighthouse")
    claimed = queue.claim("w1")
    cancelled = queue.enqueue(requester_id=BOB, prompt="a harbour")
    queue.cancel(cancelled.id, BOB)
    assert queue_counts(db_engine) == {"queued": 2, "running": 1, "cancelled": 1}
    queue.complete(claimed.id, "w1", [(b"png", 1)])
    assert queue_counts(db_engine) == {"queued": 2, "done": 1, "cancelled": 1}


@pytest.mark.asyncio
async def test_queue_depth_and_database_up_over_http(queue: Queue, db_engine: Engine) -> None:
    for member in (ALICE, BOB, BOB):
        queue.enqueue(requester_id=member, prompt="a lighthouse")
    queue.claim("w1")
    metrics = Metrics(queue_counts=lambda: queue_counts(db_engine), database_up=lambda: database_reachable(db_engine))
    async with (
        OpsServer(OpsSettings(enabled=True, port=0), metrics=metrics) as server,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{server.url}/metrics") as response:
            text = await response.text()
    samples = {
        (s.name, s.labels.get("status")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("sdbot_queue_jobs", "queued")] == 2
    assert samples[("sdbot_queue_jobs", "running")] == 1
    assert samples[("sdbot_queue_jobs", "done")] == 0
    assert samples[("sdbot_database_up", None)] == 1


def test_a_database_that_does_not_answer_is_unreachable(db_engine: Engine) -> None:
    assert database_reachable(db_engine)
    if db_engine.dialect.name == "sqlite":
        gone = make_engine("sqlite:///file:/nonexistent-dir/sdbot.sqlite3?mode=ro&uri=true")
    else:
        gone = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test")  # nothing listens on port 1
    try:
        assert not database_reachable(gone)
        with pytest.raises(OperationalError):
            queue_counts(gone)
    finally:
        gone.dispose()


def test_counting_does_not_wait_for_a_writer(db_engine: Engine) -> None:
    """A scrape reads beside a write in progress (SQLite: a BEGIN DEFERRED reader, not a writer
    in line for the write lock), so a long write never holds up /metrics."""
    with db_engine.connect() as writer:
        writer.execute(insert(Member).values(user_id=ALICE))  # the write lock, held
        result: dict = {}
        reader = threading.Thread(target=lambda: result.update(counts=queue_counts(db_engine)), daemon=True)
        reader.start()
        reader.join(120)
        assert result == {"counts": {}}
        writer.rollback()
