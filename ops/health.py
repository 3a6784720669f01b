"""Named health checks of one process, for ``GET /healthz``.

A check is a callable that says True when its part works: a background task that must be
running (the queue runner, delivery), the database answering. The process adds them once at
start; :meth:`Health.report` asks them all when a probe comes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("ops")


class Health:
    """The checks of one process, by name; ``report()`` passes when every one passes."""

    def __init__(self) -> None:
        self._checks: dict[str, Callable[[], bool]] = {}
        self._raising: set[str] = set()  # logged when a check starts raising, not at every probe

    def add_check(self, name: str, check: Callable[[], bool]) -> None:
        """Add ``check``: True means healthy; False or an exception fails ``name``. It runs on
        a thread of the endpoint, so it may block (a database query)."""
        if name in self._checks:
            raise ValueError(f"health check {name!r} is already added")
        self._checks[name] = check

    def add_task(self, name: str, get_task: Callable[[], asyncio.Task | None]) -> None:
        """Fail ``name`` when the task is missing or has ended. ``get_task`` returns the task as
        it is now, so a supervisor that restarts the task is followed to its new one."""

        def running() -> bool:
            task = get_task()
            return task is not None and not task.done()

        self.add_check(name, running)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._checks)

    def report(self) -> tuple[bool, dict[str, bool]]:
        """``(all passed, {name: passed})``, asking every check (a failing one does not hide the rest)."""
        results = {name: self._passes(name, check) for name, check in self._checks.items()}
        return all(results.values()), results

    def _passes(self, name: str, check: Callable[[], bool]) -> bool:
        try:
            passed = bool(check())
        except Exception:
            if name not in self._raising:
                log.warning("health check %s raised; it fails until it answers again", name, exc_info=True)
            self._raising.add(name)
            return False
        self._raising.discard(name)
        return passed
