"""The Discord client: wiring of commands, buttons, reactions, and the delivery loop.

``SDBot`` gets everything it needs in its constructor (configuration, queue, the queue runner
or None when GPU workers run in other processes) and does its asynchronous set-up in
``setup_hook``: dynamic buttons, the command sync (instantly to the configured servers,
globally otherwise), and the background tasks, each with a done-callback that logs.
The flows shared by commands, buttons and reactions (queue a job and show its place in line,
cancel, show info) live here too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from dataclasses import replace
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from typing import Any, TypeVar

import aiohttp
import discord
from discord.ext import commands

from bot import community, jobs, render, views
from bot.commands import build_commands
from bot.checks import manages_messages_in, mark_received
from bot.config import Config
from bot.delivery import Delivery, token_expiry
from bot.inputs import DISCORD_CDN_HOSTS, BadInput, clip_truncation_notice, limit_pillow
from db.errors import QueueError
from db.models import Job, ResultImage
from db.queue import Queue

log = logging.getLogger(__name__)
T = TypeVar("T")

REROLL_EMOJI = "🔁"
#: Seconds the background tasks get to stop (running jobs are handed back to the queue).
CLOSE_TIMEOUT = 30.0
#: Threads for the checks an interaction waits on (SQLite and PostgreSQL serve reads side by side).
CHECK_THREADS = 2


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class SDBot(commands.Bot):
    """A Stable Diffusion bot for one or more Discord servers."""

    def __init__(self, config: Config, queue: Queue, runner: Any | None = None, *,
                 allowed_hosts: frozenset[str] = DISCORD_CDN_HOSTS, clock: Callable[[], datetime] = utcnow,
                 tokenizer: Any | None = None, model_family: str | None = None, **options: Any) -> None:
        """``model_family``: the loaded default model's family (None: ``model.family`` as configured,
        e.g. with ``--no-engine``); for ``"sdxl"`` the commands offer ``generation.sdxl_sizes``."""
        intents = discord.Intents.none()
        intents.guilds = True  # channels and permissions
        intents.guild_reactions = True  # 🔁 rerolls
        super().__init__(command_prefix=commands.when_mentioned, intents=intents, help_command=None,
                         allowed_mentions=discord.AllowedMentions.none(), **options)
        generation = config.generation.for_family(model_family or config.model.family)
        if generation is not config.generation:
            config = replace(config, generation=generation)
        self.config = config
        self.queue = queue
        self.runner = runner
        self.allowed_hosts = allowed_hosts
        self.clock = clock
        self.tokenizer = tokenizer
        self.model_name = config.model.display_name
        self.delivery = Delivery(self, queue, interval=config.discord.progress_interval,
                                 model_name=self.model_name, clock=clock)
        if runner is not None:  # the runner reports to our delivery loop
            runner.on_progress = self.delivery.on_progress
            runner.on_finished = self.delivery.on_finished
        self._tasks: list[asyncio.Task] = []
        self._checks = concurrent.futures.ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="sdbot-checks")
        self._http_session: aiohttp.ClientSession | None = None
        limit_pillow()

    # -- start and stop ---------------------------------------------------------------------

    async def setup_hook(self) -> None:
        self.add_dynamic_items(*views.ITEMS)
        for command in build_commands(self):
            self.tree.add_command(command)
        self.tree.on_error = self.on_app_command_error
        if self.config.discord.guild_ids:
            for guild_id in self.config.discord.guild_ids:
                guild = discord.Object(guild_id)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
            self.tree.clear_commands(guild=None)  # registered per server only
        else:
            await self.tree.sync()
        # Jobs queued for a model that has left config.toml since would wait for ever: they fail
        # now, with a reason that delivery posts to their members.
        await asyncio.to_thread(self.queue.fail_unknown_models, self.config.model_names)
        self._http_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self.start_task(self.delivery.run(), "delivery")
        if self.runner is not None:
            self.start_task(self.runner.run(), "queue-runner")

    def start_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task:
        """Run ``coro`` in the background; if it ever ends with an error, log the traceback."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(_log_task_end)
        self._tasks.append(task)
        return task

    async def close(self) -> None:
        """Stop the background tasks (running jobs go back in line), then disconnect."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT)
            for task in stuck:
                log.error("background task %s did not stop within %s s", task.get_name(), CLOSE_TIMEOUT)
        self._tasks.clear()
        if self._http_session is not None:
            await self._http_session.close()
        self._checks.shutdown(wait=False, cancel_futures=True)
        await super().close()

    # -- errors -----------------------------------------------------------------------------

    async def on_app_command_error(self, interaction: discord.Interaction,
                                   error: discord.app_commands.AppCommandError) -> None:
        if isinstance(error, discord.app_commands.CommandInvokeError):
            error = error.original
        if isinstance(error, BadInput):
            await self.tell(interaction, str(error))
        elif isinstance(error, discord.app_commands.TransformerError):
            await self.tell(interaction, f"`{error.value}` is not a valid value here.")
        else:
            log.error("command failed", exc_info=error)
            await self.tell(interaction, "Something went wrong on our side; it has been logged.")

    async def guarded(self, interaction: discord.Interaction, action: Coroutine[Any, Any, None]) -> None:
        """Run what a command or button does; members see refusals, we see the bugs."""
        mark_received(interaction)
        try:
            await action
        except (BadInput, QueueError) as e:
            await self.tell(interaction, str(e))
        except Exception:  # noqa: BLE001 - one failed action must not go unanswered
            log.exception("interaction %s failed", interaction.id)
            await self.tell(interaction, "Something went wrong on our side; it has been logged.")

    async def tell(self, interaction: discord.Interaction, text: str) -> None:
        """An ephemeral reply, whether or not the interaction was answered already."""
        try:
            if not interaction.response.is_done():
                await interaction.response.send_message(text, ephemeral=True)
                return
            if interaction.extras.get("thinking"):  # replace our public "thinking…" message
                await interaction.delete_original_response()
                interaction.extras["thinking"] = False
            await interaction.followup.send(text, ephemeral=True)
        except discord.HTTPException as e:
            log.info("could not tell interaction %s: %s (%s)", interaction.id, text, e)

    # -- queueing jobs ------------------------------------------------------------------------

    async def run_check(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` (a database read, a token count) on the bot's checking threads.

        An interaction waits on these, under Discord's 3-second deadline, so they do not queue
        behind the background work (delivery, the runner, writes) in asyncio's shared pool.
        """
        return await asyncio.get_running_loop().run_in_executor(self._checks, functools.partial(function, *args))

    async def defer(self, interaction: discord.Interaction) -> None:
        """Acknowledge now with a public "thinking…" message that becomes the job's status."""
        if interaction.response.is_done():
            return
        response = await interaction.response.defer(thinking=True)
        interaction.extras["thinking"] = True
        interaction.extras["message_id"] = getattr(response, "message_id", None)

    async def submit(self, interaction: discord.Interaction, fields: dict[str, Any], note: str | None = None) -> Job:
        """Queue a job for whoever used the command or pressed the button, and answer with its
        number, place in line and a Cancel button. The caller has checked the job against the
        server's policy and the pending limit (``community.check_*``); the enqueue checks the
        limit again, atomically."""
        await self.defer(interaction)
        message_id = interaction.extras.get("message_id") or (await interaction.original_response()).id
        job = await asyncio.to_thread(
            self.queue.enqueue, **fields, requester_id=interaction.user.id, guild_id=interaction.guild_id,
            channel_id=interaction.channel_id, interaction_token=interaction.token,
            interaction_app_id=interaction.application_id, interaction_expires_at=token_expiry(self.clock()),
            status_message_id=message_id, status_channel_id=interaction.channel_id)
        interaction.extras["thinking"] = False  # from now on the message is the job's
        await self._announce(job, note)
        return job

    async def submit_for_reaction(self, payload: discord.RawReactionActionEvent, fields: dict[str, Any]) -> Job | None:
        """Queue a job for a member who reacted; its status is a new message in the channel."""
        try:
            await community.check_reaction_job(self, payload, fields)
        except BadInput as e:  # no private reply exists for a reaction: log it and do nothing
            log.info("reaction reroll by %s refused: %s", payload.user_id, e)
            return None
        channel = self.get_partial_messageable(payload.channel_id, guild_id=payload.guild_id)
        status = await channel.send(f"{REROLL_EMOJI} <@{payload.user_id}> is rerolling job #{fields['parent_id']}…")
        try:
            job = await asyncio.to_thread(
                self.queue.enqueue, **fields, requester_id=payload.user_id, guild_id=payload.guild_id,
                channel_id=payload.channel_id, status_message_id=status.id, status_channel_id=payload.channel_id)
        except QueueError as e:
            await status.edit(content=f"{REROLL_EMOJI} <@{payload.user_id}>: {render.escape(str(e))}")
            return None
        await self._announce(job, None)
        return job

    async def _announce(self, job: Job, note: str | None) -> None:
        position = await asyncio.to_thread(self.queue.position, job.id)
        try:
            await self.delivery.show_queued(job, position, note or "")
        except discord.HTTPException as e:  # the job is queued; its status will be shown later
            log.info("job %s: could not show its place in line (%s)", job.id, e)
        self.delivery.wake()
        if self.runner is not None:
            self.runner.wake()

    def truncation_note(self, prompt: str) -> str | None:
        return clip_truncation_notice(self.tokenizer, prompt)

    async def download(self, url: str, max_bytes: int) -> bytes:
        """An attachment's bytes, refusing more than ``max_bytes`` whatever its declared size."""
        assert self._http_session is not None, "setup_hook has not run"
        try:
            async with self._http_session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise BadInput("The attachment could not be downloaded; upload it again.")
                data = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    data += chunk
                    if len(data) > max_bytes:
                        raise BadInput(f"The image is larger than {max_bytes / 1048576:.1f} MiB.")
                return bytes(data)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            raise BadInput("The attachment could not be downloaded; upload it again.") from None

    # -- lookups and the small flows --------------------------------------------------------------

    async def get_job(self, job_id: int) -> Job | None:
        return await self.run_check(self.queue.get, job_id)

    async def get_image(self, job_id: int, index: int) -> ResultImage:
        images = await self.run_check(self.queue.images, job_id)
        for image in images:
            if image.index == index:
                return image
        raise BadInput(f"Job #{job_id} has no image {index + 1}.")

    async def show_info(self, interaction: discord.Interaction, job: Job) -> None:
        position = await asyncio.to_thread(self.queue.position, job.id)
        await interaction.response.send_message(render.info_text(job, self.model_name, position), ephemeral=True)

    async def info_command(self, interaction: discord.Interaction, job_id: int) -> None:
        job = await self.get_job(job_id)
        if job is None or job.guild_id != interaction.guild_id:  # other servers' prompts stay private
            raise BadInput(f"There is no job #{job_id} on this server.")
        await self.show_info(interaction, job)

    async def show_queue(self, interaction: discord.Interaction) -> None:
        pending = await asyncio.to_thread(self.queue.pending_for, interaction.user.id)
        if not pending:
            await interaction.response.send_message("You have no jobs waiting.", ephemeral=True)
            return
        lines = []
        for job in pending:
            position = await asyncio.to_thread(self.queue.position, job.id)
            where = f"place {position} in line" if position else "running"
            lines.append(f"**{render.job_title(job)}**, {where}: {render.excerpt(job.prompt, 60)}")
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    async def cancel_command(self, interaction: discord.Interaction, job_id: int | None) -> None:
        if job_id is None:
            pending = await asyncio.to_thread(self.queue.pending_for, interaction.user.id)
            if not pending:
                raise BadInput("You have no jobs waiting.")
            job_id = pending[-1].id
        job = await self.get_job(job_id)
        if job is None or job.guild_id != interaction.guild_id:
            raise BadInput(f"There is no job #{job_id} on this server.")
        await self.cancel_job(interaction, job)

    async def cancel_job(self, interaction: discord.Interaction, job: Job) -> None:
        """Cancel for the requester or a member with Manage Messages in the job's channel (the
        queue checks who may)."""
        moderator = manages_messages_in(interaction, job.channel_id)
        cancelled = await asyncio.to_thread(self.queue.cancel, job.id, interaction.user.id, moderator=moderator)
        if self.runner is not None:
            self.runner.cancel(job.id)
        self.delivery.on_finished(job.id)
        await interaction.response.send_message(f"Cancelled {render.job_title(cancelled)}.", ephemeral=True)

    # -- reactions ----------------------------------------------------------------------------

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """🔁 on a result queues a reroll for whoever reacted (found by message id: restart-proof)."""
        if str(payload.emoji) != REROLL_EMOJI or self.user is None or payload.user_id == self.user.id:
            return
        if payload.member is not None and payload.member.bot:
            return
        parent = await asyncio.to_thread(self.queue.job_for_message, payload.message_id)
        if parent is None:
            return
        try:
            await self.submit_for_reaction(payload, jobs.reroll(parent))
        except discord.HTTPException as e:
            log.warning("reaction reroll of job %s failed: %s", parent.id, e)


def _log_task_end(task: asyncio.Task) -> None:
    if task.cancelled():
        return
    if task.exception() is not None:
        log.error("background task %s died", task.get_name(), exc_info=task.exception())
    else:
        log.warning("background task %s ended", task.get_name())
