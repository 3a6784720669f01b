"""Checks at the Discord boundary that commands and buttons share: who may do what, and slow
checks that must still answer within Discord's 3-second deadline.

Permissions come from ``interaction.permissions``: what Discord computed for the member in
the channel of the interaction (roles, channel overwrites, administrator), sent with every
interaction. Never from cached members, which may be stale or missing. Discord's
``default_permissions`` on a command only hides it in the client by default; a server can
change that, so admin commands check again here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

import discord
from discord import app_commands

from bot.inputs import BadInput

T = TypeVar("T")

#: Seconds a check (download, decode, token count) may take before we acknowledge the
#: interaction with a "thinking…" message and finish afterwards (Discord allows 3). Well under
#: Discord's limit: past it, something is slow (an upload, a busy machine), and a member is
#: better served by "thinking…" now than by a plain answer a second later.
PREPARE_BUDGET = 0.4
DISCORD_DEADLINE = 3.0


class Defers(Protocol):
    """What can acknowledge an interaction with a "thinking…" message (the job service)."""

    async def defer(self, interaction: discord.Interaction, *, job_pending: bool = False) -> None: ...


class NotAllowed(BadInput, app_commands.CheckFailure):
    """The member lacks the permission this needs; the message says which.

    A ``BadInput`` too, so the bot's error handlers show the message to the member, ephemeral.
    """


def require_manage_server(interaction: discord.Interaction) -> bool:
    """True for a member with Manage Server here; otherwise raise :class:`NotAllowed`.

    Use it as a check (``@manage_server_only`` on a command, or from a group's
    ``interaction_check``), or call it at the start of a callback.
    """
    if interaction.guild_id is None:
        raise NotAllowed("This command works only in a server.")
    if not interaction.permissions.manage_guild:
        raise NotAllowed("Only members with the Manage Server permission can use this.")
    return True


#: ``@manage_server_only`` on an app command: refused, with a clear message, for anyone else.
manage_server_only = app_commands.check(require_manage_server)


def may_moderate(interaction: discord.Interaction, requester_id: int) -> bool:
    """The requester, or a member allowed to manage messages in this channel."""
    return interaction.user.id == requester_id or interaction.permissions.manage_messages


def manages_messages_in(interaction: discord.Interaction, channel_id: int | None) -> bool:
    """Whether the member may manage messages in ``channel_id`` (a job's channel), which need
    not be where the command was used: Discord sends permissions for the interaction's channel
    only, so for another channel they are computed from the cached channel's overwrites and the
    member's roles. False when that channel is not known here."""
    if channel_id == interaction.channel_id:
        return interaction.permissions.manage_messages
    guild, member = interaction.guild, interaction.user
    channel = guild.get_channel_or_thread(channel_id) if guild is not None and channel_id else None
    if channel is None or not isinstance(member, discord.Member):
        return False
    return channel.permissions_for(member).manage_messages


def mark_received(interaction: discord.Interaction) -> None:
    """Note when the bot started on ``interaction`` (``SDBot.guarded`` does, for every command,
    button and form): the budget of :func:`within_deadline` counts from there, or from when
    Discord made the interaction (its id's timestamp) when the bot got to it late (a busy
    event loop). A clock ahead of Discord's only makes the bot acknowledge sooner."""
    now, made = time.monotonic(), getattr(interaction, "id", None)
    age = (discord.utils.utcnow() - discord.utils.snowflake_time(made)).total_seconds() if made else 0.0
    interaction.extras.setdefault("received", now - age if 0 < age < DISCORD_DEADLINE else now)


async def within_deadline(service: Defers, interaction: discord.Interaction, work: Awaitable[T]) -> T:
    """The result of ``work``; when the interaction has waited longer than :data:`PREPARE_BUDGET`
    (since :func:`mark_received`, so that checks one after another share one budget),
    acknowledge it first (a public "thinking…" that becomes the job's status, or is removed if
    ``work`` then refuses), so that Discord's deadline is never missed.

    Usually it takes a fraction of a second, and a refusal can then be a plain ephemeral reply.
    """
    task = asyncio.ensure_future(work)
    received = interaction.extras.get("received")
    budget = PREPARE_BUDGET if received is None else max(0.0, PREPARE_BUDGET - (time.monotonic() - received))
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout=budget)
    except TimeoutError:
        pass
    try:
        await service.defer(interaction, job_pending=True)
    except BaseException:
        task.cancel()  # nobody will wait for it
        raise
    try:
        return await task
    except BadInput:
        # The first followup after a defer replaces the "thinking…" message and keeps its
        # (public) visibility. Answered with an edit first, the thinking message is an ordinary
        # one that the refusal handler deletes, and the refusal becomes its own ephemeral message.
        with contextlib.suppress(discord.HTTPException):
            await interaction.edit_original_response(content="✖️ Not queued.")
        raise
