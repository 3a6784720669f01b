"""The queue's contract: each test runs on SQLite and on PostgreSQL (see db_fixtures)."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from db.community import Community
from db.errors import AlreadyFinished, JobNotFound, NotYours, PendingLimitExceeded
from db.models import Job, JobKind, JobStatus, Member
from db.queue import Queue, fair_order
from db.session import make_engine, upgrade, write_turn_taken
from db_fixtures import FakeClock

ALICE, BOB, CAROL = 101, 202, 303


def enqueue(queue: Queue, member: int, n: int = 1, **fields) -> list[int]:
    return [queue.enqueue(requester_id=member, prompt=f"job {i}", **fields).id for i in range(n)]


def drain(queue: Queue, worker: str = "w1") -> list[int]:
    order = []
    while (job := queue.claim(worker)) is not None:
        order.append(job.id)
    return order


# -- fair order ---------------------------------------------------------------------------


def test_member_who_waited_goes_second(queue: Queue) -> None:
    a = enqueue(queue, ALICE, 5)
    (b,) = enqueue(queue, BOB)
    assert drain(queue) == [a[0], b, *a[1:]]


def test_round_robin_across_members_fifo_within(queue: Queue) -> None:
    a = enqueue(queue, ALICE, 3)
    b = enqueue(queue, BOB, 2)
    c = enqueue(queue, CAROL, 1)
    assert drain(queue) == [a[0], b[0], c[0], a[1], b[1], a[2]]


def test_member_served_recently_waits_behind_newcomer(queue: Queue) -> None:
    enqueue(queue, ALICE)
    drain(queue)
    (a,) = enqueue(queue, ALICE)
    (b,) = enqueue(queue, BOB)
    assert drain(queue) == [b, a]


def test_position_is_the_order_claims_take(queue: Queue) -> None:
    ids = enqueue(queue, ALICE, 3) + enqueue(queue, BOB, 2) + enqueue(queue, CAROL, 1)
    queue.claim("w1")  # Alice served: she now waits behind Bob and Carol
    waiting = sorted((queue.position(i), i) for i in ids if queue.position(i) is not None)
    assert [p for p, _ in waiting] == list(range(1, len(ids)))
    assert [i for _, i in waiting] == drain(queue)
    assert queue.position(ids[0]) is None and queue.position(10_000) is None


def test_position_does_not_count_jobs_of_paused_servers(queue: Queue, db_engine: Engine) -> None:
    """Issue 14: jobs of a paused server do not run, so a member is not told a place behind them."""
    paused = enqueue(queue, ALICE, 2, guild_id=1) + enqueue(queue, BOB, 1, guild_id=1)
    (mine,) = enqueue(queue, CAROL, guild_id=2)
    assert queue.position(mine) == 3  # behind Alice's and Bob's first jobs
    Community(db_engine).update_server(1, actor_id=9, paused=True)
    assert queue.position(mine) == 1
    assert drain(queue) == [mine]  # as claims take them
    assert all(queue.position(j) is not None for j in paused)


def test_position_agrees_with_fair_order_on_random_lines(db_engine: Engine, clock: FakeClock) -> None:
    """The set-based place in line equals the place in :func:`fair_order` of all waiting jobs."""
    queue = Queue(db_engine, pending_limit=100, clock=clock)
    rng = random.Random(7)
    ids = [i for _ in range(40) for i in enqueue(queue, rng.choice([ALICE, BOB, CAROL, 404, 505]))]
    for _ in range(6):  # some members served, in some order, so their ranks differ
        queue.claim("w1")
    waiting = [j for j in ids if queue.get(j).status is JobStatus.queued]
    with queue._read.begin() as session:
        rows = session.execute(
            select(Job.id, Job.requester_id, Member.last_served_at)
            .outerjoin(Member, Member.user_id == Job.requester_id)
            .where(Job.status == JobStatus.queued)
        ).all()
    expected = fair_order(tuple(row) for row in rows)
    assert [queue.position(j) for j in expected] == list(range(1, len(waiting) + 1))


def test_fair_order_without_database() -> None:
    assert fair_order([]) == []
    # Bob was never served, Alice was: Bob first even though Alice's job is older.
    t = datetime(2026, 1, 1, tzinfo=UTC)
    assert fair_order([(1, ALICE, t), (2, ALICE, t), (3, BOB, None)]) == [3, 1, 2]


# -- claiming -----------------------------------------------------------------------------


def test_claim_leases_and_the_start_counts_the_attempt(queue: Queue, clock: FakeClock) -> None:
    (job_id,) = enqueue(queue, ALICE, steps=30, kind=JobKind.img2img, init_image=b"png")
    job = queue.claim("w1")
    assert job.id == job_id and job.status is JobStatus.running
    assert job.attempts == 0 and job.engine_started_at is None and job.worker_id == "w1"
    assert job.lease_until == clock.now + queue.lease
    assert (job.steps, job.kind, job.init_image) == (30, JobKind.img2img, b"png")
    assert queue.claim("w2") is None
    assert not queue.mark_started(job_id, "w2")  # not theirs
    assert queue.mark_started(job_id, "w1")
    assert not queue.mark_started(job_id, "w1")  # a repeated write counts once
    started = queue.get(job_id)
    assert started.attempts == 1 and started.engine_started_at == clock.now


def test_claim_only_matching_size_and_model(queue: Queue) -> None:
    (small,) = enqueue(queue, ALICE, width=512, height=512, model="sd15")
    (wide,) = enqueue(queue, ALICE, width=768, height=512)
    assert queue.claim("w1", width=768, height=512).id == wide
    assert queue.claim("w1", model="sdxl") is None
    assert queue.claim("w1", width=512, height=512, model="sd15").id == small


def test_an_upscale_alone_is_claimed_in_any_models_turn(queue: Queue) -> None:
    """A Subtle upscale runs no diffusion, so it does not wait for its source's model to get a turn."""
    (diffusion,) = enqueue(queue, ALICE, model="sdxl")
    (upscale,) = enqueue(queue, BOB, model="sdxl", upscale_only=True)
    assert queue.claim("w1", model="sd15").id == upscale
    assert queue.claim("w1", model="sd15", unassigned=False) is None
    assert queue.claim("w1", model="sdxl").id == diffusion


def test_claim_many_takes_a_fair_batch(queue: Queue) -> None:
    a = enqueue(queue, ALICE, 3)
    b = enqueue(queue, BOB, 2)
    (c,) = enqueue(queue, CAROL)
    batch = queue.claim_many("w1", 5)
    assert [j.id for j in batch] == [a[0], b[0], c, a[1], b[1]]  # as five claims would
    assert all(j.status is JobStatus.running for j in batch)
    (c2,) = enqueue(queue, CAROL)
    assert drain(queue) == [c2, a[2]]  # Carol was served longest ago, in the batch


def test_threads_claiming_at_once_never_share_a_job(db_url: str, queue: Queue) -> None:
    ids = [i for member in range(6) for i in enqueue(queue, 1000 + member, 5)]
    claimed: list[list[int]] = [[] for _ in range(6)]
    barrier = threading.Barrier(6)

    def worker(n: int) -> None:
        engine = make_engine(db_url)  # one engine each, as separate processes would have
        q = Queue(engine, pending_limit=5)
        barrier.wait()
        while jobs := q.claim_many(f"w{n}", 1 + n % 3):  # batches of 1, 2 or 3
            claimed[n].extend(job.id for job in jobs)
        engine.dispose()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for got in claimed for i in got]
    assert sorted(everything) == sorted(ids)  # every job once, none twice


# -- pending limit ------------------------------------------------------------------------


def test_pending_limit_refuses_clearly(queue: Queue) -> None:
    ids = enqueue(queue, ALICE, 5)
    with pytest.raises(PendingLimitExceeded) as refused:
        enqueue(queue, ALICE)
    assert "5 jobs waiting (limit 5)" in str(refused.value) and "/cancel" in str(refused.value)
    enqueue(queue, BOB)  # others are not affected
    job = queue.claim("w1")  # running still counts as pending
    with pytest.raises(PendingLimitExceeded):
        enqueue(queue, ALICE)
    queue.complete(job.id, "w1", [])
    queue.cancel(ids[1], ALICE)
    enqueue(queue, ALICE, 2)


def test_sqlite_writers_of_one_process_take_turns_and_always_give_them_back(tmp_path: Path) -> None:
    """One engine shared by many threads (the bot's case): writers wait on a lock in the process
    instead of SQLite's sleeping busy handler; every way a transaction ends gives the turn back."""
    engine = make_engine(f"sqlite:///{tmp_path}/turns.sqlite3")
    upgrade(engine)
    queue = Queue(engine, pending_limit=1000)
    barrier = threading.Barrier(8)
    ids: list[int] = []

    def member(n: int) -> None:
        barrier.wait()
        for i in range(20):
            ids.append(queue.enqueue(requester_id=n, prompt=f"job {i}").id)
            queue.pending_for(n)  # readers go between the writers

    threads = [threading.Thread(target=member, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == list(range(1, 161))
    assert not write_turn_taken(engine)

    strict = Queue(engine, pending_limit=20)
    with pytest.raises(PendingLimitExceeded):  # raised inside the write transaction: rolled back
        strict.enqueue(requester_id=0, prompt="one too many")
    assert not write_turn_taken(engine)
    with pytest.raises(ZeroDivisionError), engine.begin() as connection:  # any error in a transaction
        connection.exec_driver_sql("UPDATE jobs SET prompt = 'x' WHERE id = 1")
        assert write_turn_taken(engine)
        raise ZeroDivisionError("any error in a transaction")
    assert not write_turn_taken(engine)
    connection = engine.connect()
    connection.exec_driver_sql("UPDATE jobs SET prompt = 'y' WHERE id = 1")
    connection.invalidate()  # the connection is dropped mid-transaction
    assert not write_turn_taken(engine)
    assert queue.get(1).prompt == "job 0"
    assert queue.enqueue(requester_id=99, prompt="after all that").id == 161
    engine.dispose()


def test_pending_limit_holds_under_concurrent_enqueues(db_url: str, queue: Queue) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def member_clicks() -> None:
        engine = make_engine(db_url)
        q = Queue(engine, pending_limit=5)
        barrier.wait()
        try:
            q.enqueue(requester_id=ALICE, prompt="again")
            outcomes.append("queued")
        except PendingLimitExceeded:
            outcomes.append("refused")
        engine.dispose()

    threads = [threading.Thread(target=member_clicks) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["queued"] * 5 + ["refused"] * 3
    assert len(queue.pending_for(ALICE)) == 5


# -- cancel -------------------------------------------------------------------------------


def test_queued_jobs_for_models_no_longer_configured_fail_with_a_reason(queue: Queue) -> None:
    (running,) = enqueue(queue, BOB, model="old-model")
    assert queue.claim("w1", model="old-model").id == running  # a running job finishes as it is
    (gone,) = enqueue(queue, ALICE, model="old-model")
    (kept,) = enqueue(queue, ALICE, model="sd15")
    (default,) = enqueue(queue, BOB)  # no model named: the default, whatever it is
    assert queue.fail_unknown_models(["sd15", "sdxl"]) == [gone]
    job = queue.get(gone)
    assert job.status is JobStatus.failed and job.finished_at is not None
    assert "“old-model” is not offered here any more" in job.error and "sd15, sdxl" in job.error
    assert [queue.get(j).status for j in (running, kept, default)] == [
        JobStatus.running,
        JobStatus.queued,
        JobStatus.queued,
    ]
    assert [j.id for j in queue.undelivered()] == [gone]  # its member is told
    assert queue.fail_unknown_models(["sd15", "sdxl"]) == []


def test_cancel_before_run(queue: Queue) -> None:
    (job_id,) = enqueue(queue, ALICE)
    with pytest.raises(NotYours):
        queue.cancel(job_id, BOB)
    job = queue.cancel(job_id, ALICE)
    assert job.status is JobStatus.cancelled and queue.position(job_id) is None
    assert queue.claim("w1") is None
    with pytest.raises(AlreadyFinished):
        queue.cancel(job_id, ALICE)
    with pytest.raises(JobNotFound):
        queue.cancel(10_000, ALICE)


def test_cancel_during_run(queue: Queue) -> None:
    enqueue(queue, ALICE)
    job = queue.claim("w1")
    assert not queue.is_cancelled(job.id)
    queue.cancel(job.id, BOB, moderator=True)
    assert queue.is_cancelled(job.id)
    assert not queue.heartbeat(job.id, "w1")  # how the worker notices
    assert not queue.complete(job.id, "w1", [(b"png", 1)])
    assert queue.get(job.id).status is JobStatus.cancelled and queue.images(job.id) == []
    assert "moderator" in queue.get(job.id).error


# -- delivery -----------------------------------------------------------------------------


def test_results_are_delivered_once(queue: Queue) -> None:
    done_id, failed_id, waiting_id = enqueue(queue, ALICE, 3)
    queue.complete(queue.claim("w1").id, "w1", [(b"first", 7), (b"second", 8)])
    queue.fail(queue.claim("w1").id, "w1", "out of memory")
    assert [j.id for j in queue.undelivered()] == [done_id, failed_id]
    assert queue.get(failed_id).error == "out of memory"
    assert [(i.index, i.seed, i.png) for i in queue.images(done_id)] == [
        (0, 7, b"first"),
        (1, 8, b"second"),
    ]
    queue.mark_posted(done_id, 55, [900, 901])
    queue.mark_posted(done_id, 55, [901])  # a retry after a crash changes nothing
    assert [j.id for j in queue.undelivered()] == [failed_id]
    assert queue.job_for_message(901).id == done_id
    assert queue.job_for_message(999) is None
    assert queue.get(waiting_id).posted_at is None
    queue.mark_posted(failed_id, 55, [])  # e.g. the member was told in a DM we did not keep
    assert queue.undelivered() == []


def test_status_message_is_remembered(queue: Queue) -> None:
    (job_id,) = enqueue(queue, ALICE, interaction_token="tok", interaction_app_id=5)
    queue.set_status_message(job_id, 55, 777)
    job = queue.get(job_id)
    assert (job.status_channel_id, job.status_message_id, job.interaction_token) == (55, 777, "tok")


def test_snapshots_read_in_another_thread(queue: Queue) -> None:
    job = queue.get(enqueue(queue, ALICE, parent_id=None)[0])
    seen = []
    thread = threading.Thread(target=lambda: seen.append((job.prompt, job.seed, job.status)))
    thread.start()
    thread.join()
    assert seen == [("job 0", job.seed, JobStatus.queued)]


# -- waking workers -----------------------------------------------------------------------


def test_enqueue_wakes_a_waiting_worker(db_engine: Engine) -> None:
    worker_side = Queue(db_engine, pending_limit=5)
    bot_side = Queue(db_engine, pending_limit=5)
    assert not worker_side.wait_for_jobs(0.01)  # nothing yet (and LISTEN is set up)
    bot_side.enqueue(requester_id=ALICE, prompt="wake up")
    assert worker_side.wait_for_jobs(30)
    worker_side.close()
    bot_side.close()


def test_enqueue_many_stores_a_group_and_refuses_only_whom_the_limit_stops(queue: Queue) -> None:
    limit = queue.pending_limit
    many = [dict(requester_id=ALICE, prompt=f"alice {i}") for i in range(limit + 1)] + [
        dict(requester_id=BOB, prompt="bob")
    ]
    results = queue.enqueue_many(many)
    assert [type(r).__name__ for r in results] == ["Job"] * limit + ["PendingLimitExceeded", "Job"]
    assert len(queue.pending_for(ALICE)) == limit and len(queue.pending_for(BOB)) == 1


def test_positions_of_a_group_are_each_jobs_position(db_engine: Engine, clock: FakeClock) -> None:
    """``Queue.positions`` (one pass over the line, for a group just stored) gives what
    ``Queue.position`` gives job by job: served members, paused servers and running jobs too."""
    queue = Queue(db_engine, pending_limit=100, clock=clock)
    rng = random.Random(11)
    ids = [
        i
        for _ in range(60)
        for i in enqueue(queue, rng.choice([ALICE, BOB, CAROL, 404, 505]), guild_id=rng.choice([1, 2]))
    ]
    for _ in range(8):
        queue.claim("w1")
    Community(db_engine).update_server(2, actor_id=9, paused=True)
    assert queue.positions(ids) == {job_id: queue.position(job_id) for job_id in ids}
    assert queue.positions([]) == {}
