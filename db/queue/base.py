"""What every part of the queue shares: its database, its settings and its clock."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.clock import utcnow
from db.models import Member
from db.queue.wakeup import WakeUp, Wakeup
from db.session import session_makers

NO_UPDATE_SYNC = {"synchronize_session": False}


class QueueBase(WakeUp):
    """The state of a :class:`db.queue.Queue`; its methods live in the mixins of this package."""

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
        self._write, self._read = session_makers(engine)
        self._wakeup = Wakeup.for_engine(engine)
        self._seen = self._wakeup.generation
        self._listener = None  # psycopg.Connection LISTENing, made by wait_for_jobs

    def _ensure_member(self, session: Session, user_id: int) -> None:
        self._ensure_members(session, [user_id])

    def _ensure_members(self, session: Session, user_ids: list[int]) -> None:
        """Each member's row (the fair order's bookkeeping), made if missing, in one statement."""
        insert = pg_insert if self._postgres else sqlite_insert
        session.execute(
            insert(Member)
            .values([{"user_id": user_id, "last_served_at": None} for user_id in user_ids])
            .on_conflict_do_nothing(index_elements=["user_id"])
        )
