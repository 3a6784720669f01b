"""Database faults that are waited out, not given up on: the server restarting or unreachable, a
SQLite write lock held past the busy timeout, a full disk.

A background task that meets one of these (:func:`is_database_fault`) waits (:class:`Backoff`:
0.5 s doubling to 30 s) and tries again, for as long as it takes. :class:`DatabaseHealth` says
once in the log that the database went away and once that it is back, not at every retry, and
answers "is it reachable now?" for health checks.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from sqlalchemy import exc as sa_exc

log = logging.getLogger(__name__)
T = TypeVar("T")

#: What SQLite says when the fault is the storage's or another writer's, not our SQL's.
_SQLITE_TRANSIENT = ("locked", "busy", "disk", "full", "readonly", "read-only", "unable to open", "i/o")


def is_database_fault(error: BaseException) -> bool:
    """Whether ``error`` is the database being unavailable (worth waiting out), not a bug."""
    if isinstance(error, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return True  # InvalidatePoolError is a DisconnectionError; TimeoutError: the pool's
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig if error.orig is not None else error
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
        return True  # connection lost or refused, server shutting down, disk full, deadlock
    if isinstance(error, sqlite3.OperationalError):
        return any(word in str(error).lower() for word in _SQLITE_TRANSIENT)
    return False


def is_storage_full(error: BaseException) -> bool:
    """SQLITE_FULL ("database or disk is full") or PostgreSQL's DiskFull (53100)."""
    orig = getattr(error, "orig", None) or error
    if isinstance(orig, psycopg.errors.DiskFull):
        return True
    return isinstance(orig, sqlite3.OperationalError) and "database or disk is full" in str(orig)


def describe(error: BaseException) -> str:
    """One line saying what went wrong, without SQLAlchemy's statement and background link."""
    orig = getattr(error, "orig", None) or error
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


class Backoff:
    """Delays between retries: ``first`` seconds, doubling up to ``cap``; :meth:`reset` on success."""

    def __init__(self, first: float = 0.5, cap: float = 30.0) -> None:
        self.first, self.cap = first, cap
        self._next = first

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


class DatabaseHealth:
    """Whether the database answered the last time it was asked; logs the changes, once each."""

    def __init__(self, logger: logging.Logger = log, *, quiet: bool = False) -> None:
        """``quiet``: the changes at DEBUG level only (another process of the same machine, the
        bot, says them already)."""
        self._reachable = True
        self._lock = threading.Lock()
        self._log = logger
        self._gone_level = logging.DEBUG if quiet else logging.ERROR
        self._back_level = logging.DEBUG if quiet else logging.WARNING

    @property
    def reachable(self) -> bool:
        return self._reachable

    def failed(self, error: BaseException) -> None:
        with self._lock:
            if not self._reachable:
                return
            self._reachable = False
        self._log.log(self._gone_level, "database unreachable (%s); retrying until it is back", describe(error))

    def succeeded(self) -> None:
        with self._lock:
            if self._reachable:
                return
            self._reachable = True
        self._log.log(self._back_level, "database reachable again")


def until_reachable(call: Callable[[], T], health: DatabaseHealth, backoff: Backoff | None = None) -> T:
    """``call()``, retried while it meets a database fault (for start-up, in a plain thread)."""
    backoff = backoff or Backoff()
    while True:
        try:
            result = call()
        except Exception as error:
            if not is_database_fault(error):
                raise
            health.failed(error)
            time.sleep(backoff.next())
            continue
        health.succeeded()
        return result
