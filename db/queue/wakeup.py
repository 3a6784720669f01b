"""Waking waiting workers: in this process a generation counter under a condition; across
processes, on PostgreSQL, LISTEN/NOTIFY (a NOTIFY is delivered when its transaction commits).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from db.faults import describe

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "sdbot_new_job"


async def woken_within(wake: asyncio.Event, timeout: float) -> bool:
    """Clear ``wake``, then wait until it is set again or ``timeout`` seconds pass; True if woken.

    The loop of every poller that can also be woken early (the queue runner, delivery).
    ``asyncio.timeout``, not ``wait_for``: on 3.11 ``wait_for`` can swallow a cancel.
    """
    wake.clear()
    try:
        async with asyncio.timeout(timeout):
            await wake.wait()
    except TimeoutError:
        return False
    return True


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
    _listen_lost = False  # said so in the log; said again only once it was back

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
        except (psycopg.Error, OSError) as error:
            if not self._listen_lost:  # once per outage, not at every try to listen again
                self._listen_lost = True
                log.warning("LISTEN connection failed (%s); polling until it is back", describe(error))
            self.close()
            self._wakeup.wait(self._seen, timeout)
            return False
        if self._listen_lost:
            self._listen_lost = False
            log.info("LISTEN connection back")
        return woken

    def _listen(self) -> Any:
        if self._listener is None or self._listener.closed:
            url = self.engine.url.set(drivername="postgresql")
            conninfo = url.render_as_string(hide_password=False)
            self._listener = psycopg.connect(conninfo, autocommit=True, connect_timeout=10)
            self._listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return self._listener

    def close(self) -> None:
        """Close the LISTEN connection, if any (the engine belongs to the caller)."""
        if self._listener is not None:
            try:
                self._listener.close()
            except (psycopg.Error, OSError):  # a connection the server already dropped
                pass
            self._listener = None
