"""The queue's leases and attempts (part of its contract; each test runs on SQLite and on
PostgreSQL, see db_fixtures): heartbeats, take-overs, attempts counted when the engine starts a
job, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from db.models import JobStatus
from db.queue import Queue
from db.session import make_engine
from db_fixtures import FakeClock
from test_queue import ALICE, drain, enqueue

REPO = Path(__file__).resolve().parents[1]


# -- leases, attempts, restarts -----------------------------------------------------------


def test_heartbeat_keeps_the_lease(queue: Queue, clock: FakeClock) -> None:
    enqueue(queue, ALICE)
    job = queue.claim("w1")
    clock.advance(50)
    assert queue.heartbeat(job.id, "w1")
    clock.advance(50)
    assert queue.recover() == 0
    assert queue.get(job.id).status is JobStatus.running


def test_expired_lease_is_taken_over(queue: Queue, clock: FakeClock) -> None:
    enqueue(queue, ALICE)
    job = queue.claim("w1")
    queue.mark_started(job.id, "w1")
    clock.advance(61)
    assert queue.recover() == 1
    assert queue.get(job.id).status is JobStatus.queued
    again = queue.claim("w2")
    assert again.id == job.id and again.attempts == 1  # w1's attempt; w2's counts when it starts
    assert queue.mark_started(job.id, "w2") and queue.get(job.id).attempts == 2
    # The first worker comes back: it has lost the job.
    assert not queue.heartbeat(job.id, "w1")
    assert not queue.complete(job.id, "w1", [(b"late", 1)])
    assert not queue.fail(job.id, "w1", "late")
    assert queue.complete(job.id, "w2", [(b"png", 7)])
    assert [(i.png, i.seed) for i in queue.images(job.id)] == [(b"png", 7)]


def test_claim_itself_recovers_expired_leases(queue: Queue, clock: FakeClock) -> None:
    enqueue(queue, ALICE)
    job = queue.claim("w1")
    clock.advance(61)
    assert queue.claim("w2").id == job.id


def test_fails_with_reason_after_max_attempts(queue: Queue, clock: FakeClock) -> None:
    enqueue(queue, ALICE)
    for attempt in range(1, 4):
        job = queue.claim(f"w{attempt}")
        assert queue.mark_started(job.id, f"w{attempt}")
        assert queue.get(job.id).attempts == attempt
        clock.advance(61)
    assert queue.recover() == 1
    job = queue.get(job.id)
    assert job.status is JobStatus.failed and "3 attempts" in job.error
    assert queue.claim("w9") is None


def test_release_gives_job_back_without_counting(queue: Queue) -> None:
    enqueue(queue, ALICE, 2)
    started = queue.claim("w1")
    queue.mark_started(started.id, "w1")
    waiting = queue.claim("w1")  # claimed for the batch, never started
    assert queue.release(started.id, "w1") and queue.release(waiting.id, "w1")
    assert [queue.get(j.id).attempts for j in (started, waiting)] == [0, 0]


def test_a_job_claimed_and_recovered_without_starting_never_fails_for_attempts(queue: Queue, clock: FakeClock) -> None:
    """Issue 10 §3: jobs a runner claimed for its batch but never started (it died while they
    waited behind others) use no attempt, however often that happens."""
    (job_id,) = enqueue(queue, ALICE)
    for n in range(queue.max_attempts * 3):
        assert queue.claim(f"w{n}").id == job_id
        clock.advance(61)
        assert queue.recover() == 1
        assert queue.get(job_id).status is JobStatus.queued and queue.get(job_id).attempts == 0
    job = queue.claim("last")
    assert queue.mark_started(job.id, "last") and queue.complete(job.id, "last", [(b"png", 1)])
    assert queue.get(job_id).status is JobStatus.done and queue.get(job_id).attempts == 1


def test_a_claimer_keeps_its_own_running_jobs_past_their_lease(queue: Queue, clock: FakeClock) -> None:
    """After a database outage longer than the lease, the runner's next claim must not take its
    own running jobs away from itself (their heartbeats could not renew them meanwhile)."""
    enqueue(queue, ALICE, 2)
    running = queue.claim("w1")
    clock.advance(61)
    assert queue.claim("w1", keep=[running.id]).id != running.id
    assert queue.get(running.id).status is JobStatus.running
    assert queue.heartbeat(running.id, "w1")  # the first heartbeat after the outage renews it
    clock.advance(61)
    assert queue.recover(keep=[running.id]) == 1  # only the other one, whose holder was not told to keep
    assert queue.get(running.id).status is JobStatus.running


def test_finishing_again_after_a_lost_answer_stores_nothing_twice(queue: Queue) -> None:
    """A complete/fail whose commit went through but whose answer was lost (the database went
    away) is retried by the runner: the retry says True and stores nothing more."""
    done, failed = enqueue(queue, ALICE, 2)
    for _ in (done, failed):
        queue.claim("w1")
    assert queue.complete(done, "w1", [(b"png", 1)]) and queue.complete(done, "w1", [(b"png", 1)])
    assert [i.png for i in queue.images(done)] == [b"png"]
    assert queue.fail(failed, "w1", "bad") and queue.fail(failed, "w1", "bad")
    assert not queue.complete(failed, "w1", [(b"png", 1)])  # failed is not done
    assert not queue.complete(done, "w2", []) and queue.images(failed) == []


def test_restart_recovers_only_its_own_host(queue: Queue) -> None:
    enqueue(queue, ALICE, 2)
    mine = queue.claim("host_a-123")
    theirs = queue.claim("hostXa-9")  # "_" must not match any character
    assert queue.recover_all_running(worker_prefix="host_a-") == 1
    assert queue.get(mine.id).status is JobStatus.queued
    assert queue.get(theirs.id).status is JobStatus.running


_CRASHING_PROCESS = """
import os, signal, sys
from db.session import make_engine, upgrade
from db.queue import Queue
engine = make_engine(sys.argv[1])
upgrade(engine)
queue = Queue(engine, pending_limit=5)
for i in range(3):
    queue.enqueue(requester_id=101, prompt=f"job {i}")
job = queue.claim("crashing-worker")
queue.mark_started(job.id, "crashing-worker")
os.kill(os.getpid(), signal.SIGKILL)  # no clean shutdown, as in a crash
"""


@pytest.mark.slow  # starts a Python process
def test_new_process_sees_queued_and_running_jobs(db_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _CRASHING_PROCESS, db_url], env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL
    engine = make_engine(db_url)
    queue = Queue(engine, pending_limit=5)
    jobs = queue.pending_for(ALICE)
    assert [j.status for j in jobs] == [JobStatus.running, JobStatus.queued, JobStatus.queued]
    assert queue.recover_all_running() == 1
    first = queue.claim("new-worker")
    assert first.id == jobs[0].id and first.attempts == 1  # the crashed attempt counted
    assert drain(queue) == [j.id for j in jobs[1:]]
    engine.dispose()
