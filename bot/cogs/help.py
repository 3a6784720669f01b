"""/help: every command with its options and limits, read from the registered commands."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import render
from bot.layout import describe_buttons
from bot.prompt_params import prompt_help
from bot.service import JobService
from bot.texts import models_text


def iter_commands(items: Iterable[Any]) -> Iterator[app_commands.Command]:
    """Every slash command, with groups opened into their subcommands (context menus left out)."""
    for item in items:
        if isinstance(item, app_commands.Group):
            yield from iter_commands(item.commands)
        elif isinstance(item, app_commands.Command):
            yield item


TITLE = "Stable Diffusion bot"


def number(value: float) -> str:
    """Every digit of a whole number ("4294967295", not "4.29497e+09"); floats as typed."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def limits_of(p: app_commands.Parameter, service: JobService) -> list[str]:
    limits = []
    if p.choices:
        limits.append("one of " + ", ".join(str(c.value) for c in p.choices))
    elif p.type is discord.AppCommandOptionType.string and p.max_value:
        limits.append(f"up to {number(p.max_value)} characters")
    elif p.min_value is not None and p.max_value is not None and p.name != "job":
        limits.append(f"{number(p.min_value)} to {number(p.max_value)}")
    if p.type is discord.AppCommandOptionType.attachment:
        dc = service.config.discord
        limits.append(
            ", ".join(t.removeprefix("image/").upper() for t in dc.allowed_image_types)
            + f", up to {dc.max_attachment_bytes / 1048576:.1f} MiB"
        )
    return limits


def help_pages(commands_: Iterable[Any], service: JobService) -> list[str]:
    """/help's pages, each within an embed's 4096 characters (:func:`help_messages` packs them
    into messages): every command with its options; each option once with its limits (from the
    definitions, so /help never disagrees with what Discord is told); the menus and buttons."""
    commands_ = list(commands_)
    lines, options, nested = ["**Commands**"], {}, set()
    for command in iter_commands(commands_):
        group = command.parent
        if group is not None and group.parent is not None:  # /server style add|remove...: one line, to fit
            if group.qualified_name not in nested:
                nested.add(group.qualified_name)
                names = "|".join(c.name for c in group.commands)
                lines.append(f"`/{group.qualified_name} {names}`: {group.description}")
            continue
        params = [] if command.parent else command.parameters  # subcommands: one line, to fit
        shown = " ".join(p.name if p.required else f"[{p.name}]" for p in params)
        lines.append(f"`/{command.qualified_name}{' ' + shown if shown else ''}`: {command.description}")
        for p in params:
            options.setdefault(p.name, p)
    pages = ["\n".join(lines)]
    lines = ["**Options**"]
    for name, p in options.items():
        limits = limits_of(p, service)
        lines.append(f"`{name}`: {p.description}" + (f" ({'; '.join(limits)})" if limits else ""))
    pages.append("\n".join(lines))
    lines = []
    menus = [item.name for item in commands_ if isinstance(item, app_commands.ContextMenu)]
    if menus:
        lines += [
            "",
            "**On any message** (right-click → Apps): "
            + ", ".join(f"**{m}**" for m in menus)
            + ": a PNG's A1111 parameters, a job with them, its image as a reference",
        ]
    lines += [
        "",
        "**In the prompt**",
        prompt_help(),
        "",
        "**Models** (`model`; each takes its own defaults, and refuses what does not apply to it)",
        models_text(service.config),
        "",
        "**Buttons on results**",
        describe_buttons(service.config.upscalers.default_upscaler()),
        "",
        f"You can have {service.config.queue.pending_limit} jobs waiting at a time.",
    ]
    pages.append("\n".join(lines).strip())
    return [piece for page in pages for piece in split_lines(page, EMBED_CHARS)]


#: Discord's limits: characters in an embed's description, and in all the embeds of one message.
EMBED_CHARS, MESSAGE_CHARS = 4096, 6000


def split_lines(text: str, limit: int) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut between lines (a longer line is clipped)."""
    pieces, current = [], ""
    for line in text.split("\n"):
        line = render.clip(line, limit)
        if current and len(current) + 1 + len(line) > limit:
            pieces.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    return [*pieces, current] if current else pieces


def help_messages(pages: list[str]) -> list[list[discord.Embed]]:
    """The pages as messages of embeds, each message within Discord's 6000 characters (the first
    carries the title): /help grows with the configuration, and nothing of it is cut."""
    messages: list[list[discord.Embed]] = [[]]
    used = len(TITLE)
    for page in pages:
        if messages[-1] and used + len(page) > MESSAGE_CHARS:
            messages.append([])
            used = 0
        title = TITLE if not messages[0] else None
        messages[-1].append(discord.Embed(title=title, description=page))
        used += len(page)
    return messages


class HelpCog(commands.Cog, name="help"):
    def __init__(self, service: JobService, bot: commands.Bot) -> None:
        self.service, self.bot = service, bot

    @app_commands.command(name="help", description="What the bot can do, and its limits")
    async def help(self, interaction: discord.Interaction) -> None:
        tree = self.bot.tree  # registered per server (copied there) or globally
        pages = help_pages(tree.get_commands(guild=interaction.guild) or tree.get_commands(), self.service)
        first, *more = help_messages(pages)
        await interaction.response.send_message(embeds=first, ephemeral=True)
        for embeds in more:  # a long configuration's /help goes on in followups, only to the asker
            await interaction.followup.send(embeds=embeds, ephemeral=True)
