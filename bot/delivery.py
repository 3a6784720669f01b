"""Posting results, and keeping each job's status message up to date.

One long-running loop (:meth:`Delivery.run`) wakes when a job finishes (``on_finished``, from
the runner in this process) and at least every ``progress_interval`` seconds anyway (results
made by workers in other processes are found in the database). It

* posts every finished job whose result is not posted yet (``Queue.undelivered``) as a new
  channel message that mentions the requester, and records it with ``Queue.mark_posted``;
* edits status messages: place in line while queued, step / total and a preview while
  running, at most once per ``progress_interval`` per message.

Exactly once: the job id is the message ``nonce`` (discord.py sends ``enforce_nonce``), so a
post retried after a crash within Discord's nonce window returns the first message instead of
making a second one; for older jobs the channel's recent messages are searched for the job
before posting again. The job is recorded as posted only after its status message shows the
outcome, so a crash in between repeats both (the post harmlessly). 429 and 5xx errors are
retried with backoff while the job stays stored; other 4xx (a deleted channel, missing
permissions) end the attempts (the job is marked, the status message says why, and it is logged).

Private results: when the requester's member setting ``private`` is on, the result message goes
to them by direct message instead (the same files, embed and buttons; the buttons look the job up
by id, so they work there too), and the status message in the channel says so, without an image.
If Discord refuses the DM (50007: the member does not accept DMs from the bot), the result is
posted in the channel after all, mentioning the member and saying why. The nonce and the history
check work the same in the DM channel, and ``mark_posted`` records the DM channel and message.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import discord

from bot import render, views
from bot.policy import nsfw_match
from db.community import Community
from db.models import Job, JobStatus
from db.queue import Queue
from engine.types import Progress

if TYPE_CHECKING:
    from bot.client import SDBot

log = logging.getLogger(__name__)

#: How long an interaction token may be used: Discord allows 15 minutes; keep a margin.
TOKEN_TTL = timedelta(minutes=14)
#: Backoff between attempts to post one job after 429/5xx/network errors (seconds, capped).
RETRY_DELAYS = (2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0)
#: Status edits per cycle for queue places, so a long line cannot exhaust the rate limits.
PLACE_EDITS_PER_CYCLE = 10
#: How many finished job ids to remember, so a late "queued" edit cannot follow "done".
RECENTLY_FINISHED = 10_000
#: Queue places are looked up at least every this many intervals, even with no local event.
PLACES_EVERY = 5
#: Discord's error code for a DM the member does not accept (their privacy settings, or a block).
CANNOT_DM = 50007
#: A job finished longer ago than this may have been posted by a process that then crashed
#: before recording it, outside the nonce window: look for it in the channel first.
NONCE_WINDOW = timedelta(minutes=2)


def nonce_for(job_id: int) -> str:
    """The message nonce (at most 25 characters) that makes posting job ``job_id`` idempotent."""
    return f"sdjob{job_id}"


@dataclass
class _Status:
    """What we know about one job's status message in this process."""

    job: Job
    last_edit: float = float("-inf")  # time.monotonic() of the last edit
    shown: str = ""  # the text it shows now
    progress: Progress | None = None
    finished: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class _Posted:
    """Where a job's result went: the channel and message ids, and what the status should add."""

    channel_id: int
    message_ids: list[int]
    by_dm: bool = False  # sent to the requester by direct message (no jump link in the channel)
    note: str = ""


@dataclass
class _Retry:
    attempts: int = 0
    not_before: float = 0.0


class Delivery:
    """Posts results and edits status messages; see the module docstring."""

    def __init__(self, bot: SDBot, queue: Queue, *, interval: float, model_name: str,
                 clock: Callable[[], datetime]) -> None:
        self.bot = bot
        self.queue = queue
        self.interval = interval
        self.model_name = model_name
        self.clock = clock
        self._status: dict[int, _Status] = {}
        self._retry: dict[int, _Retry] = {}
        self._checked_history: set[tuple[int, int | None]] = set()  # (job id, channel id)
        self._wake = asyncio.Event()
        self._places_dirty = True
        self._places_checked = float("-inf")
        self._adopting: set[int] = set()
        self._finished: dict[int, None] = {}  # recently finished job ids, oldest first
        self._community: Community | None = None  # member settings (``private``), made lazily

    # -- called by the runner and the commands (on the event loop) ---------------------------

    def on_progress(self, job_id: int, progress: Progress) -> None:
        status = self._status.get(job_id)
        if status is None:  # a job queued before a restart, or by another process
            if job_id not in self._adopting:
                self._adopting.add(job_id)
                self._adopt(job_id)
            return
        if status.progress is None:
            self._places_dirty = True  # a job left the line
        status.progress = progress

    def on_finished(self, job_id: int) -> None:
        self._places_dirty = True
        self._wake.set()

    def wake(self) -> None:
        self._places_dirty = True
        self._wake.set()

    async def show_queued(self, job: Job, position: int | None, note: str = "") -> None:
        """Show a new job's place in line (and its Cancel button) and follow it from now on."""
        if job.id in self._finished:
            return  # posted already (a very fast job); the status shows that
        status = self._status.setdefault(job.id, _Status(job))
        text = render.queued_text(job, position) + (f"\n{note}" if note else "")
        async with status.lock:
            if status.finished or status.progress is not None:
                return  # the job has already moved on; don't show an old state
            await self._edit_status(status, content=text, view=views.queued_view(job.id))
            status.shown = text
            status.last_edit = time.monotonic()

    def _adopt(self, job_id: int) -> None:
        task = asyncio.create_task(self._adopt_job(job_id), name=f"adopt-{job_id}")
        task.add_done_callback(_log_failure)

    async def _adopt_job(self, job_id: int) -> None:
        try:
            job = await asyncio.to_thread(self.queue.get, job_id)
            if job is not None and job.status_message_id and job_id not in self._status:
                self._status[job_id] = _Status(job)
        finally:
            self._adopting.discard(job_id)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver and refresh until cancelled."""
        while True:
            try:
                await self.deliver_finished()
                await self.refresh_statuses()
            except Exception:  # noqa: BLE001 - a failed cycle (database busy, network) must not end delivery
                log.exception("delivery cycle failed; trying again shortly")
            self._wake.clear()
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def deliver_finished(self) -> None:
        """Post every finished job that has not been posted yet."""
        for job in await asyncio.to_thread(self.queue.undelivered):
            retry = self._retry.get(job.id)
            if retry is not None and retry.not_before > time.monotonic():
                continue
            await self.deliver(job)

    async def deliver(self, job: Job) -> None:
        """Post one finished job (or tell about its failure), show the outcome in its status
        message, and only then record it as posted: a crash in between repeats both, and the
        nonce (or the history check) turns the repeated post into the message made before."""
        status = self._status.get(job.id) or _Status(job)
        status.job = job
        try:
            posted = await self._post(job)
        except discord.HTTPException as e:
            if not _permanent(e):
                self._back_off(job.id, e)
                return
            log.warning("job %s: cannot post in channel %s (%s); giving up", job.id, job.channel_id, e)
            posted = _Posted(job.channel_id or 0, [], note=f"could not post the result here ({e.text or e.status})")
        except (OSError, asyncio.TimeoutError) as e:
            self._back_off(job.id, e)
            return
        jump = None
        if posted.message_ids and not posted.by_dm:
            jump = f"https://discord.com/channels/{job.guild_id or '@me'}/{posted.channel_id}/{posted.message_ids[0]}"
        try:
            await self._finish_status(status, jump_url=jump, note=posted.note)
        except (discord.HTTPException, OSError, asyncio.TimeoutError) as e:
            self._back_off(job.id, e)
            return
        await asyncio.to_thread(self.queue.mark_posted, job.id, posted.channel_id, posted.message_ids)
        self._retry.pop(job.id, None)

    async def _post(self, job: Job) -> _Posted:
        """Send the result message (by DM for a member who asked for private results); where it
        went. No message for a cancel: the requester (or a moderator) did it, the status says so."""
        if job.status is JobStatus.cancelled:
            return _Posted(job.channel_id or 0, [])
        if await self._wants_private(job):
            dm: discord.DMChannel | None = None
            try:
                dm = await self.bot.create_dm(discord.Object(job.requester_id))
                message_id = await self._send(job, dm)
                return _Posted(dm.id, [message_id], by_dm=True, note="sent to the requester by direct message")
            except discord.HTTPException as e:
                if not _permanent(e):
                    raise  # Discord is having trouble: try the DM again later
                log.info("job %s: cannot DM member %s (%s); posting in the channel", job.id, job.requester_id, e)
                why = "they do not accept direct messages" if e.code == CANNOT_DM else "a direct message failed"
                prefix = f"<@{job.requester_id}> this result was meant for your DMs, but {_dm_refused(e)}; posting it here."
                channel = self.bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
                message_id = await self._send(job, channel, prefix=prefix)
                return _Posted(job.channel_id or 0, [message_id], note=f"{why}, so it is posted here")
        channel = self.bot.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
        return _Posted(job.channel_id or 0, [await self._send(job, channel)])

    async def _needs_spoiler(self, job: Job, channel: discord.abc.Messageable) -> bool:
        """The server's NSFW policy: a prompt with a listed word is made only in age-restricted
        channels, and its result is spoilered wherever else it lands (a DM, a fallback post)."""
        if job.guild_id is None:
            return False
        if self._community is None:
            self._community = Community(self.queue.engine, clock=self.clock)
        policy = await asyncio.to_thread(self._community.server_policy, job.guild_id)
        if nsfw_match(job.prompt, policy.nsfw_words) is None:
            return False
        target = self.bot.get_channel(getattr(channel, "id", 0))
        is_nsfw = getattr(target, "is_nsfw", None)
        return not (callable(is_nsfw) and is_nsfw())

    async def _wants_private(self, job: Job) -> bool:
        """Whether the requester's member setting ``private`` is on (read from the database)."""
        if self._community is None:
            self._community = Community(self.queue.engine, clock=self.clock)
        defaults = await asyncio.to_thread(self._community.member_defaults, job.requester_id)
        return bool(defaults.private_results)

    async def _send(self, job: Job, channel: discord.abc.Messageable, *, prefix: str = "") -> int:
        """Post the job's result (or failure) message in ``channel``, or find the one posted
        before (nonce, history); its id. ``prefix`` replaces the mention at the start."""
        found = await self._already_posted(job, channel)
        if found is not None:
            return found
        mentions = discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(job.requester_id)])
        if job.status is JobStatus.done:
            images = await asyncio.to_thread(self.queue.images, job.id)
            spoiler = await self._needs_spoiler(job, channel)
            parts = await asyncio.to_thread(render.result_message, job, images, self.model_name, spoiler=spoiler)
            view = views.result_view(job, len(images))
        else:
            parts = render.failure_message(job)
            view = views.result_view(job, 0)
        content = parts.content
        if prefix:
            content = prefix + content.removeprefix(f"<@{job.requester_id}>")
        message = await channel.send(content=content, embed=parts.embed, files=parts.files, view=view,
                                     nonce=nonce_for(job.id), allowed_mentions=mentions)
        return message.id

    async def _already_posted(self, job: Job, channel: discord.abc.Messageable) -> int | None:
        """A message of ours showing this job in ``channel``'s recent history, if any.

        Only for jobs finished before Discord's nonce window, and once per job, channel and process.
        """
        if job.finished_at is None or self.clock() - job.finished_at < NONCE_WINDOW:
            return None
        key = (job.id, getattr(channel, "id", None))
        if key in self._checked_history:
            return None
        self._checked_history.add(key)
        footer = render.job_title(job)
        try:
            async for message in channel.history(limit=50, after=job.finished_at - timedelta(minutes=1)):
                if message.author.id == self.bot.user.id and any(
                        e.footer.text == footer for e in message.embeds):
                    return message.id
        except discord.HTTPException as e:  # no Read Message History: post, accepting the risk
            log.info("job %s: cannot read channel history (%s)", job.id, e)
        return None

    def _back_off(self, job_id: int, error: BaseException) -> None:
        retry = self._retry.setdefault(job_id, _Retry())
        delay = RETRY_DELAYS[min(retry.attempts, len(RETRY_DELAYS) - 1)]
        retry.attempts += 1
        retry.not_before = time.monotonic() + delay
        log.warning("job %s: delivery failed (%s); attempt %d, next in %.0f s", job_id, error, retry.attempts, delay)

    async def _finish_status(self, status: _Status, *, jump_url: str | None, note: str = "") -> None:
        """The status message's last edit: done (with a link), failed or cancelled; no buttons."""
        job = status.job
        text = render.finished_text(job, jump_url) + (f" ({note})" if note else "")
        async with status.lock:
            status.finished = True
            self._status.pop(job.id, None)
            self._finished[job.id] = None
            if len(self._finished) > RECENTLY_FINISHED:
                self._finished.pop(next(iter(self._finished)))
            if job.status_message_id is None:
                return
            try:
                await self._edit_status(status, content=text, view=None, attachments=[], embed=None)
            except discord.HTTPException as e:
                if not _permanent(e):
                    raise  # Discord is having trouble: delivery tries again later
                log.info("job %s: final status edit failed (%s)", job.id, e)  # e.g. the message is gone

    # -- status messages --------------------------------------------------------------------

    async def refresh_statuses(self) -> None:
        """Edit status messages whose text changed, each at most once per interval."""
        now = time.monotonic()
        due = [s for s in self._status.values() if not s.finished and now - s.last_edit >= self.interval]
        running = [s for s in due if s.progress is not None]
        for status in running:
            await self._show_progress(status)
        if now - self._places_checked >= PLACES_EVERY * self.interval:
            self._places_dirty = True  # places also move when workers elsewhere take jobs
        if self._places_dirty:
            self._places_dirty = False
            self._places_checked = now
            waiting = sorted((s for s in due if s.progress is None), key=lambda s: s.last_edit)
            for status in waiting[:PLACE_EDITS_PER_CYCLE]:
                await self._show_place(status)
            if len(waiting) > PLACE_EDITS_PER_CYCLE:
                self._places_dirty = True

    async def _show_place(self, status: _Status) -> None:
        position = await asyncio.to_thread(self.queue.position, status.job.id)
        if position is None:
            return  # running or finished: progress or delivery will show it
        text = render.queued_text(status.job, position)
        if text != status.shown:
            await self._guarded_edit(status, text, content=text, view=views.queued_view(status.job.id))

    async def _show_progress(self, status: _Status) -> None:
        progress = status.progress
        text = render.running_text(status.job, progress.step, progress.total)
        if text == status.shown:
            return
        kwargs: dict[str, Any] = dict(content=text, view=views.queued_view(status.job.id))
        if progress.preview:
            kwargs["attachments"] = [discord.File(io.BytesIO(progress.preview), filename="preview.png")]
            kwargs["embed"] = discord.Embed().set_image(url="attachment://preview.png")
        await self._guarded_edit(status, text, **kwargs)

    async def _guarded_edit(self, status: _Status, text: str, **kwargs: Any) -> None:
        async with status.lock:
            if status.finished:
                return
            try:
                await self._edit_status(status, **kwargs)
            except (discord.Forbidden, discord.NotFound):
                status.finished = True  # the message is gone: stop editing it
                self._status.pop(status.job.id, None)
                return
            except discord.HTTPException as e:
                log.info("job %s: status edit failed (%s)", status.job.id, e)
                return
            status.shown = text
            status.last_edit = time.monotonic()

    async def _edit_status(self, status: _Status, **kwargs: Any) -> None:
        """Edit a job's status message: through the interaction while its token is valid (that
        needs no channel permission), else as a channel message."""
        job = status.job
        if job.interaction_token and job.interaction_expires_at and self.clock() < job.interaction_expires_at:
            webhook = discord.Webhook.partial(job.interaction_app_id, job.interaction_token, client=self.bot)
            await webhook.edit_message("@original", **kwargs)  # type: ignore[arg-type]
            return
        if job.status_message_id is None or job.status_channel_id is None:
            return
        channel = self.bot.get_partial_messageable(job.status_channel_id, guild_id=job.guild_id)
        await channel.get_partial_message(job.status_message_id).edit(**kwargs)


def token_expiry(now: datetime | None = None) -> datetime:
    """When an interaction token received now stops being usable (with a margin)."""
    return (now or datetime.now(timezone.utc)) + TOKEN_TTL


def _permanent(error: discord.HTTPException) -> bool:
    """Whether trying again cannot help: a 4xx (deleted channel or message, missing permissions,
    a refused message) other than a rate limit, which discord.py waits out itself anyway."""
    return 400 <= error.status < 500 and error.status != 429


def _dm_refused(error: discord.HTTPException) -> str:
    if error.code == CANNOT_DM:
        return "Discord would not deliver it (your DMs are closed to the bot)"
    return f"the direct message failed ({error.text or error.status})"


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", task.get_name(), exc_info=task.exception())
