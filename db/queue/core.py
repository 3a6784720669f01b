"""The job queue: enqueue, fair claim with leases, complete/fail/cancel, position, delivery.

The parts live in this package, one job each: :mod:`~db.queue.order` (the fair order),
:mod:`~db.queue.claims` (claims and leases, finishing, recovery), :mod:`~db.queue.deliveries`
(delivery records) and :mod:`~db.queue.wakeup` (waking waiting workers). :class:`Queue` puts them
together with enqueueing, cancelling and the member's queries.

Every method runs its own short transaction and returns detached snapshots
(``expire_on_commit=False``), safe to read in any thread. A Queue is thread-safe, except
:meth:`Queue.wait_for_jobs`, which belongs to one worker thread.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import func, select

from db.errors import AlreadyFinished, JobNotFound, NotYours, PendingLimitExceeded
from db.models import FINISHED, PENDING, Job, JobStatus, Member, ResultImage
from db.queue.claims import ClaimsAndLeases
from db.queue.deliveries import Deliveries
from db.queue.order import fair_order


class Queue(ClaimsAndLeases, Deliveries):
    """The job queue over one database (SQLite or PostgreSQL); see the module docstring."""

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

