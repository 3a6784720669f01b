"""Issue 10 §2, §3: the queue runner and ``python -m engine worker`` ride out database faults.

A PostgreSQL server of the test's own (tests/pg_cluster.py) is stopped under a running runner and
started again; a SQLite write lock is held past the busy timeout. In each case jobs enqueued
before, during (a submitter that retries until the database is back) and after all end done
exactly once, the runner or worker process is still running, and the log says once that the
database went away and once that it is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from db.faults import DatabaseHealth, until_reachable
from db.models import JobStatus
from db.queue import Queue
from db.session import make_engine, upgrade
from engine.errors import JobCancelled
from engine.serving.runner import QueueRunner
from engine.types import GeneratedImage, GenerationRequest, GenerationResult, Progress
from pg_cluster import PgCluster, pg_cluster  # noqa: F401 - pg_cluster is a fixture

ROOT = Path(__file__).resolve().parent.parent
JOB = dict(prompt="a lighthouse", guidance=5.0, width=64, height=64, sampler="euler", channel_id=1)
BUDGET = 120.0  # seconds any one condition may take on a slow, shared machine


class StepEngine:
    """Stands in for EngineWorker: a job takes ``steps`` short steps on the event loop, with a
    Progress after each, and makes one image per ``count``; ``made`` counts what it finished."""

    def __init__(self, step_seconds: float = 0.02) -> None:
        self.step_seconds = step_seconds
        self.made: Counter[int] = Counter()
        self._cancelled: set[int] = set()

    async def generate(self, request: GenerationRequest, on_progress=None) -> GenerationResult:
        for step in range(1, request.params.steps + 1):
            await asyncio.sleep(self.step_seconds)
            if request.job_id in self._cancelled:
                raise JobCancelled()
            if on_progress is not None:
                on_progress(Progress(request.job_id, step, request.params.steps))
        self.made[request.job_id] += 1
        images = [
            GeneratedImage(png=f"png {request.job_id}/{i}".encode(), seed=request.params.seed + i)
            for i in range(request.params.count)
        ]
        return GenerationResult(request.job_id, images, "")

    def cancel(self, job_id: int) -> None:
        self._cancelled.add(job_id)

    def loaded_models(self) -> list[str]:
        return []


async def until(condition, what: str, timeout: float = BUDGET) -> None:
    """Wait (without blocking the loop) until ``condition()`` holds; fail saying what did not happen."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def submit_when_back(queue: Queue, member: int, results: list[int]) -> threading.Thread:
    """Enqueue a job from another thread, retrying until the database answers (as a member would)."""
    thread = threading.Thread(
        target=lambda: results.append(
            until_reachable(
                lambda: queue.enqueue(requester_id=member, seed=member, steps=3, **JOB).id, DatabaseHealth()
            )
        )
    )
    thread.start()
    return thread


def assert_done_once(queue: Queue, job_ids: list[int]) -> None:
    for job_id in job_ids:
        job = queue.get(job_id)
        assert job.status is JobStatus.done, (job_id, job.status, job.error)
        assert [image.index for image in queue.images(job_id)] == [0], job_id  # stored once, not twice


def outage_lines(records: list[logging.LogRecord]) -> tuple[int, int]:
    messages = [r.getMessage() for r in records if r.name == "engine.serving.runner"]
    return (
        sum(m.startswith("database unreachable") for m in messages),
        sum(m == "database reachable again" for m in messages),
    )


def test_runner_rides_out_a_postgresql_restart(pg_cluster: PgCluster, caplog) -> None:
    caplog.set_level(logging.WARNING)
    db = make_engine(pg_cluster.url)
    upgrade(db)
    # Leases shorter than the outage: the runner must keep its own running jobs all the same.
    queue = Queue(db, pending_limit=100, lease_seconds=2)
    engine = StepEngine()
    runner = QueueRunner(
        queue, engine, worker_id="w1", max_in_flight=2, poll_interval=0.2, heartbeat_interval=0.5, listen=True
    )
    before = [queue.enqueue(requester_id=m, seed=m, steps=250, **JOB).id for m in (1, 2, 3, 4)]

    async def scenario() -> list[int]:
        task = asyncio.create_task(runner.run())
        try:
            await until(lambda: any(queue.get(j).engine_started_at for j in before), "a job to start")
            made_before_outage = sum(engine.made.values())
            await asyncio.to_thread(pg_cluster.stop)
            await until(lambda: not runner.database_reachable, "the runner to notice the outage")
            during: list[int] = []
            submitter = submit_when_back(queue, 5, during)
            # A result finished while the database is away waits to be stored.
            await until(lambda: sum(engine.made.values()) > made_before_outage, "a job to finish in the outage")
            assert not task.done()
            await asyncio.to_thread(pg_cluster.start)
            await asyncio.to_thread(submitter.join, BUDGET)
            after = [queue.enqueue(requester_id=6, seed=6, steps=3, **JOB).id]
            everything = before + during + after
            await until(
                lambda: all(queue.get(j).status.finished for j in everything) and not runner.running,
                "every job to finish after the restart",
            )
            assert not task.done() and runner.database_reachable
            return everything
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    everything = asyncio.run(scenario())
    assert len(everything) == 6
    assert_done_once(queue, everything)
    assert outage_lines(caplog.records) == (1, 1)
    assert runner.stats.jobs_done == 6 and runner.stats.images_done == 6
    queue.close()
    db.dispose()


def test_runner_waits_out_a_sqlite_write_lock_held_past_the_busy_timeout(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    path = tmp_path / "queue.sqlite3"
    db = make_engine(f"sqlite:///{path}", busy_timeout=0.2)
    upgrade(db)
    queue = Queue(db, pending_limit=100)
    first = queue.enqueue(requester_id=1, seed=1, steps=3, **JOB).id
    runner = QueueRunner(queue, StepEngine(), worker_id="w1", poll_interval=0.1)
    other = sqlite3.connect(path, isolation_level=None)  # another process's writer, in effect

    async def scenario() -> list[int]:
        task = asyncio.create_task(runner.run())
        try:
            await until(lambda: queue.get(first).status is JobStatus.done, "the first job")
            other.execute("BEGIN IMMEDIATE")  # held far past the 0.2 s busy timeout
            await until(lambda: not runner.database_reachable, "the runner's claim to meet the lock")
            assert not task.done()
            other.execute("COMMIT")
            later = queue.enqueue(requester_id=2, seed=2, steps=3, **JOB).id
            await until(lambda: queue.get(later).status is JobStatus.done, "the job after the lock")
            assert not task.done() and runner.database_reachable
            return [first, later]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    jobs = asyncio.run(scenario())
    other.close()
    assert_done_once(queue, jobs)
    assert outage_lines(caplog.records) == (1, 1)
    assert any("database is locked" in r.getMessage() for r in caplog.records if r.name == "engine.serving.runner")
    queue.close()
    db.dispose()


class FlakyQueue(Queue):
    """A real queue whose first claims and heartbeats fail with a bug (not a database fault)."""

    failures = 2

    def claim(self, *args, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("a bug in claim")
        return super().claim(*args, **kwargs)

    def heartbeat(self, job_id: int, worker_id: str) -> bool:
        if self.failures > -2:
            self.failures -= 1
            raise RuntimeError("a bug in heartbeat")
        return super().heartbeat(job_id, worker_id)


def test_the_runner_survives_exceptions_that_are_not_the_databases(tmp_path: Path, caplog) -> None:
    db = make_engine(f"sqlite:///{tmp_path / 'queue.sqlite3'}")
    upgrade(db)
    queue = FlakyQueue(db, pending_limit=100)
    job = queue.enqueue(requester_id=1, seed=1, steps=100, **JOB).id
    runner = QueueRunner(queue, StepEngine(), worker_id="w1", poll_interval=0.1, heartbeat_interval=0.05)

    async def scenario() -> None:
        task = asyncio.create_task(runner.run())
        try:
            await until(lambda: queue.get(job).status.finished, "the job, after the failed claims")
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert_done_once(queue, [job])
    logged = [r for r in caplog.records if r.name == "engine.serving.runner" and r.exc_info]
    assert {str(r.exc_info[1]) for r in logged} == {"a bug in claim", "a bug in heartbeat"}
    db.dispose()


# -- a real worker process ------------------------------------------------------------------------


def write_config(path: Path, model: Path, database_url: str) -> Path:
    path.write_text(f"""
[model]
source = "{model}"
[engine]
device = "cpu"
max_batch = 2
[generation]
default_width = 64
default_height = 64
max_width = 256
max_height = 256
sizes = ["64x64"]
max_steps = 500
[queue]
database_url = "{database_url}"
lease_seconds = 5
""")
    return path


def start_worker(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "engine", "worker", "--config", str(config), "--name", "w"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.slow
def test_worker_process_rides_out_a_postgresql_restart(pg_cluster: PgCluster, tiny_sd_folder, tmp_path: Path) -> None:
    db = make_engine(pg_cluster.url)
    upgrade(db)
    queue = Queue(db, pending_limit=100, lease_seconds=5)
    before = [queue.enqueue(requester_id=m, seed=m, steps=60, **JOB).id for m in (1, 2, 3)]
    log = tmp_path / "worker.log"
    worker = start_worker(write_config(tmp_path / "config.toml", tiny_sd_folder, pg_cluster.url), log)

    def wait(condition, what: str) -> None:
        wait_on(worker, log, condition, what)

    try:
        wait(lambda: any(queue.get(j).engine_started_at for j in before), "the worker to start a job")
        pg_cluster.stop()
        wait(lambda: "database unreachable" in log.read_text(), "the worker to notice the outage")
        time.sleep(queue.lease.total_seconds() + 1)  # an outage longer than the leases (not a check)
        during: list[int] = []
        submitter = submit_when_back(queue, 4, during)
        pg_cluster.start()
        submitter.join(BUDGET)
        after = [queue.enqueue(requester_id=5, seed=5, steps=3, **JOB).id]
        everything = before + during + after
        wait(lambda: all(queue.get(j).status.finished for j in everything), "every job to finish")
        assert worker.poll() is None, log.read_text()
        assert_done_once(queue, everything)
        text = log.read_text()
        assert text.count("database unreachable") == 1 and text.count("database reachable again") == 1, text
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        queue.close()
        db.dispose()


@pytest.mark.slow
def test_worker_waits_for_a_database_that_is_not_up_yet(pg_cluster: PgCluster, tiny_sd_folder, tmp_path: Path) -> None:
    pg_cluster.stop()
    log = tmp_path / "worker.log"
    worker = start_worker(write_config(tmp_path / "config.toml", tiny_sd_folder, pg_cluster.url), log)
    db = queue = None
    try:
        wait_on(worker, log, lambda: "database unreachable" in log.read_text(), "the worker to wait for the database")
        pg_cluster.start()
        wait_on(worker, log, lambda: " serving " in log.read_text(), "the worker to migrate and start serving")
        db = make_engine(pg_cluster.url)
        queue = Queue(db, pending_limit=100)
        job = queue.enqueue(requester_id=1, seed=1, steps=3, **JOB).id
        wait_on(worker, log, lambda: queue.get(job).status.finished, "the job")
        assert_done_once(queue, [job])
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if queue is not None:
            queue.close()
            db.dispose()


def wait_on(worker: subprocess.Popen, log: Path, condition, what: str) -> None:
    """Wait for ``condition()`` while the worker process runs; its log if it exits meanwhile."""
    asyncio.run(until(lambda: worker.poll() is None and condition() or _exited(worker, log), what))


def _exited(worker: subprocess.Popen, log: Path) -> bool:
    if worker.poll() is not None:
        raise AssertionError(f"the worker exited with status {worker.returncode}:\n{log.read_text()}")
    return False
