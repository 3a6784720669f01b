"""Shared pieces of the engine tests: a migrated SQLite queue, running the queue runner until
jobs are done, and denoising jobs one by one for batch-equivalence checks.

(Not a test module: engine tests import it, as the bot tests import bot_harness.)
"""

from __future__ import annotations

import asyncio

import pytest

from db.queue import Queue
from db.session import make_engine, upgrade
from engine.batching.batch import Batch
from engine.serving.runner import QueueRunner


@pytest.fixture
def sqlite_queue(tmp_path):
    """A migrated SQLite queue in a temporary file (pending limit 10)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'q.sqlite3'}")
    upgrade(engine)
    queue = Queue(engine, pending_limit=10)
    yield queue
    queue.close()
    engine.dispose()


async def run_until(runner: QueueRunner, queue: Queue, job_ids: list[int], timeout: float = 120) -> None:
    """Run the runner until every job in ``job_ids`` has finished."""
    task = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(timeout):
            # Finished in the database, and the runner done with them (on_finished called).
            while not all(queue.get(i).status.finished for i in job_ids) or runner.running:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def denoise_alone(pipeline, requests) -> dict:
    """Each request denoised in a batch of its own: job id -> final latents."""
    alone = {}
    for request in requests:
        batch = Batch(pipeline.denoiser)
        job = pipeline.prepare(request)
        batch.add(job)
        while not batch.entries[0].done:
            batch.step()
        alone[request.job_id] = batch.remove(job)
    return alone
