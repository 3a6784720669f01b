"""Claims and leases: a claim is one transaction that gives the worker a lease on the jobs it
takes; the worker renews it with :meth:`~ClaimsAndLeases.heartbeat`. A job whose lease ran out (its
worker died) is queued again by :meth:`~ClaimsAndLeases.recover` and by every claim, or failed with
a reason once it has used ``max_attempts``. An attempt counts when the engine starts the job
(:meth:`~ClaimsAndLeases.mark_started`), not when a runner claims it for a place in its batch.
Only the worker holding the job can complete or fail it, and may repeat either safely.

Two claimers never get the same job, and take the fair order in turn: on SQLite every write
transaction starts with ``BEGIN IMMEDIATE`` (see :mod:`db.session`); on PostgreSQL claims take
turns on an advisory lock, and the claim locks its row with ``SELECT ... FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, or_, select, text, update
from sqlalchemy.orm import Session

from db.models import Job, JobStatus, Member, ResultImage
from db.queue.base import NO_UPDATE_SYNC, QueueBase
from db.queue.order import server_not_paused

log = logging.getLogger(__name__)

#: pg_advisory_xact_lock key that claims take turns on (db.session's migration lock is another).
CLAIM_LOCK = 0x5D_B0_C1


class ClaimsAndLeases(QueueBase):
    """Claiming, leases, finishing and recovery (a part of :class:`db.queue.Queue`)."""

    def claim(
        self,
        worker_id: str,
        *,
        width: int | None = None,
        height: int | None = None,
        model: str | None = None,
        unassigned: bool = True,
        keep: Collection[int] = (),
    ) -> Job | None:
        """Take the next job in fair order (optionally only of one size / model), or None.

        One transaction: expired leases are recovered first (except those of ``keep``, see
        :meth:`claim_many`), then the job is marked running for ``worker_id`` with a fresh lease.
        Its attempt is counted when the engine starts it (:meth:`mark_started`), not here.
        """
        jobs = self.claim_many(worker_id, 1, width=width, height=height, model=model, unassigned=unassigned, keep=keep)
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
        keep: Collection[int] = (),
    ) -> list[Job]:
        """Claim up to ``n`` jobs in fair order in one transaction (for a batching worker).

        ``model``: take jobs for that model, and, with ``unassigned``, jobs for no model in
        particular (``Job.model`` None: the default model); upscale-only jobs whatever their
        model. ``keep``: the claimer's own jobs that it is still running; their leases are not
        recovered even if they ran out (a database outage kept the heartbeats from renewing
        them), so the claimer does not take them from itself.
        """
        now = self.clock()
        claimed: list[Job] = []
        with self._write.begin() as session:
            if self._postgres:
                # Claims take turns across processes: each reads the fair order only once the
                # claim before it has committed. Without this, a claimer that skips the row another
                # is locking takes that member's next job, and one member gets served twice in a
                # round (up to 38 jobs apart over 3,200 claims by 8 processes; BENCHMARKS.md).
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CLAIM_LOCK})
            self._recover_expired(session, now, keep)
            # Claiming serves a member and sends them to the back, so a batch goes in rounds:
            # each round takes the best waiting job of members not yet served in it.
            served_this_round: set[int] = set()
            while len(claimed) < n:
                job = self._claim_one(session, worker_id, now, served_this_round, width, height, model, unassigned)
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
            .where(Job.status == JobStatus.queued, server_not_paused())
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
        # An upscale alone (the U buttons' Subtle) runs no diffusion: it needs no model's turn.
        if model is not None and unassigned:
            query = query.where(or_(Job.model.is_(None), Job.model == model, Job.upscale_only.is_(True)))
        elif model is not None:
            query = query.where(or_(Job.model == model, Job.upscale_only.is_(True)))
        job = session.scalars(query).first()
        if job is None:
            return None
        job.status = JobStatus.running
        job.worker_id = worker_id
        job.lease_until = now + self.lease
        job.started_at = now
        job.engine_started_at = None  # set by mark_started, when the engine takes it up
        session.flush()
        return job

    def waiting_models(self) -> dict[str | None, float]:
        """Per model (None: no model named), seconds its oldest claimable queued job has waited."""
        now = self.clock()
        query = (
            select(Job.model, func.min(Job.created_at))
            .where(Job.status == JobStatus.queued, server_not_paused())
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
                update(Member).where(Member.user_id == user_id).values(last_served_at=served_at[user_id]),
                execution_options=NO_UPDATE_SYNC,
            )

    def heartbeat(self, job_id: int, worker_id: str) -> bool:
        """Extend the lease. False when the job is no longer ours (taken over, cancelled).

        A lease that ran out but was not yet recovered is still ours, and is renewed.
        """
        return self._update_running(job_id, worker_id, {"lease_until": self.clock() + self.lease})

    def mark_started(self, job_id: int, worker_id: str) -> bool:
        """The engine has begun the job (its first denoising step): count the attempt, once.

        A job that waited behind others for a place in the batch and was then handed back or
        recovered has used no attempt. False when the job is not ours any more, or already
        marked (so a retried write never counts twice).
        """
        with self._write.begin() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.worker_id == worker_id,
                    Job.status == JobStatus.running,
                    Job.engine_started_at.is_(None),
                )
                .values(attempts=Job.attempts + 1, engine_started_at=self.clock()),
                execution_options=NO_UPDATE_SYNC,
            )
            return result.rowcount == 1

    def is_cancelled(self, job_id: int) -> bool:
        with self._read.begin() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
        return status is JobStatus.cancelled

    def complete(self, job_id: int, worker_id: str, images: list[tuple[bytes, int]]) -> bool:
        """Store the result images ``(png, seed)`` and mark the job done.

        False (and nothing stored) when the job is no longer this worker's. Safe to repeat when
        the database went away before saying whether the first try committed: a job this worker
        already finished this way answers True and stores nothing again.
        """
        now = self.clock()
        with self._write.begin() as session:
            if not self._finish(session, job_id, worker_id, JobStatus.done, now, None):
                return self._finished_by(session, job_id, worker_id, JobStatus.done)
            session.add_all(
                ResultImage(job_id=job_id, index=i, png=png, seed=seed) for i, (png, seed) in enumerate(images)
            )
        return True

    def fail(self, job_id: int, worker_id: str, error: str) -> bool:
        """Mark the job failed with ``error`` (shown to the member). False if not ours.

        Safe to repeat, as :meth:`complete` is."""
        now = self.clock()
        with self._write.begin() as session:
            return self._finish(session, job_id, worker_id, JobStatus.failed, now, error) or self._finished_by(
                session, job_id, worker_id, JobStatus.failed
            )

    @staticmethod
    def _finished_by(session: Session, job_id: int, worker_id: str, status: JobStatus) -> bool:
        # _finish keeps worker_id, so a finished job still says who finished it.
        found = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == status)
        )
        return found == 1

    def release(self, job_id: int, worker_id: str) -> bool:
        """Give a job back unfinished (worker shutting down); the attempt is not counted."""
        released = self._update_running(
            job_id,
            worker_id,
            {
                "status": JobStatus.queued,
                "attempts": case((Job.engine_started_at.is_not(None), Job.attempts - 1), else_=Job.attempts),
                "worker_id": None,
                "lease_until": None,
                "started_at": None,
                "engine_started_at": None,
            },
        )
        if released:
            self._wakeup.notify()
        return released

    def _update_running(self, job_id: int, worker_id: str, values: dict[str, Any]) -> bool:
        with self._write.begin() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.running)
                .values(values),
                execution_options=NO_UPDATE_SYNC,
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
            execution_options=NO_UPDATE_SYNC,
        )
        return result.rowcount == 1

    # -- recovery -------------------------------------------------------------------------

    def recover(self, keep: Collection[int] = ()) -> int:
        """Queue again (or fail, after max_attempts) running jobs whose lease ran out, except
        ``keep`` (the caller's own jobs that it is still running)."""
        with self._write.begin() as session:
            return self._recover_expired(session, self.clock(), keep)

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

    def _recover_expired(self, session: Session, now: datetime, keep: Collection[int] = ()) -> int:
        query = select(Job.id).where(Job.status == JobStatus.running, Job.lease_until < now)
        if keep:
            query = query.where(Job.id.not_in(list(keep)))
        ids = session.scalars(query.with_for_update(skip_locked=True)).all()
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
            execution_options=NO_UPDATE_SYNC,
        ).rowcount
        queued = session.execute(
            update(Job)
            .where(*running)
            .values(status=JobStatus.queued, worker_id=None, lease_until=None, started_at=None, engine_started_at=None),
            execution_options=NO_UPDATE_SYNC,
        ).rowcount
        log.warning("recovered %d job(s): %d queued again, %d failed", failed + queued, queued, failed)
        if queued:
            self._notify(session)
        return failed + queued

    def fail_unknown_models(self, known: Collection[str]) -> list[int]:
        """Fail the queued jobs that ask for a model not in ``known`` (the bot's configured models:
        one was removed or renamed since they were queued), each with a reason the member sees,
        instead of leaving them in line for a model nobody serves. Returns their ids."""
        now = self.clock()
        unknown = (Job.status == JobStatus.queued, Job.model.is_not(None), Job.model.not_in(list(known)))
        with self._read.begin() as session:  # usually none: then no write, which would wait on a lock
            if session.scalar(select(Job.id).where(*unknown).limit(1)) is None:
                return []
        with self._write.begin() as session:
            ids = session.scalars(select(Job.id).where(*unknown).with_for_update(skip_locked=True)).all()
            for job in session.scalars(select(Job).where(Job.id.in_(ids))):
                job.status, job.finished_at = JobStatus.failed, now
                job.error = (
                    f"The model “{job.model}” is not offered here any more. Run the command again "
                    f"and pick one of: {', '.join(known)}."
                )
        if ids:
            log.warning("failed %d queued job(s) for models no longer configured: %s", len(ids), list(ids))
        return list(ids)
