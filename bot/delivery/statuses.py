"""Status messages: the one message per job that follows it while it waits and runs.

A job's status message is the interaction's "thinking…" reply (or, for a 🔁 reaction, a channel
message). While the job waits it shows the place in line and a Cancel button; while it runs,
step / total and a small preview; at the end its last edit says done (with a link to the
result), failed or cancelled, and drops the buttons. It never carries the result itself: that
is a message of its own (posting.py), so a result is posted once whatever happens to the status.

Edits go through the interaction's webhook while its token is valid (that needs no channel
permission), then as a channel message; each message is edited at most once per interval, and
queue places at most ``PLACE_EDITS_PER_CYCLE`` per cycle, within Discord's rate limits.

Jobs this process did not queue (queued before a restart, or by another process) are adopted
when their first progress arrives: a background task reads them from the database.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import discord

from bot import layout, render
from bot.delivery.errors import permanent
from bot.delivery.ports import DiscordClient
from bot.delivery.tasks import BackgroundTasks
from db.models import Job
from db.queue import Queue
from engine.types import Progress

log = logging.getLogger(__name__)

#: How long an interaction token may be used: Discord allows 15 minutes; keep a margin.
TOKEN_TTL = timedelta(minutes=14)
#: Status edits per cycle for queue places, so a long line cannot exhaust the rate limits.
PLACE_EDITS_PER_CYCLE = 10
#: How many finished job ids to remember, so a late "queued" edit cannot follow "done".
RECENTLY_FINISHED = 10_000
#: Queue places are looked up at least every this many intervals, even with no local event.
PLACES_EVERY = 5


def token_expiry(now: datetime | None = None) -> datetime:
    """When an interaction token received now stops being usable (with a margin)."""
    return (now or datetime.now(UTC)) + TOKEN_TTL


@dataclass
class _Status:
    """What we know about one job's status message in this process."""

    job: Job
    last_edit: float = float("-inf")  # time.monotonic() of the last edit
    shown: str = ""  # the text it shows now
    progress: Progress | None = None
    finished: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class StatusMessages:
    """The status messages of the jobs this process follows."""

    def __init__(
        self, discord_client: DiscordClient, queue: Queue, *, interval: float, clock: Callable[[], datetime]
    ) -> None:
        self.discord = discord_client
        self.queue = queue
        self.interval = interval
        self.clock = clock
        #: Background tasks (adopting jobs), held until they end: asyncio keeps tasks weakly.
        self.tasks = BackgroundTasks()
        self._status: dict[int, _Status] = {}
        self._adopting: set[int] = set()
        self._finished: dict[int, None] = {}  # recently finished job ids, oldest first
        self._places_dirty = True
        self._places_checked = float("-inf")

    def places_moved(self) -> None:
        """A job joined or left the line: look up places at the next refresh."""
        self._places_dirty = True

    def on_progress(self, job_id: int, progress: Progress) -> None:
        status = self._status.get(job_id)
        if status is None:  # a job queued before a restart, or by another process
            if job_id not in self._adopting:
                self._adopting.add(job_id)
                self.tasks.start(self._adopt(job_id), name=f"adopt-{job_id}")
            return
        if status.progress is None:
            self._places_dirty = True  # a job left the line
        status.progress = progress

    async def _adopt(self, job_id: int) -> None:
        try:
            job = await asyncio.to_thread(self.queue.get, job_id)
            if job is not None and self._reachable(job) and job_id not in self._status:
                self._status[job_id] = _Status(job)
        finally:
            self._adopting.discard(job_id)

    async def show_queued(self, job: Job, position: int | None, note: str = "") -> None:
        """Show a new job's place in line (and its Cancel button) and follow it from now on."""
        if job.id in self._finished:
            return  # posted already (a very fast job); the status shows that
        status = self._status.setdefault(job.id, _Status(job))
        text = render.queued_text(job, position) + (f"\n{note}" if note else "")
        async with status.lock:
            if status.finished or status.progress is not None:
                return  # the job has already moved on; don't show an old state
            await self._edit(status, content=text, view=layout.queued_view(job.id))
            status.shown = text
            status.last_edit = time.monotonic()

    async def finish(self, job: Job, *, jump_url: str | None, note: str = "") -> None:
        """The status message's last edit: done (with a link), failed or cancelled; no buttons.
        Raises on a Discord fault worth retrying (delivery then tries the whole job again)."""
        status = self._status.get(job.id) or _Status(job)
        status.job = job
        text = render.finished_text(job, jump_url) + (f" ({note})" if note else "")
        async with status.lock:
            status.finished = True
            self._status.pop(job.id, None)
            self._finished[job.id] = None
            if len(self._finished) > RECENTLY_FINISHED:
                self._finished.pop(next(iter(self._finished)))
            if not self._reachable(job):
                return
            try:
                await self._edit(status, content=text, view=None, attachments=[], embed=None)
            except discord.HTTPException as e:
                if not permanent(e):
                    raise  # Discord is having trouble: delivery tries again later
                log.info("job %s: final status edit failed (%s)", job.id, e)  # e.g. the message is gone

    async def refresh(self) -> None:
        """Edit status messages whose text changed, each at most once per interval."""
        now = time.monotonic()
        due = [s for s in self._status.values() if not s.finished and now - s.last_edit >= self.interval]
        for status in (s for s in due if s.progress is not None):
            await self._show_progress(status)
        if now - self._places_checked >= PLACES_EVERY * self.interval:
            self._places_dirty = True  # places also move when workers elsewhere take jobs
        if self._places_dirty:
            self._places_dirty = False
            self._places_checked = now
            waiting = sorted((s for s in due if s.progress is None), key=lambda s: s.last_edit)
            shown = waiting[:PLACE_EDITS_PER_CYCLE]
            places = await asyncio.to_thread(self.queue.positions, [s.job.id for s in shown])  # one pass
            for status in shown:
                await self._show_place(status, places[status.job.id])
            if len(waiting) > PLACE_EDITS_PER_CYCLE:
                self._places_dirty = True

    async def _show_place(self, status: _Status, position: int | None) -> None:
        if position is None:
            return  # running or finished: progress or delivery will show it
        text = render.queued_text(status.job, position)
        if text != status.shown:
            await self._guarded_edit(status, text, content=text, view=layout.queued_view(status.job.id))

    async def _show_progress(self, status: _Status) -> None:
        progress = status.progress
        text = render.running_text(status.job, progress.step, progress.total)
        if text == status.shown:
            return
        kwargs: dict[str, Any] = dict(content=text, view=layout.queued_view(status.job.id))
        if progress.preview:
            kwargs["attachments"] = [discord.File(io.BytesIO(progress.preview), filename="preview.png")]
            kwargs["embed"] = discord.Embed().set_image(url="attachment://preview.png")
        await self._guarded_edit(status, text, **kwargs)

    async def _guarded_edit(self, status: _Status, text: str, **kwargs: Any) -> None:
        async with status.lock:
            if status.finished:
                return
            try:
                await self._edit(status, **kwargs)
            except (discord.Forbidden, discord.NotFound):
                status.finished = True  # the message is gone: stop editing it
                self._status.pop(status.job.id, None)
                return
            except discord.HTTPException as e:
                log.info("job %s: status edit failed (%s)", status.job.id, e)
                return
            status.shown = text
            status.last_edit = time.monotonic()

    def _token_valid(self, job: Job) -> bool:
        return bool(job.interaction_token and job.interaction_expires_at and self.clock() < job.interaction_expires_at)

    def _reachable(self, job: Job) -> bool:
        """Whether the job has a status message we can edit: recorded, or the interaction's own
        (a crash between storing the job and recording its message leaves only the token)."""
        return job.status_message_id is not None or self._token_valid(job)

    async def _edit(self, status: _Status, **kwargs: Any) -> None:
        """Edit a job's status message: through the interaction while its token is valid (that
        needs no channel permission), else as a channel message."""
        job = status.job
        if self._token_valid(job):
            webhook = self.discord.interaction_webhook(job.interaction_app_id, job.interaction_token)
            message = await webhook.edit_message("@original", **kwargs)  # type: ignore[arg-type]
            if job.status_message_id is None and message is not None:  # record it, for after the token
                await asyncio.to_thread(
                    self.queue.set_status_message, job.id, job.status_channel_id or message.channel.id, message.id
                )
                job.status_message_id = message.id
            return
        if job.status_message_id is None or job.status_channel_id is None:
            return
        channel = self.discord.get_partial_messageable(job.status_channel_id, guild_id=job.guild_id)
        await channel.get_partial_message(job.status_message_id).edit(**kwargs)
