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

from sqlalchemy import func, insert, select

from db.errors import AlreadyFinished, JobNotFound, NotYours, PendingLimitExceeded, QueueError, StorageFull
from db.faults import describe, is_storage_full
from db.models import FINISHED, PENDING, Job, JobStatus, Member, ResultImage
from db.queue.claims import ClaimsAndLeases
from db.queue.deliveries import Deliveries
from db.queue.order import place_in_line, places_in_line

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
        (result,) = self._enqueue_many([fields])
        if isinstance(result, QueueError):
            raise result
        return result

    def enqueue_many(self, many: list[dict[str, Any]]) -> list[Job | QueueError]:
        """Queue several jobs in one transaction (one commit, one disk sync: a group commit);
        each gets its job or the QueueError that refused it, in order. A whole failure raises
        (StorageFull as for :meth:`enqueue`)."""
        return self._minding_storage(lambda: self._enqueue_many(many))

    def _enqueue_many(self, many: list[dict[str, Any]]) -> list[Job | QueueError]:
        """A few statements for the whole group, not a few per job: the bot stores a job before
        it acknowledges the command, so at 100 commands a second this is on every member's path.

        The members' rows are locked (PostgreSQL; SQLite already holds the write lock) before
        their pending jobs are counted, so two concurrent groups cannot both pass a limit.

        One interaction has one job: a row whose ``interaction_token`` has a job already gets that
        job back, not a second one (the bot may store a journaled command again after a failure
        whose commit did happen, or after a restart)."""
        now = self.clock()
        rows = [
            {"seed": secrets.randbelow(2**32), **fields, "status": JobStatus.queued, "attempts": 0, "created_at": now}
            for fields in many
        ]
        members = sorted({row["requester_id"] for row in rows})
        with self._write.begin() as session:
            self._ensure_members(session, members)
            session.execute(select(Member.user_id).where(Member.user_id.in_(members)).with_for_update())
            # After the members' locks: a concurrent group storing the same interaction has committed.
            stored = self._jobs_of_interactions(session, [row.get("interaction_token") for row in rows])
            pending = dict(
                session.execute(
                    select(Job.requester_id, func.count())
                    .where(Job.requester_id.in_(members), Job.status.in_(PENDING))
                    .group_by(Job.requester_id)
                ).all()
            )
            results: list[Job | QueueError | int | None] = []  # int: the same job as that row's
            accepted: list[dict[str, Any]] = []
            first: dict[str, int] = {}
            for n, row in enumerate(rows):
                member, token = row["requester_id"], row.get("interaction_token")
                if token in stored or token in first:
                    results.append(stored.get(token, first.get(token)))
                    continue
                if pending.get(member, 0) >= self.pending_limit:
                    results.append(PendingLimitExceeded(pending[member], self.pending_limit))
                    continue
                pending[member] = pending.get(member, 0) + 1
                results.append(None)
                accepted.append(row)
                if token is not None:
                    first[token] = n
            jobs = iter(self._insert_jobs(session, accepted))
            self._notify(session)
        self._wakeup.notify()
        made: list[Job | QueueError] = []
        for result in results:
            made.append(next(jobs) if result is None else made[result] if isinstance(result, int) else result)
        return made

    @staticmethod
    def _jobs_of_interactions(session: Any, tokens: list[str | None]) -> dict[str, Job]:
        wanted = [token for token in tokens if token is not None]
        if not wanted:
            return {}
        return {
            job.interaction_token: job for job in session.scalars(select(Job).where(Job.interaction_token.in_(wanted)))
        }

    def jobs_for_interactions(self, tokens: list[str]) -> dict[str, int]:
        """The id of the job stored for each of these interaction tokens that has one (a read)."""
        if not tokens:
            return {}
        with self._read.begin() as session:
            return dict(
                session.execute(select(Job.interaction_token, Job.id).where(Job.interaction_token.in_(tokens))).all()
            )

    @staticmethod
    def _insert_jobs(session: Any, rows: list[dict[str, Any]]) -> list[Job]:
        """One INSERT ... RETURNING per set of columns (SQLAlchemy batches the rows), in order."""
        if not rows:
            return []
        by_columns: dict[frozenset[str], list[int]] = {}
        for n, row in enumerate(rows):
            by_columns.setdefault(frozenset(row), []).append(n)
        jobs: list[Job | None] = [None] * len(rows)
        for indices in by_columns.values():
            inserted = session.scalars(
                insert(Job).returning(Job, sort_by_parameter_order=True), [rows[n] for n in indices]
            ).all()
            for n, job in zip(indices, inserted, strict=True):
                jobs[n] = job
        return jobs  # type: ignore[return-value]

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

    def positions(self, job_ids: list[int]) -> dict[int, int | None]:
        """:meth:`position` of several jobs, in one pass over the line."""
        if not job_ids:
            return {}
        with self._read.begin() as session:
            return places_in_line(session, job_ids)

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
