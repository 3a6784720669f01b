"""Where a finished job's message goes, and where it goes instead when Discord refuses it.

The first choice is the job's channel, or the requester's DMs when their member setting
``private`` is on. Then:

* **Private, DMs closed** (50007): posted in the channel after all, mentioning the member and
  saying why.
* **The bot may not post in the channel** (403: 50013 Missing Permissions, 50001 Missing
  Access): sent to the requester by DM, saying which permission is missing in which channel
  (worked out from the cached channel's ``permissions_for(guild.me)``), and the server's owner
  (``guild.owner_id``, from GUILD_CREATE) is told by DM once per (channel, missing permission)
  in this process. If that DM fails too, a warning is logged, once.
* **Nowhere**: when the requester's DMs are closed as well, the result stays stored, reachable
  through ``/show job``; the job is recorded as handled (no message ids) so delivery does not
  try for ever, and it is logged once.

A post that succeeds where the bot lacks Embed Links has lost its embed (Discord drops it
silently): the owner is told about that too. Every message goes through posting.py, so each
destination gets it exactly once, retries and restarts included.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import discord

from bot import render
from bot.delivery.errors import CANNOT_DM, dm_refusal, lacks_permission, permanent
from bot.delivery.ports import DiscordClient
from bot.delivery.posting import ResultPoster
from db.community import Community
from db.models import Job, JobStatus
from db.state import StateStore

log = logging.getLogger(__name__)

#: What a result message needs in a channel: (``discord.Permissions`` attribute, Discord's name).
NEEDED = (
    ("view_channel", "View Channel"),
    ("send_messages", "Send Messages"),
    ("attach_files", "Attach Files"),
    ("embed_links", "Embed Links"),
)
EMBED_LINKS = "Embed Links"


@dataclass
class Posted:
    """Where a job's message went, what its status message should add, and what to tell the owner."""

    channel_id: int
    message_ids: list[int]
    by_dm: bool = False  # sent to the requester by direct message (no jump link in the channel)
    note: str = ""
    refused_in: int | None = None  # the channel where the bot lacked a permission
    missing: tuple[str, ...] = ()  # which ones, by Discord's names; empty: Discord did not say which


def missing_permissions(discord_client: DiscordClient, channel_id: int | None, *, files: bool) -> tuple[str, ...]:
    """The permissions a result message needs that the bot lacks in the channel, as far as the
    cached channel says (empty when it is not cached, or says nothing is missing)."""
    channel = discord_client.get_channel(channel_id or 0)
    guild = getattr(channel, "guild", None)
    if channel is None or guild is None or guild.me is None:
        return ()
    perms = channel.permissions_for(guild.me)
    needed = [(attr, name) for attr, name in NEEDED if files or attr != "attach_files"]
    if isinstance(channel, discord.Thread):
        needed[1] = ("send_messages_in_threads", "Send Messages in Threads")
    missing = tuple(name for attr, name in needed if not getattr(perms, attr))
    # Without View Channel or Send Messages, discord.py (as Discord) denies the rest implicitly:
    # name the one that matters.
    return missing[:1] if missing and missing[0] in (needed[0][1], needed[1][1]) else missing


def channel_name(discord_client: DiscordClient, channel_id: int | None) -> str:
    """``#general`` when the channel is cached, else a channel mention."""
    channel = discord_client.get_channel(channel_id or 0)
    name = getattr(channel, "name", None)
    return f"#{render.escape(name)}" if name else f"<#{channel_id}>"


def _why(missing: tuple[str, ...]) -> str:
    """``missing permission: Attach Files``, for a message in parentheses."""
    if not missing:
        return "Discord answered Missing Permissions"
    return f"missing permission{'s' if len(missing) > 1 else ''}: {' / '.join(missing)}"


def _without(missing: tuple[str, ...]) -> str:
    """``without Attach Files``, for a status message's note (itself in parentheses)."""
    return f"without {' and '.join(missing)}" if missing else "for lack of a permission Discord did not name"


class Fallbacks:
    """Posts a job's message where it belongs, or where it can go instead; see the module docstring."""

    def __init__(
        self, discord_client: DiscordClient, poster: ResultPoster, community: Community, state: StateStore
    ) -> None:
        self.discord = discord_client
        self.state = state
        self.poster = poster
        self.community = community
        # (channel id, permission) the owner heard about, kept in the database (TOLD) so that a
        # restart does not tell them again; None until read.
        self._told: set[tuple[int, str]] | None = None

    async def post(self, job: Job) -> Posted:
        """Send the job's message; where it went. No message for a cancel: the requester (or a
        moderator) did it, the status says so. Raises on a fault worth retrying."""
        if job.status is JobStatus.cancelled:
            return Posted(job.channel_id or 0, [])
        defaults = await asyncio.to_thread(self.community.member_defaults, job.requester_id)
        if defaults.private_results:
            return await self._post_private(job)
        return await self._post_in_channel(job)

    async def _post_in_channel(self, job: Job) -> Posted:
        channel = self.discord.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
        try:
            message_id = await self.poster.send(job, channel)
        except discord.HTTPException as e:
            if not lacks_permission(e):
                raise
            missing = missing_permissions(self.discord, job.channel_id, files=job.status is JobStatus.done)
            log.info("job %s: may not post in channel %s (%s); sending it by DM", job.id, job.channel_id, e)
            return await self._dm_instead(job, missing)
        posted = Posted(job.channel_id or 0, [message_id])
        if EMBED_LINKS in missing_permissions(self.discord, job.channel_id, files=False):
            posted.refused_in, posted.missing = job.channel_id, (EMBED_LINKS,)  # posted without its embed
        else:  # everything it needs: a permission lost again later is worth telling again
            await self._forget_told(job.channel_id)
        return posted

    async def _dm_instead(self, job: Job, missing: tuple[str, ...]) -> Posted:
        """The result by DM, because the bot may not post it in the job's channel."""
        where, why = channel_name(self.discord, job.channel_id), _why(missing)
        what = "your result" if job.status is JobStatus.done else "what became of your job"
        try:
            dm = await self.discord.create_dm(discord.Object(job.requester_id))
            message_id = await self.poster.send(job, dm, prefix=f"I could not post in {where} ({why}); here is {what}.")
        except discord.HTTPException as e:
            if not permanent(e):
                raise
            log.warning(
                "job %s: may not post in channel %s (%s) and cannot DM member %s (%s); the result "
                "stays stored for /show",
                job.id,
                job.channel_id,
                why,
                job.requester_id,
                e,
            )
            dm_failed = "their direct messages are closed" if e.code == CANNOT_DM else "a direct message failed"
            return Posted(
                job.channel_id or 0,
                [],
                refused_in=job.channel_id,
                missing=missing,
                note=f"I may not post here {_without(missing)} and {dm_failed}; `/show job:{job.id}` shows it",
            )
        return Posted(
            dm.id,
            [message_id],
            by_dm=True,
            refused_in=job.channel_id,
            missing=missing,
            note=f"I may not post here {_without(missing)}, so it was sent to the requester by direct message",
        )

    async def _post_private(self, job: Job) -> Posted:
        """The result by DM, as the requester asked; in the channel if Discord refuses the DM."""
        try:
            dm = await self.discord.create_dm(discord.Object(job.requester_id))
            return Posted(
                dm.id, [await self.poster.send(job, dm)], by_dm=True, note="sent to the requester by direct message"
            )
        except discord.HTTPException as e:
            if not permanent(e):
                raise  # Discord is having trouble: try the DM again later
            log.info("job %s: cannot DM member %s (%s); posting in the channel", job.id, job.requester_id, e)
            refusal = e
        why = "they do not accept direct messages" if refusal.code == CANNOT_DM else "a direct message failed"
        prefix = (
            f"<@{job.requester_id}> this result was meant for your DMs, but {dm_refusal(refusal)}; posting it here."
        )
        channel = self.discord.get_partial_messageable(job.channel_id, guild_id=job.guild_id)
        try:
            message_id = await self.poster.send(job, channel, prefix=prefix)
        except discord.HTTPException as e:
            if not lacks_permission(e):
                raise
            missing = missing_permissions(self.discord, job.channel_id, files=job.status is JobStatus.done)
            log.warning(
                "job %s: cannot DM member %s nor post in channel %s (%s); the result stays stored for /show",
                job.id,
                job.requester_id,
                job.channel_id,
                _why(missing),
            )
            return Posted(
                job.channel_id or 0,
                [],
                refused_in=job.channel_id,
                missing=missing,
                note=f"{why}, and I may not post here {_without(missing)}; `/show job:{job.id}` shows it",
            )
        return Posted(job.channel_id or 0, [message_id], note=f"{why}, so it is posted here")

    async def tell_owner(self, job: Job, posted: Posted) -> None:
        """DM the server's owner which permission the bot lacks where, once per (channel,
        permission), across restarts, until a result is posted there with every permission
        again. A failure is logged, never raised: the result has been handled.

        The notice is recorded before it is sent: a crash in between costs one notice, never
        sends two."""
        if posted.refused_in is None or job.guild_id is None:
            return
        keys = [(posted.refused_in, name) for name in posted.missing or ("",)]
        try:
            told = await self._told_about()
        except Exception as e:  # noqa: BLE001 - the database is away: told with the next refusal there
            log.info("could not read which owners were told already (%s)", e)
            return
        if all(key in told for key in keys):
            return
        await self._remember(keys)
        guild = self.discord.get_guild(job.guild_id)
        try:
            if guild is None or guild.owner_id is None:
                raise LookupError(f"server {job.guild_id} or its owner is not known")
            dm = await self.discord.create_dm(discord.Object(guild.owner_id))
            notice = owner_notice(guild.name, channel_name(self.discord, posted.refused_in), posted.missing)
            await dm.send(notice, allowed_mentions=discord.AllowedMentions.none())
        except (TimeoutError, discord.HTTPException, OSError) as e:
            if not isinstance(e, discord.HTTPException) or not permanent(e):
                log.info("could not tell the owner of server %s about channel %s yet (%s)", job.guild_id,
                         posted.refused_in, e)  # fmt: skip
                await self._forget(keys)  # told with the next refusal there
                return
            log.warning("could not tell the owner of server %s about channel %s (%s): %s", job.guild_id,
                        posted.refused_in, _why(posted.missing), e)  # fmt: skip
        except LookupError as e:
            log.warning("could not tell the owner of server %s about channel %s (%s): %s", job.guild_id,
                        posted.refused_in, _why(posted.missing), e)  # fmt: skip

    async def _told_about(self) -> set[tuple[int, str]]:
        if self._told is None:
            stored = await asyncio.to_thread(self.state.with_prefix, TOLD)
            told = set()
            for key in stored:
                channel, _, permission = key.removeprefix(TOLD).partition(":")
                told.add((int(channel), permission))
            self._told = told
        return self._told

    async def _remember(self, keys: list[tuple[int, str]]) -> None:
        self._told.update(keys)
        try:
            await asyncio.to_thread(self.state.put_many, {_told_key(*key): "1" for key in keys})
        except Exception as e:  # noqa: BLE001 - remembered by this process; a restart may tell them again
            log.info("could not store an owner notice (%s)", e)

    async def _forget(self, keys: list[tuple[int, str]]) -> None:
        self._told.difference_update(keys)
        try:
            await asyncio.to_thread(self.state.delete_many, [_told_key(*key) for key in keys])
        except Exception as e:  # noqa: BLE001 - at worst the owner is not told again after a restart
            log.info("could not forget an owner notice (%s)", e)

    async def _forget_told(self, channel_id: int | None) -> None:
        """A result was posted in ``channel_id`` with every permission: its notices are history."""
        try:
            told = await self._told_about()
        except Exception as e:  # noqa: BLE001 - the result is posted; at worst the owner is not told again
            log.info("could not read the owner notices of channel %s (%s)", channel_id, e)
            return
        keys = [key for key in told if key[0] == channel_id]
        if keys:
            await self._forget(keys)


def owner_notice(server: str, where: str, missing: tuple[str, ...]) -> str:
    """What the server's owner is told when results cannot be posted (or lack their embeds) in ``where``."""
    server = f"**{render.escape(server)}**"
    if missing == (EMBED_LINKS,):
        return (
            f"Results in {where} on {server} are posted without their details (missing permission: "
            f"{EMBED_LINKS}). Give me {EMBED_LINKS} in {where} to fix it."
        )
    need = " / ".join(missing) or "View Channel / Send Messages / Attach Files / Embed Links"
    return (
        f"I cannot post results in {where} on {server} ({_why(missing)}). Members' results there go to "
        f"them by direct message instead until I have {need} in {where}."
    )


#: StateStore keys of the owner notices sent: ``owner-told:<channel id>:<permission>``.
TOLD = "owner-told:"


def _told_key(channel_id: int, permission: str) -> str:
    return f"{TOLD}{channel_id}:{permission}"
