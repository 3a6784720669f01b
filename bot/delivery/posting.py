"""Posting a finished job's result message in one channel, exactly once; and posting it again
on request (``/show job``).

The result message is the requester's mention, an embed with the parameters, the PNGs and
the result buttons (failed jobs: the reason, and Reroll / Edit / Info). Which channel it goes
to is decided by fallbacks.py; this module makes sure that one channel gets it once:

* the job id is the message ``nonce`` (discord.py sends ``enforce_nonce``), so a post retried
  after a lost answer or a crash within Discord's nonce window returns the first message
  instead of making a second one;
* for a job finished longer ago than that, the channel's recent messages are searched for the
  job's embed before posting again.

``show_again`` is not exactly-once by design: each ``/show`` makes a new message (the old one
may have been deleted); it is recorded like the first, so 🔁 reactions on it work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

import discord
from discord import ui

from bot import layout, render
from bot.delivery.ports import DiscordClient
from bot.describe import describe_message, describe_view
from bot.inputs import BadInput
from bot.policy import nsfw_match
from bot.safety.images import blurred_png
from bot.safety.policy import BLUR, POSTED, SPOILER, WITHHELD
from bot.safety.results import ResultChecks
from db.community import Community
from db.models import Job, JobKind, JobStatus, ResultImage
from db.queue import Queue

log = logging.getLogger(__name__)

#: A job finished longer ago than this may have been posted by a process that then crashed
#: before recording it, outside the nonce window: look for it in the channel first.
NONCE_WINDOW = timedelta(minutes=2)
#: Discord's error codes for an interaction that can no longer be answered or followed up.
GONE_INTERACTION = frozenset({10062, 10015, 50027})
FINISHED = (JobStatus.done, JobStatus.failed, JobStatus.cancelled)


def nonce_for(job_id: int) -> str:
    """The message nonce (at most 25 characters) that makes posting job ``job_id`` idempotent."""
    return f"sdjob{job_id}"


class ResultPoster:
    """Builds a job's result message and sends it; see the module docstring."""

    def __init__(
        self,
        discord_client: DiscordClient,
        queue: Queue,
        community: Community,
        *,
        model_name: str,
        clock: Callable[[], datetime],
        checks: ResultChecks | None = None,
        edit_words: bool = False,
    ) -> None:
        """``checks``: the image policy (None: results are posted as they are); ``edit_words``:
        results have Edit with words (an edit model is configured)."""
        self.edit_words = edit_words
        self.discord = discord_client
        self.checks = checks
        self.queue = queue
        self.community = community
        self.model_name = model_name
        self.clock = clock
        self._checked_history: set[tuple[int, int | None]] = set()  # (job id, channel id)

    async def send(self, job: Job, channel: discord.abc.Messageable, *, prefix: str = "") -> int:
        """Post the job's result (or failure) message in ``channel``, or find the one posted
        before (nonce, history); its id. ``prefix`` replaces the mention at the start."""
        found = await self._already_posted(job, channel)
        if found is not None:
            return found
        parts, view = await self.message(job, getattr(channel, "id", None))
        content = parts.content
        if prefix:
            content = prefix + content.removeprefix(f"<@{job.requester_id}>")
        mentions = discord.AllowedMentions(everyone=False, roles=False, users=[discord.Object(job.requester_id)])
        message = await channel.send(
            content=content,
            embed=parts.embed,
            files=parts.files,
            view=view,
            nonce=nonce_for(job.id),
            allowed_mentions=mentions,
        )
        return message.id

    async def message(self, job: Job, channel_id: int | None) -> tuple[render.ResultMessage, ui.View]:
        """The parts and buttons of the job's result message, for a message in ``channel_id``."""
        if job.status is JobStatus.done:
            action = await self.safety_action(job, channel_id)
            if action == WITHHELD:
                return render.withheld_message(job), layout.result_view(job, 0)
            images = await asyncio.to_thread(self.queue.images, job.id)
            spoiler = action == SPOILER or await self._needs_spoiler(job, channel_id)
            if action == BLUR:
                images = await asyncio.to_thread(blurred, images)
            if job.kind is JobKind.describe:  # its prompts, each with a button that imagines it
                parts = await asyncio.to_thread(describe_message, job, images, spoiler=spoiler)
                return parts, describe_view(job, len(images))
            parts = await asyncio.to_thread(render.result_message, job, images, self.model_name, spoiler=spoiler)
            return parts, layout.result_view(job, len(images), reveal=action == BLUR, words=self.edit_words)
        return render.failure_message(job), layout.result_view(job, 0)

    async def safety_action(self, job: Job, channel_id: int | None) -> str:
        """What the image policy makes of the job's result in ``channel_id`` (posted, exempt,
        spoiler, blur, withheld); a channel not in the cache (a DM) is not age-restricted."""
        if self.checks is None:
            return POSTED
        return await self.checks.action(job, age_restricted=self.age_restricted(channel_id))

    def age_restricted(self, channel_id: int | None) -> bool:
        target = self.discord.get_channel(channel_id or 0)
        is_nsfw = getattr(target, "is_nsfw", None)
        return bool(callable(is_nsfw) and is_nsfw())

    async def show_again(self, interaction: discord.Interaction, job: Job, *, ephemeral: bool = False) -> None:
        """Post a finished job's result again (images, embed, buttons) as the answer to
        ``interaction``, or as a new message in its channel when the interaction can no longer
        carry it (too late, token expired; not for an ``ephemeral`` answer). Raises ``BadInput`` for
        a job that has not finished
        (or was cancelled). ``ephemeral`` counts when this acknowledges the interaction; after a
        caller's own defer, the answer is as public or private as that was."""
        if job.status not in FINISHED:
            place = await asyncio.to_thread(self.queue.position, job.id)
            where = f"place {place} in line" if place else "being made now"
            raise BadInput(
                f"{render.job_title(job)} has not finished yet ({where}); its result is posted when it is done."
            )
        if job.status is JobStatus.cancelled:
            raise BadInput(f"{render.job_title(job)} was cancelled, so it has no result to show.")
        deferred = await self._defer(interaction, ephemeral)
        parts, view = await self.message(job, interaction.channel_id)
        message: discord.Message | None = None
        if deferred:
            try:
                message = await interaction.followup.send(
                    content=parts.content,
                    embed=parts.embed,
                    files=parts.files,
                    view=view,
                    ephemeral=ephemeral,
                    allowed_mentions=discord.AllowedMentions.none(),
                    wait=True,
                )
            except discord.HTTPException as e:
                if not (isinstance(e, discord.NotFound) or e.code in GONE_INTERACTION):
                    raise
                log.info("job %s: /show could not answer interaction %s (%s)", job.id, interaction.id, e)
                if ephemeral:
                    return  # asked for privately: the channel is no place for it
                parts, view = await self.message(job, interaction.channel_id)  # the files were consumed
        if message is None:
            if ephemeral:
                return
            channel = self.discord.get_partial_messageable(interaction.channel_id, guild_id=interaction.guild_id)
            message = await channel.send(
                content=parts.content,
                embed=parts.embed,
                files=parts.files,
                view=view,
                allowed_mentions=discord.AllowedMentions.none(),
            )
        if not ephemeral and job.posted_at is not None:
            # Found by 🔁 reactions like the first post. (A job delivery has not posted yet is
            # left to it: recording it here would stop delivery from finishing its status.)
            await asyncio.to_thread(self.queue.mark_posted, job.id, message.channel.id, [message.id])

    async def _defer(self, interaction: discord.Interaction, ephemeral: bool) -> bool:
        """Acknowledge (reading the images can take longer than Discord's 3 s); False when the
        interaction is already gone."""
        if interaction.response.is_done():
            return True
        try:
            await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        except discord.NotFound:
            return False  # answered too late (10062): a channel message instead
        return True

    async def _needs_spoiler(self, job: Job, channel_id: int | None) -> bool:
        """The server's NSFW policy: a prompt with a listed word is made only in age-restricted
        channels, and its result is spoilered wherever else it lands (a DM, a fallback post)."""
        if job.guild_id is None:
            return False
        policy = await asyncio.to_thread(self.community.server_policy, job.guild_id)
        if nsfw_match(job.prompt, policy.nsfw_words) is None:
            return False
        return not self.age_restricted(channel_id)

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
                if message.author.id == self.discord.user.id and any(e.footer.text == footer for e in message.embeds):
                    return message.id
        except discord.HTTPException as e:  # no Read Message History: post, accepting the risk
            log.info("job %s: cannot read channel history (%s)", job.id, e)
        return None


def blurred(images: list[ResultImage]) -> list[ResultImage]:
    """Blurred copies of a job's images (not stored: the originals stay for Reveal and review)."""
    return [ResultImage(job_id=im.job_id, index=im.index, seed=im.seed, png=blurred_png(im.png)) for im in images]
