"""Members' reports, the Reveal button, and ``/server review``: what moderators need.

* **Report** (any member, once per result): at the server's number of reports the result is
  hidden: every message showing it is edited to its blurred copy, until a moderator decides.
* **Reveal** under a blurred result: the original, only where it may be shown: an ephemeral
  answer in an age-restricted channel, or a DM to the requester where the server allows it.
* **Review** (``/server review``, Manage Server): the server's flagged and reported results
  with their scores; ``show`` lets the moderator see one (privately, behind a spoiler),
  ``restore`` posts it as it is (a withheld one in its channel now), ``delete`` removes its
  messages, ``bar`` bars its requester. Each decision goes to the audit log.

Messages are re-drawn by delivery's poster, which reads the job's review state, so a hidden,
restored or deleted result looks the same whichever way it is shown later (``/show job``).
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Literal

import discord

from bot import render
from bot.delivery.ports import DiscordClient
from bot.delivery.posting import ResultPoster
from bot.inputs import BadInput
from bot.safety.policy import may_reveal
from bot.safety.results import ResultChecks
from db.community import Community
from db.models import Job, JobStatus
from db.queue import Queue
from db.safety import ReviewEntry, SafetyRecords

log = logging.getLogger(__name__)

ReviewAction = Literal["show", "restore", "delete", "bar"]


class Moderation:
    def __init__(
        self,
        discord_client: DiscordClient,
        queue: Queue,
        community: Community,
        records: SafetyRecords,
        checks: ResultChecks,
        poster: ResultPoster,
    ) -> None:
        self.discord, self.queue, self.community = discord_client, queue, community
        self.records, self.checks, self.poster = records, checks, poster

    async def _job(self, job_id: int) -> Job:
        job = await asyncio.to_thread(self.queue.get, job_id)
        if job is None or job.status is not JobStatus.done:
            raise BadInput(f"Job #{job_id} has no result.")
        return job

    # -- members ---------------------------------------------------------------------------------

    async def report(self, interaction: discord.Interaction, job_id: int) -> None:
        job = await self._job(job_id)
        if job.guild_id is None:
            raise BadInput("Results made in direct messages have no moderators to report them to.")
        added, count = await asyncio.to_thread(self.records.report, job.id, interaction.user.id)
        if not added:
            raise BadInput("You have already reported this result; the server's moderators can see it.")
        policy = await self.checks.policy(job.guild_id)
        hidden = count >= policy.reports_to_hide and job.safety_review is None
        if hidden and await asyncio.to_thread(self.records.set_review, job, "reported", interaction.user.id):
            job.safety_review = "reported"
            await self.redraw(job)
        then = "It is hidden until a moderator decides." if hidden else "Moderators will see it."
        await interaction.response.send_message(f"🚩 Reported; thank you. {then}", ephemeral=True)

    async def reveal(self, interaction: discord.Interaction, job_id: int) -> None:
        job = await self._job(job_id)
        if job.safety_review in ("reported", "deleted"):
            raise BadInput("This result is hidden until the server's moderators decide on it.")
        policy = await self.checks.policy(job.guild_id)
        is_nsfw = getattr(interaction.channel, "is_nsfw", None)  # as the interaction's channel is now
        age_restricted = bool(callable(is_nsfw) and is_nsfw())
        is_requester = interaction.user.id == job.requester_id
        if not may_reveal(policy, age_restricted=age_restricted, requester_in_dm=is_requester):
            where = "an age-restricted channel"
            if policy.reveal_in_dm:
                where += ", or by direct message to the member who asked for it"
            raise BadInput(f"The original of this image is shown only in {where}.")
        if age_restricted or interaction.guild_id is None:  # an age-restricted channel, or the requester's DM
            await interaction.response.defer(ephemeral=True, thinking=True)
            await interaction.followup.send(files=await self._originals(job), ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        dm = await self.discord.create_dm(discord.Object(job.requester_id))
        try:
            await dm.send(f"The original of {render.job_title(job)}:", files=await self._originals(job))
        except discord.HTTPException as e:
            raise BadInput("I could not send you a direct message; open your DMs to the bot and try again.") from e
        await interaction.followup.send("Sent to your direct messages.", ephemeral=True)

    async def _originals(self, job: Job, *, spoiler: bool = False) -> list[discord.File]:
        images = await asyncio.to_thread(self.queue.images, job.id)
        return [
            discord.File(io.BytesIO(image.png), filename=f"sd_{job.id}_{image.seed}.png", spoiler=spoiler)
            for image in images
        ]

    # -- moderators ------------------------------------------------------------------------------

    async def review_list(self, guild_id: int) -> str:
        entries = await asyncio.to_thread(self.records.to_review, guild_id)
        if not entries:
            return "Nothing to review: no flagged or reported results are waiting."
        lines = [_entry_line(entry) for entry in entries]
        lines.append("`/server review job:<id> action:show|restore|delete|bar`")
        return render.clip("\n".join(lines), 2000)

    async def review(self, interaction: discord.Interaction, job_id: int, action: ReviewAction) -> None:
        job = await self._job(job_id)
        if job.guild_id != interaction.guild_id:
            raise BadInput(f"There is no job #{job_id} on this server.")
        actor = interaction.user.id
        if action == "show":
            await interaction.response.defer(ephemeral=True, thinking=True)
            await interaction.followup.send(
                f"{render.job_title(job)} by <@{job.requester_id}> ({render.safety_text(job)}):",
                files=await self._originals(job, spoiler=True),
                ephemeral=True,
                allowed_mentions=discord.AllowedMentions.none(),
            )
            return
        if action == "bar":
            added = await asyncio.to_thread(self.community.bar, job.guild_id, job.requester_id, actor)
            await _reply(interaction, f"<@{job.requester_id}> is {'now' if added else 'already'} barred.")
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        review = "restored" if action == "restore" else "deleted"
        await asyncio.to_thread(self.records.set_review, job, review, actor)
        job.safety_review = review
        if action == "delete":
            await self.delete_messages(job)
            done = f"Deleted {render.job_title(job)}'s messages; its images stay stored."
        elif not await asyncio.to_thread(self.records.messages, job.id):
            await self.post_now(job)  # a withheld result: posted in its channel for the first time
            done = f"Restored {render.job_title(job)}: posted in <#{job.channel_id}>."
        else:
            await self.redraw(job)
            done = f"Restored {render.job_title(job)}."
        await interaction.followup.send(done, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())

    def policy_changes(self, mode: str | None, labels: str | None, threshold: float | None) -> dict[str, object]:
        """``/server safety``'s mode, labels and threshold as server settings; BadInput for a
        mode without a classifier, or a label the classifier does not have."""
        changes: dict[str, object] = {}
        check = self.checks.check
        if mode is not None:
            if mode != "off" and check is None:
                raise BadInput(
                    "No image classifier is configured (`safety.classifier` in the bot's config.toml), so "
                    "images cannot be checked; ask the bot's operator."
                )
            changes["safety_mode"] = mode
        if labels is not None and labels.strip().lower() == "default":
            changes["safety_labels"] = []  # the configuration's safety.labels
        elif labels is not None:
            chosen = [label.strip().lower() for label in labels.split(",") if label.strip()]
            known = check.labels if check is not None else ()
            unknown = [label for label in chosen if known and label not in known]
            if unknown:
                raise BadInput(f"The classifier has no label {', '.join(unknown)}; its labels: {', '.join(known)}.")
            changes["safety_labels"] = chosen
        if threshold is not None:
            changes["safety_threshold"] = threshold
        return changes

    # -- messages --------------------------------------------------------------------------------

    async def redraw(self, job: Job) -> None:
        """Edit every message showing the job to what its state says now (blurred, restored)."""
        for channel_id, message_id in await asyncio.to_thread(self.records.messages, job.id):
            parts, view = await self.poster.message(job, channel_id)
            channel = self.discord.get_partial_messageable(channel_id, guild_id=job.guild_id)
            try:
                await channel.get_partial_message(message_id).edit(
                    content=parts.content, embed=parts.embed, attachments=parts.files, view=view
                )
            except discord.HTTPException as e:  # deleted meanwhile, or no permission: nothing to hide there
                log.info("job %s: could not redraw message %s (%s)", job.id, message_id, e)

    async def delete_messages(self, job: Job) -> None:
        for channel_id, message_id in await asyncio.to_thread(self.records.messages, job.id):
            channel = self.discord.get_partial_messageable(channel_id, guild_id=job.guild_id)
            try:
                await channel.get_partial_message(message_id).delete()
            except discord.HTTPException as e:
                log.info("job %s: could not delete message %s (%s)", job.id, message_id, e)

    async def post_now(self, job: Job) -> None:
        channel = self.discord.get_partial_messageable(job.channel_id or 0, guild_id=job.guild_id)
        try:
            message_id = await self.poster.send(job, channel)
        except discord.HTTPException as e:
            raise BadInput(f"I could not post it in <#{job.channel_id}> ({e.text or e.status}).") from e
        await asyncio.to_thread(self.queue.mark_posted, job.id, job.channel_id or 0, [message_id])


def _entry_line(entry: ReviewEntry) -> str:
    score = f"{entry.label} {entry.score:.0%}" if entry.label and entry.score is not None else (entry.label or "—")
    what = entry.action or "posted"
    if entry.review == "reported":
        what += ", hidden by reports"
    when = f" <t:{int(entry.finished_at.timestamp())}:R>" if entry.finished_at else ""
    reports = f" · {entry.reports} report{'s' if entry.reports != 1 else ''}" if entry.reports else ""
    return f"**#{entry.job_id}** <@{entry.requester_id}> in <#{entry.channel_id}> · {score} · {what}{reports}{when}"


async def _reply(interaction: discord.Interaction, text: str) -> None:
    await interaction.response.send_message(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())
