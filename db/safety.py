"""What the image check records: each job's verdict and what delivery did with it, members'
reports, moderators' decisions, and the list ``/server review`` shows.

Every flagged result that was spoilered, blurred or withheld, every hiding by reports and every
moderator's decision also writes an :class:`~db.models.AuditEntry`, so ``/server log`` shows
them beside the settings' changes. Entries the image check made itself have actor 0.
Like :class:`db.community.Community`, every method is one short transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from db.clock import utcnow
from db.models import AuditEntry, Job, JobStatus, PostedMessage, ResultReport
from db.session import session_makers

#: The audit log's actor for what the image check did by itself.
IMAGE_CHECK = 0
#: Actions that hid a result from a channel (``jobs.safety_action``).
HIDING = ("spoiler", "blur", "withheld")
#: Reviews still waiting for a moderator; restored and deleted ones are decided.
UNDECIDED = (None, "reported")


@dataclass(frozen=True)
class ReviewEntry:
    """One line of ``/server review``."""

    job_id: int
    requester_id: int
    channel_id: int | None
    label: str | None
    score: float | None
    action: str | None
    review: str | None
    reports: int
    finished_at: datetime | None


class SafetyRecords:
    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.clock = clock
        self._postgres = engine.dialect.name == "postgresql"
        self._write, self._read = session_makers(engine)

    def record_verdicts(self, verdicts: Iterable[tuple[int, bool, str | None, float | None]]) -> None:
        """Store ``(job id, flagged, label, score)`` for each job, in one transaction."""
        with self._write.begin() as session:
            for job_id, flagged, label, score in verdicts:
                session.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(safety_flagged=flagged, safety_label=label, safety_score=score),
                    execution_options={"synchronize_session": False},
                )

    def record_action(self, job: Job, action: str) -> int:
        """What delivery did with a job's result; audited when it hid it. Returns the requester's
        withheld results on this server (for strikes)."""
        now = self.clock()
        with self._write.begin() as session:
            session.execute(
                update(Job).where(Job.id == job.id).values(safety_action=action),
                execution_options={"synchronize_session": False},
            )
            if action in HIDING and job.guild_id is not None:
                detail = f"job #{job.id} {action} ({job.safety_label or 'flagged'}"
                detail += f" {job.safety_score:.2f})" if job.safety_score is not None else ")"
                self._audit(session, job.guild_id, IMAGE_CHECK, "image check", detail, job.requester_id, now)
            if job.guild_id is None:
                return 0
            return session.scalar(
                select(func.count())
                .select_from(Job)
                .where(
                    Job.guild_id == job.guild_id, Job.requester_id == job.requester_id, Job.safety_action == "withheld"
                )
            )

    def report(self, job_id: int, user_id: int) -> tuple[bool, int]:
        """A member reports a result: (whether this is their first report of it, reports in all)."""
        insert = pg_insert if self._postgres else sqlite_insert
        with self._write.begin() as session:
            added = session.execute(
                insert(ResultReport)
                .values(job_id=job_id, user_id=user_id, created_at=self.clock())
                .on_conflict_do_nothing(index_elements=["job_id", "user_id"])
                .returning(ResultReport.user_id)
            ).first()
            count = session.scalar(select(func.count()).select_from(ResultReport).where(ResultReport.job_id == job_id))
            return added is not None, count

    def set_review(self, job: Job, review: str, actor_id: int) -> bool:
        """Record a review (``reported`` by members, ``restored`` or ``deleted`` by a moderator);
        False when it was already so (a second hiding, a double click)."""
        now = self.clock()
        with self._write.begin() as session:
            changed = session.execute(
                update(Job).where(Job.id == job.id, or_(Job.safety_review.is_(None), Job.safety_review != review))
                .values(safety_review=review),
                execution_options={"synchronize_session": False},
            ).rowcount  # fmt: skip
            if changed and job.guild_id is not None:
                self._audit(session, job.guild_id, actor_id, review, f"job #{job.id}", job.requester_id, now)
            return bool(changed)

    def messages(self, job_id: int) -> list[tuple[int, int]]:
        """(channel id, message id) of every message that shows the job's result."""
        with self._read.begin() as session:
            rows = session.execute(
                select(PostedMessage.channel_id, PostedMessage.message_id).where(PostedMessage.job_id == job_id)
            )
            return [(channel, message) for channel, message in rows]

    def to_review(self, guild_id: int, limit: int = 15) -> list[ReviewEntry]:
        """The server's flagged and reported results no moderator has decided on, newest first."""
        reports = select(ResultReport.job_id, func.count().label("n")).group_by(ResultReport.job_id).subquery("reports")
        with self._read.begin() as session:
            rows = session.execute(
                select(Job, func.coalesce(reports.c.n, 0))
                .outerjoin(reports, reports.c.job_id == Job.id)
                .where(
                    Job.guild_id == guild_id,
                    Job.status == JobStatus.done,
                    or_(Job.safety_action.in_(HIDING), Job.safety_review == "reported", reports.c.n > 0),
                    or_(Job.safety_review.is_(None), Job.safety_review == "reported"),
                )
                .order_by(Job.id.desc())
                .limit(limit)
            ).all()
            return [
                ReviewEntry(
                    job.id,
                    job.requester_id,
                    job.channel_id,
                    job.safety_label,
                    job.safety_score,
                    job.safety_action,
                    job.safety_review,
                    n,
                    job.finished_at,
                )
                for job, n in rows
            ]

    @staticmethod
    def _audit(session, guild_id: int, actor_id: int, action: str, new: str, target: int, now: datetime) -> None:
        session.add(
            AuditEntry(
                guild_id=guild_id,
                actor_id=actor_id,
                created_at=now,
                action=action,
                target_id=target,
                old_value=None,
                new_value=new,
            )
        )
