"""The job queue: enqueue, fair claim with leases, complete/fail/cancel, position, delivery.

Fair order: the member served longest ago goes first (never served before anyone), first in,
first out within a member. Claiming serves the member, which sends them to the back; so the
order of the waiting jobs is round-robin over members (:func:`fair_order`).

Crash safety: a claim is one transaction that counts the attempt and gives the worker a lease;
the worker renews it with :meth:`Queue.heartbeat`. A job whose lease ran out (its worker died)
is queued again by :meth:`Queue.recover` and by every claim, or failed with a reason once it
has used ``max_attempts``. Only the worker holding the job can complete or fail it.

Two claimers never get the same job: on SQLite every write transaction starts with
``BEGIN IMMEDIATE`` (see :mod:`db.session`), on PostgreSQL the claim locks its row with
``SELECT ... FOR UPDATE SKIP LOCKED``.

Every method runs its own short transaction and returns detached snapshots
(``expire_on_commit=False``), safe to read in any thread. A Queue is thread-safe, except
:meth:`Queue.wait_for_jobs`, which belongs to one worker thread.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
from collections.abc import Callable, Collection, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
from sqlalchemy import Engine, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from db.errors import AlreadyFinished, JobNotFound, NotYours, PendingLimitExceeded, QueueError
from db.models import (
    FINISHED,
    PENDING,
    Job,
    JobStatus,
    Member,
    PostedMessage,
    ResultImage,
    ServerSettings,
)

__all__ = [
    "AlreadyFinished",
    "JobNotFound",
    "NotYours",
    "PendingLimitExceeded",
    "Queue",
    "QueueError",
    "fair_order",
]

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "sdbot_new_job"
_NO_UPDATE_SYNC = {"synchronize_session": False}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def fair_order(waiting: Iterable[tuple[int, int, datetime | None]]) -> list[int]:
    """Job ids in the order claims would take them, from ``(job_id, member_id, last_served_at)``.

    Members are ranked as :meth:`Queue.claim` ranks them (never served first, then served
    longest ago, ties by their oldest job); each claim sends its member to the back, so the
    result is round-robin over that ranking, each member's jobs in id order.
    """
    jobs_of: dict[int, list[int]] = {}
    served: dict[int, datetime | None] = {}
    for job_id, member_id, last_served_at in sorted(waiting):
        jobs_of.setdefault(member_id, []).append(job_id)
        served[member_id] = last_served_at
    members = sorted(jobs_of, key=lambda m: _member_rank(served[m], jobs_of[m][0]))
    rounds = itertools.zip_longest(*(jobs_of[m] for m in members))
    return [job_id for round_ in rounds for job_id in round_ if job_id is not None]


def _server_not_paused() -> Any:
    """Jobs of a server whose managers paused the bot wait (DMs have no server: never paused)."""
    return ~(
        select(ServerSettings.guild_id)
        .where(ServerSettings.guild_id == Job.guild_id, ServerSettings.paused.is_(True))
        .exists()
    )


def _member_rank(last_served_at: datetime | None, first_job_id: int) -> tuple[bool, datetime, int]:
    never = datetime.min.replace(tzinfo=timezone.utc)
    return (last_served_at is not None, last_served_at or never, first_job_id)


class _Wakeup:
    """Wakes the waiting workers of one database in this process (a generation counter)."""

    _by_url: dict[str, _Wakeup] = {}
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.generation = 0
        self.changed = threading.Condition()

    @classmethod
    def for_engine(cls, engine: Engine) -> _Wakeup:
        with cls._lock:
            return cls._by_url.setdefault(engine.url.render_as_string(hide_password=False), cls())

    def notify(self) -> None:
        with self.changed:
            self.generation += 1
            self.changed.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Wait until the generation differs from ``seen`` or ``timeout``; return it."""
        with self.changed:
            self.changed.wait_for(lambda: self.generation != seen, timeout)
            return self.generation


class Queue:
    """The job queue over one database (SQLite or PostgreSQL); see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        *,
        pending_limit: int,
        max_attempts: int = 3,
        lease_seconds: float = 120,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.pending_limit = pending_limit
        self.max_attempts = max_attempts
        self.lease = timedelta(seconds=lease_seconds)
        self.clock = clock
        self._postgres = engine.dialect.name == "postgresql"
        self._write = sessionmaker(engine, expire_on_commit=False)
        # Reads need no write lock: on SQLite (WAL) a deferred BEGIN reads a snapshot.
        self._read = sessionmaker(
            engine.execution_options(sqlite_begin="DEFERRED"), expire_on_commit=False
        )
        self._wakeup = _Wakeup.for_engine(engine)
        self._seen = self._wakeup.generation
        self._listener: Any = None  # psycopg.Connection LISTENing, made by wait_for_jobs

    # -- enqueue --------------------------------------------------------------------------

    def enqueue(self, **fields: Any) -> Job:
        """Queue a job (Job's columns as keywords; a random seed when none is given).

        Raises PendingLimitExceeded when the member already has ``pending_limit`` jobs
        queued or running.
        """
        requester_id = fields["requester_id"]
        fields.setdefault("seed", secrets.randbelow(2**32))
        fields.update(status=JobStatus.queued, attempts=0, created_at=self.clock())
        with self._write.begin() as session:
            self._ensure_member(session, requester_id)
            # Lock the member's row so two concurrent enqueues cannot both pass the limit
            # (PostgreSQL; SQLite already holds the write lock).
            session.execute(
                select(Member.user_id).where(Member.user_id == requester_id).with_for_update()
            )
            pending = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.requester_id == requester_id, Job.status.in_(PENDING))
            )
            if pending >= self.pending_limit:
                raise PendingLimitExceeded(pending, self.pending_limit)
            job = Job(**fields)
            session.add(job)
            session.flush()
            self._notify(session)
        self._wakeup.notify()
        return job

    def _ensure_member(self, session: Session, user_id: int) -> None:
        insert = pg_insert if self._postgres else sqlite_insert
        session.execute(
            insert(Member)
            .values(user_id=user_id, last_served_at=None)
            .on_conflict_do_nothing(index_elements=["user_id"])
        )

    # -- claim and leases -----------------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        *,
        width: int | None = None,
        height: int | None = None,
        model: str | None = None,
        unassigned: bool = True,
    ) -> Job | None:
        """Take the next job in fair order (optionally only of one size / model), or None.

        One transaction: expired leases are recovered first, then the job is marked running
        for ``worker_id`` with a fresh lease and its attempt counted.
        """
        jobs = self.claim_many(worker_id, 1, width=width, height=height, model=model, unassigned=unassigned)
        return jobs[0] if jobs else None

    def claim_many(
        self,
        worker_id: str,
        n: int,
        *,
        width: int | None = None,
        height: int | None = None,
        model: str | None = None,
        unassigned: bool = True,
    ) -> list[Job]:
        """Claim up to ``n`` jobs in fair order in one transaction (for a batching worker).

        ``model``: take jobs for that model, and, with ``unassigned``, jobs for no model in
        particular (``Job.model`` None: the default model).
        """
        now = self.clock()
        claimed: list[Job] = []
        with self._write.begin() as session:
            self._recover_expired(session, now)
            # Claiming serves a member and sends them to the back, so a batch goes in rounds:
            # each round takes the best waiting job of members not yet served in it.
            served_this_round: set[int] = set()
            while len(claimed) < n:
                job = self._claim_one(
                    session, worker_id, now, served_this_round, width, height, model, unassigned
                )
                if job is None and served_this_round:
                    served_this_round.clear()
                    continue
                if job is None:
                    break
                served_this_round.add(job.requester_id)
                claimed.append(job)
            self._mark_served(session, [job.requester_id for job in claimed], now)
        return claimed

    def _claim_one(
        self,
        session: Session,
        worker_id: str,
        now: datetime,
        skip_members: set[int],
        width: int | None,
        height: int | None,
        model: str | None,
        unassigned: bool = True,
    ) -> Job | None:
        # All of a member's jobs share its last_served_at, so ordering jobs by
        # (never served first, last_served_at, id) picks the head of the right member.
        query = (
            select(Job)
            .outerjoin(Member, Member.user_id == Job.requester_id)
            .where(Job.status == JobStatus.queued, _server_not_paused())
            .order_by(Member.last_served_at.is_not(None), Member.last_served_at, Job.id)
            .limit(1)
            .with_for_update(of=Job, skip_locked=True)
        )
        if skip_members:
            query = query.where(Job.requester_id.not_in(skip_members))
        if width is not None:
            query = query.where(Job.width == width)
        if height is not None:
            query = query.where(Job.height == height)
        if model is not None and unassigned:
            query = query.where(or_(Job.model.is_(None), Job.model == model))
        elif model is not None:
            query = query.where(Job.model == model)
        job = session.scalars(query).first()
        if job is None:
            return None
        job.status = JobStatus.running
        job.attempts += 1
        job.worker_id = worker_id
        job.lease_until = now + self.lease
        job.started_at = now
        session.flush()
        return job

    def waiting_models(self) -> dict[str | None, float]:
        """Per model (None: no model named), seconds its oldest claimable queued job has waited."""
        now = self.clock()
        query = (
            select(Job.model, func.min(Job.created_at))
            .where(Job.status == JobStatus.queued, _server_not_paused())
            .group_by(Job.model)
        )
        with self._read.begin() as session:
            rows = session.execute(query).all()
        return {model: max(0.0, (now - oldest).total_seconds()) for model, oldest in rows if oldest is not None}

    def _mark_served(self, session: Session, members_in_order: list[int], now: datetime) -> None:
        """Send the members just served to the back of the line, in the order served.

        Times are strictly after everyone else's, even with a frozen or lagging clock. Rows are
        updated in user id order, so that concurrent batch claims on PostgreSQL cannot
        deadlock on them.
        """
        if not members_in_order:
            return
        latest = session.scalar(select(func.max(Member.last_served_at)))
        start = now if latest is None or now > latest else latest + timedelta(microseconds=1)
        served_at = {m: start + timedelta(microseconds=i) for i, m in enumerate(members_in_order)}
        for user_id in sorted(served_at):
            self._ensure_member(session, user_id)
            session.execute(
                update(Member)
                .where(Member.user_id == user_id)
                .values(last_served_at=served_at[user_id]),
                execution_options=_NO_UPDATE_SYNC,
            )

    def heartbeat(self, job_id: int, worker_id: str) -> bool:
        """Extend the lease. False when the job is no longer ours (taken over, cancelled).

        A lease that ran out but was not yet recovered is still ours, and is renewed.
        """
        return self._update_running(job_id, worker_id, {"lease_until": self.clock() + self.lease})

    def is_cancelled(self, job_id: int) -> bool:
        with self._read.begin() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
        return status is JobStatus.cancelled

    def complete(self, job_id: int, worker_id: str, images: list[tuple[bytes, int]]) -> bool:
        """Store the result images ``(png, seed)`` and mark the job done.

        False (and nothing stored) when the job is no longer this worker's.
        """
        now = self.clock()
        with self._write.begin() as session:
            if not self._finish(session, job_id, worker_id, JobStatus.done, now, None):
                return False
            session.add_all(
                ResultImage(job_id=job_id, index=i, png=png, seed=seed)
                for i, (png, seed) in enumerate(images)
            )
        return True

    def fail(self, job_id: int, worker_id: str, error: str) -> bool:
        """Mark the job failed with ``error`` (shown to the member). False if not ours."""
        now = self.clock()
        with self._write.begin() as session:
            return self._finish(session, job_id, worker_id, JobStatus.failed, now, error)

    def release(self, job_id: int, worker_id: str) -> bool:
        """Give a job back unfinished (worker shutting down); the attempt is not counted."""
        released = self._update_running(
            job_id,
            worker_id,
            {
                "status": JobStatus.queued,
                "attempts": Job.attempts - 1,
                "worker_id": None,
                "lease_until": None,
                "started_at": None,
            },
        )
        if released:
            self._wakeup.notify()
        return released

    def _update_running(self, job_id: int, worker_id: str, values: dict[str, Any]) -> bool:
        with self._write.begin() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.running
                )
                .values(values),
                execution_options=_NO_UPDATE_SYNC,
            )
            if values.get("status") is JobStatus.queued:
                self._notify(session)
            return result.rowcount == 1

    def _finish(
        self,
        session: Session,
        job_id: int,
        worker_id: str,
        status: JobStatus,
        now: datetime,
        error: str | None,
    ) -> bool:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.running)
            .values(status=status, finished_at=now, lease_until=None, error=error),
            execution_options=_NO_UPDATE_SYNC,
        )
        return result.rowcount == 1

    # -- recovery -------------------------------------------------------------------------

    def recover(self) -> int:
        """Queue again (or fail, after max_attempts) running jobs whose lease ran out."""
        with self._write.begin() as session:
            return self._recover_expired(session, self.clock())

    def recover_all_running(self, worker_prefix: str | None = None) -> int:
        """After a restart: queue again at once the running jobs an earlier process left.

        Without ``worker_prefix`` every running job (only right when this process is the sole
        worker); with it, those whose worker_id starts with it (e.g. ``"myhost-"`` when worker
        ids are ``"<host>-<pid>"``), leaving other machines' jobs to their leases.
        """
        now = self.clock()
        query = select(Job.id).where(Job.status == JobStatus.running)
        if worker_prefix is not None:
            query = query.where(Job.worker_id.startswith(worker_prefix, autoescape=True))
        with self._write.begin() as session:
            ids = session.scalars(query.with_for_update(skip_locked=True)).all()
            return self._requeue(session, list(ids), now)

    def _recover_expired(self, session: Session, now: datetime) -> int:
        ids = session.scalars(
            select(Job.id)
            .where(Job.status == JobStatus.running, Job.lease_until < now)
            .with_for_update(skip_locked=True)
        ).all()
        return self._requeue(session, list(ids), now)

    def _requeue(self, session: Session, ids: list[int], now: datetime) -> int:
        if not ids:
            return 0
        running = (Job.id.in_(ids), Job.status == JobStatus.running)
        failed = session.execute(
            update(Job)
            .where(*running, Job.attempts >= self.max_attempts)
            .values(
                status=JobStatus.failed,
                finished_at=now,
                lease_until=None,
                error=(
                    f"Gave up after {self.max_attempts} attempts: the worker making this image "
                    "stopped each time (crash or restart). Try fewer steps or a smaller size."
                ),
            ),
            execution_options=_NO_UPDATE_SYNC,
        ).rowcount
        queued = session.execute(
            update(Job)
            .where(*running)
            .values(status=JobStatus.queued, worker_id=None, lease_until=None, started_at=None),
            execution_options=_NO_UPDATE_SYNC,
        ).rowcount
        log.warning(
            "recovered %d job(s): %d queued again, %d failed", failed + queued, queued, failed
        )
        if queued:
            self._notify(session)
        return failed + queued

    def fail_unknown_models(self, known: Collection[str]) -> list[int]:
        """Fail the queued jobs that ask for a model not in ``known`` (the bot's configured models:
        one was removed or renamed since they were queued), each with a reason the member sees,
        instead of leaving them in line for a model nobody serves. Returns their ids."""
        now = self.clock()
        with self._write.begin() as session:
            ids = session.scalars(
                select(Job.id)
                .where(Job.status == JobStatus.queued, Job.model.is_not(None), Job.model.not_in(list(known)))
                .with_for_update(skip_locked=True)
            ).all()
            for job in session.scalars(select(Job).where(Job.id.in_(ids))):
                job.status, job.finished_at = JobStatus.failed, now
                job.error = (f"The model “{job.model}” is not offered here any more. Run the command again "
                             f"and pick one of: {', '.join(known)}.")
        if ids:
            log.warning("failed %d queued job(s) for models no longer configured: %s", len(ids), list(ids))
        return list(ids)

    # -- cancel and queries ---------------------------------------------------------------

    def cancel(self, job_id: int, user_id: int, *, moderator: bool = False) -> Job:
        """Cancel a queued or running job (a running one stops at its next heartbeat).

        Raises JobNotFound, NotYours (not the requester and not a moderator), AlreadyFinished.
        """
        with self._write.begin() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFound(f"There is no job #{job_id}. Check the number and try again.")
            if job.requester_id != user_id and not moderator:
                raise NotYours()
            if job.status in FINISHED:
                raise AlreadyFinished(
                    f"Job #{job_id} is already {job.status.name}; nothing to cancel."
                )
            job.status = JobStatus.cancelled
            job.finished_at = self.clock()
            job.lease_until = None
            job.error = (
                "Cancelled by the requester."
                if job.requester_id == user_id
                else ("Cancelled by a moderator.")
            )
        return job

    def position(self, job_id: int) -> int | None:
        """1-based place in line in fair order; None when the job is not queued."""
        with self._read.begin() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            if status is not JobStatus.queued:
                return None
            waiting = session.execute(
                select(Job.id, Job.requester_id, Member.last_served_at)
                .outerjoin(Member, Member.user_id == Job.requester_id)
                .where(Job.status == JobStatus.queued)
            ).all()
        return fair_order(tuple(row) for row in waiting).index(job_id) + 1

    def get(self, job_id: int) -> Job | None:
        with self._read.begin() as session:
            return session.get(Job, job_id)

    def images(self, job_id: int) -> list[ResultImage]:
        with self._read.begin() as session:
            query = (
                select(ResultImage).where(ResultImage.job_id == job_id).order_by(ResultImage.index)
            )
            return list(session.scalars(query))

    def pending_for(self, user_id: int) -> list[Job]:
        """The member's queued and running jobs, oldest first."""
        with self._read.begin() as session:
            query = (
                select(Job)
                .where(Job.requester_id == user_id, Job.status.in_(PENDING))
                .order_by(Job.id)
            )
            return list(session.scalars(query))

    # -- delivery -------------------------------------------------------------------------

    def set_status_message(self, job_id: int, channel_id: int, message_id: int) -> None:
        """Remember the message that shows the job's place in line / progress."""
        with self._write.begin() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status_channel_id=channel_id, status_message_id=message_id),
                execution_options=_NO_UPDATE_SYNC,
            )

    def undelivered(self) -> list[Job]:
        """Finished jobs (done, failed, cancelled) whose result or notice is not posted yet."""
        with self._read.begin() as session:
            query = (
                select(Job)
                .where(Job.status.in_(FINISHED), Job.posted_at.is_(None))
                .order_by(Job.finished_at, Job.id)
            )
            return list(session.scalars(query))

    def mark_posted(self, job_id: int, channel_id: int, message_ids: list[int]) -> None:
        """Record where the job was posted and that it was. Safe to repeat."""
        now = self.clock()
        with self._write.begin() as session:
            known = set(
                session.scalars(
                    select(PostedMessage.message_id).where(
                        PostedMessage.message_id.in_(message_ids)
                    )
                )
            )
            session.add_all(
                PostedMessage(job_id=job_id, channel_id=channel_id, message_id=m, created_at=now)
                for m in dict.fromkeys(message_ids)
                if m not in known
            )
            session.execute(
                update(Job).where(Job.id == job_id, Job.posted_at.is_(None)).values(posted_at=now),
                execution_options=_NO_UPDATE_SYNC,
            )

    def job_for_message(self, message_id: int) -> Job | None:
        """The job whose result a Discord message shows (for 🔁 reactions), or None."""
        with self._read.begin() as session:
            query = (
                select(Job)
                .join(PostedMessage, PostedMessage.job_id == Job.id)
                .where(PostedMessage.message_id == message_id)
            )
            return session.scalars(query).first()

    # -- waking workers -------------------------------------------------------------------

    def notify_new_job(self) -> None:
        """Wake workers waiting in :meth:`wait_for_jobs` (this process; any, on PostgreSQL)."""
        with self._write.begin() as session:
            self._notify(session)
        self._wakeup.notify()

    def _notify(self, session: Session) -> None:
        if self._postgres:  # delivered when the transaction commits, and only then
            session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    def wait_for_jobs(self, timeout: float) -> bool:
        """Sleep until a job may be waiting or ``timeout`` seconds pass; True if woken early.

        PostgreSQL: LISTEN/NOTIFY across processes. SQLite: wakes on enqueues by any Queue of
        this process on the same database;
        other processes' jobs are found by polling, which is what the timeout is for.
        """
        if not self._postgres:
            seen, self._seen = self._seen, self._wakeup.wait(self._seen, timeout)
            return self._seen != seen
        try:
            listener = self._listen()
            woken = any(True for _ in listener.notifies(timeout=timeout, stop_after=1))
        except (psycopg.Error, OSError):
            log.warning("LISTEN connection failed; falling back to polling", exc_info=True)
            self.close()
            self._wakeup.wait(self._seen, timeout)
            return False
        return woken

    def _listen(self) -> Any:
        if self._listener is None or self._listener.closed:
            url = self.engine.url.set(drivername="postgresql")
            conninfo = url.render_as_string(hide_password=False)
            self._listener = psycopg.connect(conninfo, autocommit=True)
            self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return self._listener

    def close(self) -> None:
        """Close the LISTEN connection, if any (the engine belongs to the caller)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
