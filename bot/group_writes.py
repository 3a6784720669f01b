"""The writes on a command's path, stored in groups by one thread.

The bot tries to store a job before it answers Discord (it waits a little for the commit; past
that the journal, :mod:`bot.journal`, stands for the job), so the answer usually waits on a
database commit. On SQLite every commit syncs the disk (``synchronous=FULL``)
and takes the process's write turn: one commit per command would queue a burst of commands
behind each other and behind the runner's writes. Instead one writing thread takes every write
waiting when it is free and stores each kind in one transaction (a group commit), so 100
commands a second cost a few commits. The kinds go in order of urgency: new jobs hold up an
acknowledgement; status message ids do not. On PostgreSQL the thread's statements time out
(:data:`STATEMENT_TIMEOUT`): a stalled server fails them, and the journal takes over.
Each job is still checked on its own (the member's pending limit), and a refusal reaches only
that member.

The thread is the writer's own, not asyncio's shared pool: a command's write never waits behind
background work, and background work (DNS lookups included) never waits behind these.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from bot.grouped import GroupedThread
from db.models import Job
from db.queue import Queue
from db.session import statement_timeout_in_this_thread

#: The kinds of write, most urgent first.
ENQUEUE, STATUS = "enqueue", "status"
#: PostgreSQL: seconds a statement of the command path may take before it fails.
STATEMENT_TIMEOUT = 5.0


class GroupWriter:
    def __init__(self, queue: Queue) -> None:
        # Each takes the payloads of one kind and stores them in one transaction; a list back
        # holds one result (or QueueError) per payload, None means "stored".
        self._stores: dict[str, Callable[[list[Any]], list[Any] | None]] = {
            ENQUEUE: lambda many: _with_places(queue, queue.enqueue_many(many)),
            STATUS: queue.set_status_messages,
        }
        self._writer = GroupedThread(
            "sdbot-writes",
            self._store_group,
            initializer=statement_timeout_in_this_thread,
            initargs=(STATEMENT_TIMEOUT,),
        )

    async def enqueue(self, **fields: Any) -> tuple[Job, int | None]:
        """Store one job; it and its place in line (raises the QueueError that refused it)."""
        return await self._write(ENQUEUE, fields)

    async def set_status_message(self, job_id: int, channel_id: int, message_id: int) -> None:
        await self._write(STATUS, (job_id, channel_id, message_id))

    async def _write(self, kind: str, payload: Any) -> Any:
        return await self._writer.submit((kind, payload))

    def _store_group(self, group: list[tuple[str, Any]]) -> Iterator[tuple[int, Any]]:
        """Each kind's payloads in one transaction, most urgent kind first, its waiters told as soon
        as it is stored: one result (or QueueError) a payload."""
        for kind, store in self._stores.items():
            at = [i for i, (k, _) in enumerate(group) if k == kind]
            if not at:
                continue
            try:
                stored = store([group[i][1] for i in at]) or [None] * len(at)
            except Exception as error:  # noqa: BLE001 - this kind's transaction failed: its waiters are told
                stored = [error] * len(at)
            yield from zip(at, stored, strict=True)

    def close(self) -> None:
        self._writer.shutdown(wait=False)


def _with_places(queue: Queue, results: list[Any]) -> list[Any]:
    """Each stored job with its place in line, found for the whole group in one pass."""
    places = queue.positions([job.id for job in results if isinstance(job, Job)])
    return [(job, places[job.id]) if isinstance(job, Job) else job for job in results]
