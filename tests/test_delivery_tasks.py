"""Delivery's background tasks are held until they end (asyncio keeps tasks only weakly), and
a failing one is logged with its traceback."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref
from datetime import UTC, datetime

import pytest

from bot.delivery import Delivery
from bot.delivery.tasks import BackgroundTasks
from db.community import Community
from db.queue import Queue
from db.session import make_engine, upgrade
from db.state import StateStore
from engine.types import Progress

pytestmark = pytest.mark.asyncio


class GatedQueue(Queue):
    """A real queue whose ``get`` waits until the test opens the gate (a slow database)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def get(self, job_id: int):
        assert self.gate.wait(120), "the test never opened the gate"
        return super().get(job_id)


@pytest.fixture
def queue(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/q.sqlite3")
    upgrade(engine)
    queue = GatedQueue(engine, pending_limit=3)
    yield queue
    queue.gate.set()  # a failed test must not leave a thread waiting
    engine.dispose()


async def test_an_adopt_task_is_held_until_it_ends(queue):
    job = queue.enqueue(
        prompt="a cat", seed=1, requester_id=7, guild_id=1, channel_id=2, status_message_id=3, status_channel_id=2
    )
    delivery = Delivery(
        None,
        queue,
        interval=0.1,
        model_name="tiny",
        clock=lambda: datetime.now(UTC),
        community=Community(queue.engine),
        state=StateStore(queue.engine),
    )
    delivery.on_progress(job.id, Progress(job.id, 1, 2))  # a job this process did not queue
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == f"adopt-{job.id}"]
    assert task in delivery.tasks  # referenced by delivery, not only by asyncio's weak set
    ref = weakref.ref(task)
    del task
    gc.collect()
    assert ref() is not None and not ref().done()
    queue.gate.set()
    for _ in range(1200):  # up to 120 s on a loaded machine
        if ref() is None or ref().done():
            break
        await asyncio.sleep(0.1)
    assert len(delivery.tasks) == 0  # let go once it ended
    delivery.on_progress(job.id, Progress(job.id, 2, 2))  # adopted: followed, no second adopt task
    assert not [t for t in asyncio.all_tasks() if t.get_name() == f"adopt-{job.id}"]


async def test_a_task_nobody_else_holds_survives_a_collection_and_a_failure_is_logged(caplog):
    tasks = BackgroundTasks()
    loop = asyncio.get_running_loop()
    waiting: weakref.WeakSet[asyncio.Future] = weakref.WeakSet()

    async def wait_on_a_future_only_this_task_holds() -> str:
        future = loop.create_future()
        waiting.add(future)
        return await future

    task_ref = weakref.ref(tasks.start(wait_on_a_future_only_this_task_holds(), name="lonely"))
    await asyncio.sleep(0)  # the task runs up to its await
    gc.collect()
    assert task_ref() is not None  # a bare asyncio.create_task would have been collected here
    (future,) = waiting
    future.set_result("done")
    assert await task_ref() == "done"
    assert len(tasks) == 0

    async def fail() -> None:
        raise RuntimeError("boom")

    caplog.set_level(logging.ERROR, logger="bot.delivery.tasks")
    failing = tasks.start(fail(), name="failing")
    with pytest.raises(RuntimeError):
        await failing
    await asyncio.sleep(0)  # done-callbacks run on the next loop turn
    (record,) = [r for r in caplog.records if r.name == "bot.delivery.tasks"]
    assert "failing failed" in record.getMessage() and record.exc_info[1].args == ("boom",)
    assert len(tasks) == 0
