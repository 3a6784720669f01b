"""Waking waiting workers: in this process a generation counter under a condition; across
processes, on PostgreSQL, LISTEN/NOTIFY (a NOTIFY is delivered when its transaction commits).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "sdbot_new_job"


class Wakeup:
    """Wakes the waiting workers of one database in this process (a generation counter)."""

    _by_url: dict[str, Wakeup] = {}
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.generation = 0
        self.changed = threading.Condition()

    @classmethod
    def for_engine(cls, engine: Engine) -> Wakeup:
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



class WakeUp:
    """The queue's wake-up methods (a mixin of :class:`db.queue.Queue`)."""

    engine: Engine
    _postgres: bool
    _write: sessionmaker
    _wakeup: Wakeup
    _seen: int
    _listener: Any

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
