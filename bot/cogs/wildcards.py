"""/server wildcards: the server's wildcard lists, which prompts draw from with ``__name__``.

A group of its own (its commands would take the server cog past its size), put under /server
by :func:`~bot.cogs.server.server_cog`. Manage Server is checked on every use, as the rest of /server.
(Annotations stay objects: discord.py reads them.)
"""

import asyncio

import discord
from discord import app_commands

from bot import render
from bot.checks import manage_server_only
from bot.inputs import BadInput, check_attachment_meta
from bot.service import JobService
from db.wildcards import MAX_WILDCARD_BYTES, WildcardError, check_name, parse_lines


def wildcards_group(service: JobService) -> app_commands.Group:
    class WildcardLists(app_commands.Group):
        async def _store(self, interaction: discord.Interaction, name: str, data: bytes | str) -> None:
            try:
                name = check_name(name)
                lines = parse_lines(data)
                count = await asyncio.to_thread(
                    service.wildcards.put, interaction.guild_id, interaction.user.id, name, lines
                )
            except WildcardError as e:
                raise BadInput(str(e)) from None
            await service.reply(
                interaction,
                f"Saved wildcard list **{name}** ({len(lines)} entries; {count} list(s) on this server): "
                f"prompts draw one with `__{name}__`.",
            )

        @app_commands.command(name="add", description="Add or replace a list (entries split by |)")
        @app_commands.describe(
            name="The list's name, used as __name__ in prompts", entries="e.g. red | deep blue | green"
        )
        @manage_server_only
        async def add(
            self,
            interaction: discord.Interaction,
            name: app_commands.Range[str, 1, 68],
            entries: app_commands.Range[str, 1, 4000],
        ) -> None:
            await service.guarded(interaction, self._store(interaction, name, "\n".join(entries.split("|"))))

        @app_commands.command(name="import", description="Import a .txt list, one entry a line")
        @app_commands.describe(
            name="The list's name, used as __name__ in prompts", file="A .txt file, one entry per line"
        )
        @manage_server_only
        async def import_(
            self, interaction: discord.Interaction, name: app_commands.Range[str, 1, 68], file: discord.Attachment
        ) -> None:
            async def store() -> None:
                check_attachment_meta(
                    filename=file.filename,
                    content_type="text/plain",
                    size=file.size,
                    url=file.url,
                    allowed_types=("text/plain",),
                    max_bytes=MAX_WILDCARD_BYTES,
                    allowed_hosts=service.allowed_hosts,
                )
                await self._store(interaction, name, await service.download(file.url, MAX_WILDCARD_BYTES))

            await service.guarded(interaction, store())

        @app_commands.command(name="remove", description="Remove a list")
        @app_commands.describe(name="The list to remove")
        @manage_server_only
        async def remove(self, interaction: discord.Interaction, name: app_commands.Range[str, 1, 68]) -> None:
            async def drop() -> None:
                listed = name.strip().strip("_") if name.strip().startswith("__") else name.strip()
                if not await asyncio.to_thread(
                    service.wildcards.remove, interaction.guild_id, interaction.user.id, listed
                ):
                    raise BadInput(f"There is no wildcard list `{render.escape(listed)}`.")
                await service.reply(interaction, f"Removed wildcard list **{render.escape(listed)}**.")

            await service.guarded(interaction, drop())

        @app_commands.command(name="list", description="List them")
        @manage_server_only
        async def list_(self, interaction: discord.Interaction) -> None:
            sizes = await service.run_check(service.wildcards.sizes, interaction.guild_id)
            lines = [f"`__{name}__` ({count} entries)" for name, count in sizes]
            text = "\n".join(lines) or "No wildcard lists yet: `/server wildcards add` or `/server wildcards import`."
            await service.reply(interaction, render.clip(text, 2000))

    return WildcardLists(name="wildcards", description="Lists prompts draw from with __name__ (Dynamic Prompts)")
