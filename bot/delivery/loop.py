"""The delivery loop: every finished job's message posted once, and its status message told.

One long-running task (:meth:`Delivery.run`) wakes when a job finishes (``on_finished``, from
the runner in this process) and at least every ``interval`` seconds anyway (results made by
workers in other processes are found in the database). Each cycle it

1. takes every finished job whose result is not posted yet (``Queue.undelivered``);
2. posts its message where it belongs, or where it can go instead (fallbacks.py), exactly once
   (posting.py);
3. makes the job's status message say so (statuses.py): done with a link, or where it went;
4. only then records it as posted (``Queue.mark_posted``): a crash in between repeats 2 and 3,
   and the nonce or the history check turns the repeated post into the message made before;
5. tells the server's owner once about a permission the bot lacks there;

and then refreshes the status messages of waiting and running jobs.

429 and 5xx answers and network errors are retried with backoff while the job stays stored;
other 4xx (a deleted channel) end the attempts: the job is recorded as handled, its status
message says why, and it is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import discord

from bot import render
from bot.delivery.errors import permanent
from bot.delivery.fallbacks import Fallbacks, Posted
from bot.delivery.ports import DiscordClient
from bot.delivery.posting import ResultPoster
from bot.delivery.statuses import StatusMessages
from bot.delivery.tasks import BackgroundTasks
from bot.safety.policy import POSTED, WITHHELD
from bot.safety.results import ResultChecks
from db.community import Community
from db.faults import DatabaseHealth, is_database_fault
from db.models import Job, JobStatus
from db.queue import Queue
from db.state import StateStore
from engine.types import Progress

log = logging.getLogger(__name__)

#: Backoff between attempts to post one job after 429/5xx/network errors (seconds, capped).
RETRY_DELAYS = (2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class _Retry:
    attempts: int = 0
    not_before: float = 0.0


class Delivery:
    """Posts results and keeps status messages current; see the module docstring."""

    def __init__(
        self,
        discord_client: DiscordClient,
        queue: Queue,
        *,
        interval: float,
        model_name: str,
        clock: Callable[[], datetime],
        community: Community,
        state: StateStore,
        database: DatabaseHealth | None = None,
        checks: ResultChecks | None = None,
        edit_words: bool = False,
    ) -> None:
        """``discord_client``: the few Discord calls delivery makes (ports.py); ``state``: where the
        owner notices sent are remembered; ``database``: where a cycle that met a database fault
        says so (once, until it answers); ``checks``: the image policy (None: none); ``edit_words``:
        results have Edit with words (an edit model is configured)."""
        self.discord = discord_client
        self.database = database or DatabaseHealth(log)
        self.queue = queue
        self.interval = interval
        self.model_name = model_name
        self.clock = clock
        self.checks = checks
        self.community = community
        self.poster = ResultPoster(
            discord_client, queue, community, model_name=model_name, clock=clock, checks=checks, edit_words=edit_words
        )
        self.fallbacks = Fallbacks(discord_client, self.poster, community, state)
        self.statuses = StatusMessages(discord_client, queue, interval=interval, clock=clock)
        self._retry: dict[int, _Retry] = {}
        self._wake = asyncio.Event()

    # -- called by the runner and the commands (on the event loop) ---------------------------

    def on_progress(self, job_id: int, progress: Progress) -> None:
        self.statuses.on_progress(job_id, progress)

    def on_finished(self, job_id: int) -> None:
        self.wake()

    def wake(self) -> None:
        self.statuses.places_moved()
        self._wake.set()

    async def show_queued(self, job: Job, position: int | None, note: str = "") -> None:
        """Show a new job's place in line (and its Cancel button) and follow it from now on."""
        await self.statuses.show_queued(job, position, note)

    async def show_again(self, interaction: discord.Interaction, job: Job, *, ephemeral: bool = False) -> None:
        """``/show job``: post a finished job's result again, with its buttons, as the answer to
        ``interaction`` (see ``ResultPoster.show_again``); ``BadInput`` if it has not finished."""
        await self.poster.show_again(interaction, job, ephemeral=ephemeral)

    @property
    def tasks(self) -> BackgroundTasks:
        """The background tasks delivery has in flight (held until they end)."""
        return self.statuses.tasks

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver and refresh until cancelled."""
        while True:
            try:
                await self.deliver_finished()
                await self.statuses.refresh()
            except Exception as error:
                if not is_database_fault(error):
                    log.exception("delivery cycle failed; trying again shortly")
                else:  # an outage: said once, not with a traceback every cycle
                    self.database.failed(error)
            else:
                self.database.succeeded()
            self._wake.clear()
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def deliver_finished(self) -> None:
        """Post every finished job that has not been posted yet."""
        jobs = await asyncio.to_thread(self.queue.undelivered)
        if self.checks is not None:  # the cycle's images in one classifier call, before any post
            await self.checks.classify(jobs)
        for job in jobs:
            retry = self._retry.get(job.id)
            if retry is not None and retry.not_before > time.monotonic():
                continue
            await self.deliver(job)

    async def deliver(self, job: Job) -> None:
        """Steps 2 to 5 of the module docstring for one finished job."""
        safety_note = ""
        try:
            action = await self._safety_action(job)
            if self.checks is not None:
                safety_note = await self.checks.record(job, action)
            if action == WITHHELD:  # the requester is told in the status message; moderators review it
                posted = Posted(job.channel_id or 0, [], note=render.withheld_line(job))
            else:
                posted = await self.fallbacks.post(job)
        except discord.HTTPException as e:
            if not permanent(e):
                self._back_off(job.id, e)
                return
            log.warning("job %s: cannot post in channel %s (%s); giving up", job.id, job.channel_id, e)
            posted = Posted(job.channel_id or 0, [], note=f"could not post the result here ({e.text or e.status})")
        except (TimeoutError, OSError) as e:
            self._back_off(job.id, e)
            return
        jump = None
        if posted.message_ids and not posted.by_dm:
            jump = f"https://discord.com/channels/{job.guild_id or '@me'}/{posted.channel_id}/{posted.message_ids[0]}"
        if safety_note:
            posted.note = f"{posted.note}; {safety_note}" if posted.note else safety_note
        try:
            await self.statuses.finish(job, jump_url=jump, note=posted.note)
        except (TimeoutError, discord.HTTPException, OSError) as e:
            self._back_off(job.id, e)
            return
        await asyncio.to_thread(self.queue.mark_posted, job.id, posted.channel_id, posted.message_ids)
        self._retry.pop(job.id, None)
        await self.fallbacks.tell_owner(job, posted)

    async def _safety_action(self, job: Job) -> str:
        """What the image policy makes of the result where it goes first: the requester's DMs
        when they asked for private results, else the job's channel. (A fallback elsewhere is
        judged again there by the poster: a DM is never age-restricted.)"""
        if self.checks is None or job.status is not JobStatus.done:
            return POSTED
        if job.safety_flagged is None and job.safety_review is None:
            return POSTED  # not checked (no classifier): no need to read where it goes
        if (await asyncio.to_thread(self.community.member_defaults, job.requester_id)).private_results:
            return await self.checks.action(job, age_restricted=False)
        return await self.poster.safety_action(job, job.channel_id)

    def _back_off(self, job_id: int, error: BaseException) -> None:
        retry = self._retry.setdefault(job_id, _Retry())
        delay = RETRY_DELAYS[min(retry.attempts, len(RETRY_DELAYS) - 1)]
        retry.attempts += 1
        retry.not_before = time.monotonic() + delay
        log.warning("job %s: delivery failed (%s); attempt %d, next in %.0f s", job_id, error, retry.attempts, delay)
