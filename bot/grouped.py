"""One thread that does work in groups: whatever waits when it is free goes in one flush.

The command path's database writes (:mod:`bot.group_writes`) and the interaction journal's
appends (:mod:`bot.journal`) both want this: a burst of commands costs a few commits or fsyncs,
not one each, and no command's work waits behind asyncio's shared pool. ``flush`` gets the
waiting items in arrival order and yields ``(index, result)`` as each is done (a result that is
an exception is raised to its waiter; a waiter is told as soon as its part is done, so the urgent
kind of write need not wait for the rest); an item left without a result gets None, or, when
``flush`` raises, that error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterable
from typing import Any


class GroupedThread:
    def __init__(self, name: str, flush: Callable[[list[Any]], Iterable[tuple[int, Any]]], **executor: Any) -> None:
        self._flush = flush
        self._lock = threading.Lock()
        self._waiting: list[tuple[Any, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._working = False
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name, **executor)

    async def submit(self, item: Any) -> Any:
        """``item``'s result, once the group it went in is flushed (raises what the flush raised)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._waiting.append((item, future, loop))
            start, self._working = not self._working, True
        if start:
            self._thread.submit(self._run)
        return await future

    def _run(self) -> None:
        while True:
            with self._lock:
                group, self._waiting = self._waiting, []
                if not group:
                    self._working = False
                    return
            pending = dict(enumerate(group))
            outcome: BaseException | None = None
            try:
                for index, result in self._flush([item for item, _, _ in group]):
                    _, future, loop = pending.pop(index)
                    loop.call_soon_threadsafe(_settle, future, result)
            except Exception as error:  # noqa: BLE001 - the rest of the group failed: each waiter is told
                outcome = error
            for _, future, loop in pending.values():
                loop.call_soon_threadsafe(_settle, future, outcome)

    def shutdown(self, *, wait: bool) -> None:
        self._thread.shutdown(wait=wait, cancel_futures=not wait)


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the command gave up waiting (the bot is closing)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
