"""Background tasks that delivery starts, kept referenced until they end, their failures logged.

asyncio holds tasks only weakly: a task nobody references may be garbage-collected before it
finishes (the documentation of ``asyncio.create_task`` asks callers to keep a reference). So
every task delivery starts is held in a set until its done-callback removes it and logs any
error with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from typing import Any

log = logging.getLogger(__name__)


class BackgroundTasks:
    """The tasks in flight; each leaves the set when it ends."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        log_failure(task)

    def __contains__(self, task: object) -> bool:
        return task in self._tasks

    def __iter__(self) -> Iterator[asyncio.Task]:
        return iter(set(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)


def log_failure(task: asyncio.Task) -> None:
    """Done-callback: log a task that ended with an error, with the traceback."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())
