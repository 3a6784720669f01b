"""Interactions acknowledged before their job is stored: queued or answered from the journal.

A command is journaled (:mod:`bot.journal`) before it is acknowledged, so the acknowledgement
never waits on the database. Usually its job is stored a few milliseconds later and the entry is
closed. When the database does not answer (a write lock held past the busy timeout, PostgreSQL
down), the command's coroutine hands the entry here and tells the member, in one line, that the
job is saved and will be queued; a bot killed meanwhile finds the entry in the journal when it
starts. :class:`PendingAcks` replays them in the background, retrying while the database is
away (0.5 s doubling to 5 s, and at once when a store succeeds elsewhere):

* an entry whose job is stored (the failure came after the commit, or the crash after the
  enqueue) is closed;
* an entry with a request is queued from it (``Queue.enqueue_many`` stores one job per
  interaction token, whoever asks twice); its "thinking…" message becomes the job's status;
* an entry of a previous run whose interaction was never acknowledged (Discord showed "did not
  respond") is dropped, not queued: nobody expects that job;
* an entry with no request (acknowledged while its checks ran) is answered "the bot restarted";
* an entry whose token is about to run out (Discord's 15 minutes) is answered "not queued".

Nothing here waits in the start-up path: a locked or absent database must not keep the bot off
the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import discord
from sqlalchemy import Engine

from bot.delivery.errors import permanent
from bot.journal import Entry, InteractionJournal, Request
from db.errors import QueueError
from db.faults import Backoff, DatabaseHealth, is_database_fault
from db.models import Job
from db.queue import Queue, woken_within
from db.state import StateStore

log = logging.getLogger(__name__)

#: Discord's interaction tokens last 15 minutes; a little less, to be sure an answer can land.
TOKEN_LIFETIME = timedelta(minutes=14)
#: An entry still without its job this long before its token runs out is answered "not queued".
GIVE_UP_BEFORE = timedelta(minutes=1)
RESTARTED = "⚠️ The bot restarted before your job was queued, so nothing was queued. Please run the command again."
SAVED = "⏳ The bot's database is not answering right now; your job is saved and will be queued as soon as it is back."
NOT_SAVED = "⚠️ The bot's database is not answering right now, so your job was not queued; try again in a minute."
TOO_LONG = "⚠️ The bot's database did not come back in time, so your job was not queued. Please run the command again."
#: The records of interactions kept in the database before the journal (answered once).
OLD_PREFIX = "ack:"

Store = Callable[[Entry], Awaitable[tuple[Job, int | None]]]
Announce = Callable[[Job, str | None, int | None], Awaitable[None]]


@dataclass
class _Waiting:
    entry: Entry
    interaction: discord.Interaction | None = None  # this run's; None: a previous run's
    message_id: int | None = None  # the "thinking…" message, the job's status to be
    acknowledged: bool | None = None  # None: not known (a previous run's)


class PendingAcks:
    def __init__(self, state: StateStore, engine: Engine) -> None:
        self.state = state
        self.journal: InteractionJournal | None = None
        self._waiting: dict[int, _Waiting] = {}
        self._client: discord.Client | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @staticmethod
    def entry(interaction: discord.Interaction, now: datetime, request: Request | None = None) -> Entry:
        """The journal entry of ``interaction`` (with the request to queue, if there is one yet)."""
        return Entry(interaction.id, interaction.application_id, interaction.token, now + TOKEN_LIFETIME, request)

    async def start(
        self,
        journal: InteractionJournal,
        *,
        queue: Queue,
        store: Store,
        announce: Announce,
        database: DatabaseHealth,
        clock: Callable[[], datetime],
    ) -> None:
        """Read what a previous run left in ``journal`` and start the replay (in the background)."""
        self.journal, self._queue, self._store, self._announce = journal, queue, store, announce
        self._database, self._clock = database, clock
        for entry in await asyncio.to_thread(journal.load):
            self._waiting[entry.interaction_id] = _Waiting(entry)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="pending-interactions")
        self._task.add_done_callback(_log_end)

    async def answer_stranded(self, client: discord.Client, now: datetime) -> int:
        """From now on answer through ``client``: the replay of a previous run's interactions
        starts (it does not wait for them: the database may be away). Returns how many."""
        self._client = client
        self.wake()
        left = sum(1 for w in self._waiting.values() if w.interaction is None)
        if left:
            log.info("%d interaction(s) a previous run left without their job: queueing or answering them", left)
        return left

    def adopt(self, entry: Entry, interaction: discord.Interaction, message_id: int | None) -> None:
        """An acknowledged command whose job the database did not take: the replay stores it."""
        self._waiting[entry.interaction_id] = _Waiting(entry, interaction, message_id, acknowledged=True)
        self.wake()

    def wake(self) -> None:
        """Try now (the database answered a write elsewhere)."""
        if self._wake is not None and self._waiting:
            self._wake.set()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- the replay ---------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(0.5, 5.0)
        old_records = True
        assert self._wake is not None
        while True:
            delay = 60.0
            if self._client is not None and (self._waiting or old_records):
                try:
                    if old_records:
                        await self._answer_old_records()
                        old_records = False
                    await self._replay()
                    backoff.reset()
                    self._database.succeeded()
                except Exception as error:  # waited out and tried again, never a reason to stop
                    if is_database_fault(error):
                        self._database.failed(error)
                    else:
                        log.exception("replaying the journal of interactions failed; trying again")
                    delay = backoff.next()
                else:
                    if self._waiting:  # Discord did not answer for some: again soon
                        delay = backoff.next()
            await woken_within(self._wake, delay)

    async def _replay(self) -> None:
        now = self._clock()
        for waiting in [w for w in self._waiting.values() if now >= w.entry.expires_at - GIVE_UP_BEFORE]:
            await self._answer(waiting, TOO_LONG if waiting.entry.request else RESTARTED)
        for waiting in [w for w in self._waiting.values() if w.entry.request is None and w.interaction is None]:
            await self._answer(waiting, RESTARTED)
        requests = [w for w in self._waiting.values() if w.entry.request is not None]
        if not requests:
            return
        stored = await asyncio.to_thread(self._queue.jobs_for_interactions, [w.entry.token for w in requests])
        for waiting in requests:
            if waiting.entry.token in stored:
                await self._close(waiting)
            elif waiting.acknowledged is None:
                await self._probe(waiting)
        faults = []
        for waiting, outcome in zip(
            to_store := [w for w in self._waiting.values() if w.entry.request is not None and w.acknowledged],
            await asyncio.gather(*(self._store(w.entry) for w in to_store), return_exceptions=True),
            strict=True,
        ):
            if isinstance(outcome, QueueError):
                await self._answer(waiting, f"✖️ Not queued: {outcome}")
            elif isinstance(outcome, BaseException):
                faults.append(outcome)
            else:
                await self._queued(waiting, *outcome)
        if faults:
            raise faults[0]

    async def _probe(self, waiting: _Waiting) -> None:
        """Whether a previous run's interaction was acknowledged: its "thinking…" message exists."""
        try:
            message = await self._webhook(waiting).fetch_message("@original")
        except discord.NotFound:  # never acknowledged: the member saw "did not respond"
            log.info("interaction %s was never acknowledged: its job is not queued", waiting.entry.interaction_id)
            await self._close(waiting, answered=True)
            return
        except discord.HTTPException as e:
            log.info("interaction %s: its message not found yet (%s)", waiting.entry.interaction_id, e)
            return
        waiting.acknowledged, waiting.message_id = True, message.id

    async def _queued(self, waiting: _Waiting, job: Job, position: int | None) -> None:
        await self._close(waiting)
        request = waiting.entry.request
        assert request is not None
        if waiting.message_id is not None and job.status_message_id is None:
            job.status_message_id, job.status_channel_id = waiting.message_id, request.channel_id
        log.info("interaction %s: job %s queued from the journal", waiting.entry.interaction_id, job.id)
        await self._announce(job, None, position)

    async def _answer(self, waiting: _Waiting, text: str) -> None:
        """Tell the member in the interaction's message; closed once told (or past telling)."""
        try:
            if waiting.interaction is not None:
                await waiting.interaction.edit_original_response(content=text, view=None)
            else:
                await self._webhook(waiting).edit_message("@original", content=text, view=None)
        except discord.HTTPException as e:
            if not permanent(e):
                raise  # Discord is having trouble: the next pass tries again
            log.info("could not answer interaction %s: %s (%s)", waiting.entry.interaction_id, text, e)
        await self._close(waiting, answered=True)

    async def _close(self, waiting: _Waiting, *, answered: bool = False) -> None:
        self._waiting.pop(waiting.entry.interaction_id, None)
        assert self.journal is not None
        await self.journal.close(waiting.entry.interaction_id, answered=answered)

    def _webhook(self, waiting: _Waiting) -> discord.Webhook:
        return discord.Webhook.partial(waiting.entry.app_id, waiting.entry.token, client=self._client)

    async def _answer_old_records(self) -> None:
        """Interactions recorded in the database by a version before the journal: answered once."""
        for key, raw in (await asyncio.to_thread(self.state.with_prefix, OLD_PREFIX)).items():
            value = json.loads(raw)
            if datetime.fromisoformat(value["expires_at"]) > self._clock():
                webhook = discord.Webhook.partial(value["app_id"], value["token"], client=self._client)
                try:
                    await webhook.edit_message("@original", content=RESTARTED, view=None)
                except discord.HTTPException as e:
                    log.info("could not answer interaction %s after the restart: %s", key.removeprefix(OLD_PREFIX), e)
            await asyncio.to_thread(self.state.delete, key)


def _log_end(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the replay of pending interactions stopped", exc_info=task.exception())
