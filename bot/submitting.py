"""Queueing a command's job on the journal's word: what :class:`~bot.service.JobService` does
between a command's checks and its answer (a part of it, kept apart for its size).

The command is journaled (:mod:`bot.journal`, a local file) and its job stored at once; the
acknowledgement waits for the commit :data:`STORE_BUDGET` at most, then for the journal alone.
A job the database does not take is handed to the journal's replay (:mod:`bot.acks`), and the
member is told in one line that it will be queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import discord

from bot.acks import SAVED, PendingAcks
from bot.group_writes import GroupWriter
from bot.jobs import NewJob
from bot.journal import Entry, InteractionJournal, Request
from db.faults import DatabaseHealth, is_database_fault
from db.models import Job
from engine.params import job_columns

log = logging.getLogger(__name__)

#: Seconds from a command's arrival that its acknowledgement waits for the job's commit; past
#: them it is acknowledged on the journal's word alone, and the job follows when stored.
STORE_BUDGET = 0.5
#: Seconds an acknowledgement waits for its journal entry to reach the disk: the deadline first.
JOURNAL_BUDGET = 1.5


class JournaledSubmit:
    """The part of the job service that queues a command's job (mixed into JobService)."""

    journal: InteractionJournal
    acks: PendingAcks
    writes: GroupWriter
    database: DatabaseHealth
    clock: Callable[[], datetime]
    # JobService's own: acknowledging (within the deadline), and showing a job's place in line.
    defer: Callable[..., Awaitable[None]]
    _announce: Callable[[Job, str | None, int | None], Awaitable[None]]

    async def submit(self, interaction: discord.Interaction, new: NewJob, note: str | None = None) -> Job:
        """Queue a job for whoever used the command or pressed the button, acknowledge, and
        answer with its number, place in line and a Cancel button (None: the database did not
        take it; the member is told it will be queued from the journal).

        The command is journaled and stored at once; the acknowledgement waits for the commit
        until :data:`STORE_BUDGET`, then for the journal alone, so that an acknowledged
        interaction always has its job, now or from the journal."""
        request = Request(new.kind, new.params, new.parent_id, interaction.user.id, interaction.guild_id,
                          interaction.channel_id)  # fmt: skip
        entry = self.acks.entry(interaction, self.clock(), request)
        interaction.extras["journaled"] = True
        journaled = asyncio.ensure_future(self.journal.append(entry))
        # Stored in a group with the other commands of the moment: one commit for all of them.
        store = asyncio.ensure_future(self._store(entry))
        received = interaction.extras.get("received", time.monotonic())
        await asyncio.wait({store}, timeout=max(0.0, received + STORE_BUDGET - time.monotonic()))
        if not store.done():
            await self._journaled(interaction, journaled)
            await self.defer(interaction)
        try:
            job, position = await store
        except Exception as error:
            if not is_database_fault(error):
                raise  # a refusal or a bug: answered by ``guarded``, the entry closed with the answer
            return await self._saved(interaction, entry, journaled, error)
        self.database.succeeded()
        self.acks.wake()  # the database answers: what waits in the journal can be stored too
        await self.defer(interaction)
        interaction.extras["thinking"] = False  # from now on the message is the job's
        interaction.extras.pop("journaled", None)
        await self.journal.close(interaction.id)
        message_id = interaction.extras.get("message_id") or (await interaction.original_response()).id
        await self.writes.set_status_message(job.id, interaction.channel_id, message_id)
        job.status_message_id = message_id
        await self._announce(job, note, position)
        return job

    async def _store(self, entry: Entry) -> tuple[Job, int | None]:
        """Store a journaled command's job (once per interaction: the queue sees to that)."""
        request = entry.request
        assert request is not None
        return await self.writes.enqueue(
            **job_columns(request.params),
            kind=request.kind,
            parent_id=request.parent_id,
            requester_id=request.requester_id,
            guild_id=request.guild_id,
            channel_id=request.channel_id,
            interaction_token=entry.token,
            interaction_app_id=entry.app_id,
            interaction_expires_at=entry.expires_at,
            status_channel_id=request.channel_id,
        )

    async def _saved(
        self, interaction: discord.Interaction, entry: Entry, journaled: Awaitable[None], error: BaseException
    ) -> None:
        """The database did not take a journaled job: acknowledged (if not yet), told in one line
        that it will be queued, and handed to the journal's replay."""
        self.database.failed(error)
        await self._journaled(interaction, journaled)
        await self.defer(interaction)
        interaction.extras["thinking"] = False  # the message stays: it becomes the job's status
        interaction.extras.pop("journaled", None)
        self.acks.adopt(entry, interaction, interaction.extras.get("message_id"))
        try:
            await interaction.edit_original_response(content=SAVED)
        except discord.HTTPException as e:
            log.info("interaction %s: could not say its job is saved (%s)", interaction.id, e)

    async def _answered(self, interaction: discord.Interaction) -> None:
        """The interaction has its answer: a restart must not queue or answer it again."""
        if interaction.extras.pop("journaled", False):
            await self.journal.close(interaction.id, answered=True)

    async def _journaled(self, interaction: discord.Interaction, append: Awaitable[None]) -> None:
        """Wait for a journal entry to reach the disk, :data:`JOURNAL_BUDGET` at most from the
        command's arrival: Discord's deadline comes first."""
        received = interaction.extras.get("received", time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(append), max(0.0, received + JOURNAL_BUDGET - time.monotonic()))
        except TimeoutError:
            log.warning("interaction %s: acknowledged before its journal entry was on disk", interaction.id)
