"""Storing new jobs in groups, so that the job can exist before its interaction is acknowledged.

The bot stores a job before it answers Discord (no "thinking…" without a job behind it), so the
answer waits on a database commit. On SQLite every commit syncs the disk (``synchronous=FULL``),
which takes milliseconds: one commit per command would queue a burst of commands behind each
other. Instead one writing thread takes every job waiting when it is free and stores them in one
transaction (``Queue.enqueue_many``: a group commit), so 100 commands a second cost a few commits.
Each job is still checked on its own (the member's pending limit), and a refusal reaches only
that member.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

from db.models import Job
from db.queue import Queue


class GroupEnqueuer:
    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self._lock = threading.Lock()
        self._waiting: list[tuple[dict[str, Any], asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._writing = False
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sdbot-writes")

    async def enqueue(self, **fields: Any) -> Job:
        """Store one job (raises the QueueError that refused it)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._waiting.append((fields, future, loop))
            start, self._writing = not self._writing, True
        if start:
            self._thread.submit(self._write_all)
        return await future

    def _write_all(self) -> None:
        while True:
            with self._lock:
                group, self._waiting = self._waiting, []
                if not group:
                    self._writing = False
                    return
            try:
                results: list[Any] = self.queue.enqueue_many([fields for fields, _, _ in group])
            except Exception as error:  # noqa: BLE001 - the whole group failed: each command is told
                results = [error] * len(group)
            for (_, future, loop), result in zip(group, results, strict=True):
                loop.call_soon_threadsafe(_settle, future, result)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the command gave up waiting (the bot is closing)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
