"""Delivery records: which finished jobs still have to be posted, and where each was posted
(so a restart never posts twice, and a 🔁 reaction finds its job)."""

from __future__ import annotations

from sqlalchemy import select, update

from db.models import FINISHED, Job, PostedMessage
from db.queue.base import NO_UPDATE_SYNC, QueueBase


class Deliveries(QueueBase):
    """The delivery side of :class:`db.queue.Queue`."""

    def set_status_message(self, job_id: int, channel_id: int, message_id: int) -> None:
        """Remember the message that shows the job's place in line / progress."""
        self.set_status_messages([(job_id, channel_id, message_id)])

    def set_status_messages(self, messages: list[tuple[int, int, int]]) -> None:
        """:meth:`set_status_message` for several ``(job_id, channel_id, message_id)``, in one transaction."""
        if not messages:
            return
        with self._write.begin() as session:
            session.execute(  # ORM bulk UPDATE by primary key: one executemany
                update(Job),
                [
                    {"id": job, "status_channel_id": channel, "status_message_id": message}
                    for job, channel, message in messages
                ],
            )

    def undelivered(self) -> list[Job]:
        """Finished jobs (done, failed, cancelled) whose result or notice is not posted yet."""
        with self._read.begin() as session:
            query = (
                select(Job).where(Job.status.in_(FINISHED), Job.posted_at.is_(None)).order_by(Job.finished_at, Job.id)
            )
            return list(session.scalars(query))

    def mark_posted(self, job_id: int, channel_id: int, message_ids: list[int]) -> None:
        """Record where the job was posted and that it was. Safe to repeat."""
        now = self.clock()
        with self._write.begin() as session:
            known = set(
                session.scalars(select(PostedMessage.message_id).where(PostedMessage.message_id.in_(message_ids)))
            )
            session.add_all(
                PostedMessage(job_id=job_id, channel_id=channel_id, message_id=m, created_at=now)
                for m in dict.fromkeys(message_ids)
                if m not in known
            )
            session.execute(
                update(Job).where(Job.id == job_id, Job.posted_at.is_(None)).values(posted_at=now),
                execution_options=NO_UPDATE_SYNC,
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
