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

import logging
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import func, select

from db.errors import AlreadyFinished, JobNotFound, NotYours, PendingLimitExceeded, QueueError, StorageFull
from db.faults import describe, is_storage_full
from db.models import FINISHED, PENDING, Job, JobStatus, Member, ResultImage
from db.queue.claims import ClaimsAndLeases
from db.queue.deliveries import Deliveries
from db.queue.order import place_in_line

log = logging.getLogger(__name__)
T = TypeVar("T")


class Queue(ClaimsAndLeases, Deliveries):
    """The job queue over one database (SQLite or PostgreSQL); see the module docstring."""

    _storage_full = False  # said in the log since the last enqueue that went through

    # -- enqueue --------------------------------------------------------------------------

    def enqueue(self, **fields: Any) -> Job:
        """Queue a job (Job's columns as keywords; a random seed when none is given).

        Raises PendingLimitExceeded when the member already has ``pending_limit`` jobs
        queued or running, and StorageFull when the database's disk is full (logged once, at
        error level, until an enqueue succeeds again: not once per command).
        """
        return self._minding_storage(lambda: self._enqueue(fields))

    def _enqueue(self, fields: dict[str, Any]) -> Job:
        with self._write.begin() as session:
            job = self._add_job(session, fields)
            self._notify(session)
        self._wakeup.notify()
        return job

    def enqueue_many(self, many: list[dict[str, Any]]) -> list[Job | QueueError]:
        """Queue several jobs in one transaction (one commit, one disk sync: a group commit);
        each gets its job or the QueueError that refused it, in order. A whole failure raises
        (StorageFull as for :meth:`enqueue`)."""
        return self._minding_storage(lambda: self._enqueue_many(many))

    def _enqueue_many(self, many: list[dict[str, Any]]) -> list[Job | QueueError]:
        results: list[Job | QueueError] = []
        with self._write.begin() as session:
            for fields in many:
                try:
                    with session.begin_nested():
                        results.append(self._add_job(session, dict(fields)))
                except QueueError as refused:
                    results.append(refused)
            self._notify(session)
        self._wakeup.notify()
        return results

    def _minding_storage(self, write: Callable[[], T]) -> T:
        """``write()``; a full disk becomes StorageFull, said in the log once until a write succeeds."""
        try:
            result = write()
        except Exception as error:
            if not is_storage_full(error):
                raise
            if not self._storage_full:
                self._storage_full = True
                log.error(
                    "the database's storage is full (%s): new jobs are refused until there is room", describe(error)
                )
            raise StorageFull() from error
        if self._storage_full:
            self._storage_full = False
            log.warning("the database's storage has room again: jobs are queued again")
        return result

    def _add_job(self, session: Any, fields: dict[str, Any]) -> Job:
        requester_id = fields["requester_id"]
        fields.setdefault("seed", secrets.randbelow(2**32))
        fields.update(status=JobStatus.queued, attempts=0, created_at=self.clock())
        self._ensure_member(session, requester_id)
        # Lock the member's row so two concurrent enqueues cannot both pass the limit
        # (PostgreSQL; SQLite already holds the write lock).
        session.execute(select(Member.user_id).where(Member.user_id == requester_id).with_for_update())
        pending = session.scalar(
            select(func.count()).select_from(Job).where(Job.requester_id == requester_id, Job.status.in_(PENDING))
        )
        if pending >= self.pending_limit:
            raise PendingLimitExceeded(pending, self.pending_limit)
        job = Job(**fields)
        session.add(job)
        session.flush()
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
                raise AlreadyFinished(f"Job #{job_id} is already {job.status.name}; nothing to cancel.")
            job.status = JobStatus.cancelled
            job.finished_at = self.clock()
            job.lease_until = None
            job.error = "Cancelled by the requester." if job.requester_id == user_id else ("Cancelled by a moderator.")
        return job

    def position(self, job_id: int) -> int | None:
        """1-based place in line in fair order, not counting jobs of paused servers (they wait
        outside the line); None when the job is not queued."""
        with self._read.begin() as session:
            return place_in_line(session, job_id)

    def get(self, job_id: int) -> Job | None:
        with self._read.begin() as session:
            return session.get(Job, job_id)

    def images(self, job_id: int) -> list[ResultImage]:
        with self._read.begin() as session:
            query = select(ResultImage).where(ResultImage.job_id == job_id).order_by(ResultImage.index)
            return list(session.scalars(query))

    def pending_for(self, user_id: int) -> list[Job]:
        """The member's queued and running jobs, oldest first."""
        with self._read.begin() as session:
            query = select(Job).where(Job.requester_id == user_id, Job.status.in_(PENDING)).order_by(Job.id)
            return list(session.scalars(query))
