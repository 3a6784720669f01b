"""What delivery needs of the Discord client: these few calls, not the whole bot.

The client (:class:`bot.client.SDBot`) satisfies :class:`DiscordClient` structurally; delivery
never imports it, so the wiring (:mod:`bot.wiring`) builds delivery and hands it to the client
without an import circle, and a test can give delivery a client of its own.
"""

from __future__ import annotations

from typing import Protocol

import discord


class DiscordClient(Protocol):
    """The Discord calls delivery makes: find a channel, server or DM, and a job's interaction."""

    @property
    def user(self) -> discord.ClientUser | None: ...

    def get_channel(self, id: int, /) -> object | None: ...

    def get_guild(self, id: int, /) -> discord.Guild | None: ...

    def get_partial_messageable(
        self, id: int, *, guild_id: int | None = None, type: discord.ChannelType | None = None
    ) -> discord.PartialMessageable: ...

    async def create_dm(self, user: discord.abc.Snowflake) -> discord.DMChannel: ...

    def interaction_webhook(self, app_id: int, token: str) -> discord.Webhook:
        """The webhook of an interaction (``token``), to edit its original response."""
        ...
