"""Community features: /settings (members' defaults), /server (managers' policy and moderation),
/stats, and the policy every new job passes (:func:`check_new_job`, :func:`check_job_fields`).

The settings live in the database (:mod:`db.community`); this module checks what people type
(with the same transformers as /imagine) and turns policy into clear, ephemeral refusals.
Manage Server is checked here, in code, on every /server and /stats use: the command's
``default_member_permissions`` only hides it in the menu, and a server can override that.

This module deliberately does not use ``from __future__ import annotations``: discord.py reads
the option types from the annotations (see bot/commands.py).
"""

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.app_commands import Transform

from bot import render
from bot.checks import require_manage_server, within_deadline
from bot.inputs import BadInput
from db.community import DAY, Admission, Community, MemberDefaults, ServerPolicy, ServerStats
from engine.settings import GenerationSettings, parse_size
from engine.types import SAMPLER_NAMES

if TYPE_CHECKING:
    from bot.client import SDBot

MANAGE = discord.Permissions(manage_guild=True)
#: Options of /settings set, in the order /settings show lists them.
MEMBER_OPTIONS = ("negative", "steps", "size", "sampler", "guidance", "private")


def attach(bot: "SDBot") -> list[app_commands.Command | app_commands.Group]:
    """Give ``bot`` its community store and return the commands to add to its tree."""
    bot.community = Community(bot.queue.engine, clock=bot.clock)  # type: ignore[attr-defined]
    bot.community_commands = build_commands(bot)  # type: ignore[attr-defined]
    return bot.community_commands  # type: ignore[attr-defined]


def commands_of(bot: "SDBot") -> list[app_commands.Command | app_commands.Group]:
    """The community commands of ``bot`` (for /help); none before :func:`attach`."""
    return list(getattr(bot, "community_commands", []))


def store(bot: Any) -> Community:
    community = getattr(bot, "community", None)
    if community is None:  # a bot built without attach(): still correct, just made lazily
        community = bot.community = Community(bot.queue.engine, clock=bot.clock)
    return community


# -- checks -------------------------------------------------------------------------------------

def nsfw_match(prompt: str, words: tuple[str, ...]) -> str | None:
    """The first listed word or phrase that occurs in ``prompt`` as a whole word, or None."""
    for word in words:
        if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, re.IGNORECASE):
            return word
    return None


@dataclass(frozen=True)
class Asker:
    """Who asks for a new job, and where: from an interaction or from a 🔁 reaction."""

    guild_id: int | None
    user_id: int
    channel_id: int | None
    channel: Any  # the channel object when cached (threads, NSFW flag), else None

    @classmethod
    def of(cls, interaction: discord.Interaction) -> "Asker":
        return cls(interaction.guild_id, interaction.user.id, interaction.channel_id, interaction.channel)


def _channel_allowed(asker: Asker, policy: ServerPolicy) -> bool:
    if not policy.allowed_channel_ids:
        return True
    parent = getattr(asker.channel, "parent_id", None)  # a thread counts as its channel
    return asker.channel_id in policy.allowed_channel_ids or parent in policy.allowed_channel_ids


def _is_nsfw_channel(asker: Asker) -> bool:
    is_nsfw = getattr(asker.channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def _when(moment: datetime) -> str:
    """A time every member sees in their own timezone: "in 5 minutes (14:05)"."""
    ts = int(moment.timestamp()) + 1
    return f"<t:{ts}:R> (<t:{ts}:T>)"


def gate(bot: Any, asker: Asker, seen: Admission, *, prompt: str, steps: int, width: int, height: int,
         count: int) -> None:
    """Every rule a new job must pass: the server's (in a server) and the queue's pending limit;
    raises BadInput saying which and what to do. ``seen``: from :func:`admission`."""
    if asker.guild_id is not None:
        _server_gate(bot, asker, seen, prompt=prompt, steps=steps, width=width, height=height, count=count)
    limit = bot.config.queue.pending_limit
    if seen.pending >= limit:
        raise BadInput(f"You already have {seen.pending} jobs waiting (limit {limit}). "
                       "Wait for one to finish or /cancel one.")


def _server_gate(bot: Any, asker: Asker, seen: Admission, *, prompt: str, steps: int, width: int, height: int,
                 count: int) -> None:
    policy = seen.policy
    if seen.barred:
        raise BadInput("You have been barred from using this bot on this server. "
                       "Ask the server's managers if you think this is a mistake.")
    if not _channel_allowed(asker, policy):
        where = ", ".join(f"<#{c}>" for c in policy.allowed_channel_ids)
        raise BadInput(f"On this server I make images only in {where}. Try there.")
    if policy.paused:
        raise BadInput("The server's managers have paused the image queue for now; "
                       "no new jobs are taken. Try again later.")
    word = nsfw_match(prompt, policy.nsfw_words)
    if word is not None and not _is_nsfw_channel(asker):
        raise BadInput(f"“{render.escape(word)}” is on this server's NSFW list: prompts with it are "
                       "allowed only in age-restricted channels.")
    if policy.max_steps is not None and steps > policy.max_steps:
        raise BadInput(f"This server allows at most {policy.max_steps} steps (you asked for {steps}).")
    if policy.max_count is not None and count > policy.max_count:
        raise BadInput(f"This server allows at most {policy.max_count} images per job (you asked for {count}).")
    if (policy.max_width is not None and width > policy.max_width
            or policy.max_height is not None and height > policy.max_height):
        raise BadInput(f"This server allows images up to {policy.max_width}x{policy.max_height} "
                       f"(this one is {width}x{height}); pick a smaller size.")
    if policy.pending_limit is not None and seen.pending >= policy.pending_limit:
        raise BadInput(f"You already have {seen.pending} jobs waiting (this server's limit is "
                       f"{policy.pending_limit}). Wait for one to finish or /cancel one.")
    now = bot.clock()
    usage = seen.usage
    if policy.daily_limit is not None and usage.count >= policy.daily_limit:
        # The window slides: one more job is allowed when the oldest one in it is 24 hours old.
        again = (usage.first_at or now) + DAY
        raise BadInput(f"You have reached this server's limit of {policy.daily_limit} jobs in 24 hours. "
                       f"You can make another {_when(again)}.")
    if policy.cooldown_seconds and usage.last_at is not None:
        again = usage.last_at + timedelta(seconds=policy.cooldown_seconds)
        if again > now:
            wait = (again - now).total_seconds()
            raise BadInput(f"This server has a {policy.cooldown_seconds}-second cooldown between jobs. "
                           f"Try again in {wait:.0f} s, {_when(again)}.")


async def admission(bot: Any, asker: Asker) -> Admission:
    """The member's defaults, the server's policy and the member's standing, in one database
    read on the bot's checking threads (an interaction is waiting on it)."""
    return await bot.run_check(store(bot).admission, asker.guild_id, asker.user_id, bot.clock() - DAY)


async def check_new_job(interaction: discord.Interaction, gen: GenerationSettings, options: dict[str, Any],
                        *, img2img: bool = False) -> dict[str, Any]:
    """The options of /imagine or /img2img with the member's defaults filled in where left out
    (and the configured defaults narrowed to the server's limits); refuses, with BadInput,
    what the server's policy or the queue's pending limit does not allow. The result goes to
    ``generation_fields``."""
    bot = interaction.client
    asker = Asker.of(interaction)
    seen = await admission(bot, asker)
    options = fill_defaults(options, seen.defaults, seen.policy, gen, img2img=img2img)
    if options.get("model") is None and seen.policy.default_model in bot.config.model_names:
        options["model"] = seen.policy.default_model  # the server's choice when the member made none
    width, height = parse_size(options["size"]) if options.get("size") else (gen.default_width, gen.default_height)
    gate(bot, asker, seen, prompt=options["prompt"], steps=options.get("steps") or gen.default_steps,
         width=width, height=height, count=options.get("count") or 1)
    return options


def fill_defaults(options: dict[str, Any], mine: MemberDefaults, policy: ServerPolicy,
                  gen: GenerationSettings, *, img2img: bool = False) -> dict[str, Any]:
    """Options left out (None, or "" for the negative prompt) take the member's default, if it is
    still allowed by the configuration; the bot's own defaults are narrowed to the server's limits.
    (img2img keeps the upload's own shape unless a size is given.)"""
    out = dict(options)
    if not out.get("negative") and mine.negative_prompt:
        out["negative"] = mine.negative_prompt
    if out.get("steps") is None:
        default = mine.steps if mine.steps and mine.steps <= gen.max_steps else gen.default_steps
        out["steps"] = min(default, policy.max_steps or default)
    if out.get("guidance") is None and mine.guidance is not None and mine.guidance <= gen.max_guidance:
        out["guidance"] = mine.guidance
    if out.get("sampler") is None and mine.sampler in gen.samplers:
        out["sampler"] = mine.sampler
    if out.get("size") is None and not img2img:
        out["size"] = _default_size(mine, policy, gen)
    if out.get("count") is None:
        out["count"] = 1
    return out


def _default_size(mine: MemberDefaults, policy: ServerPolicy, gen: GenerationSettings) -> str | None:
    """The member's size if allowed, else the configured default, else the largest that fits."""
    def fits(size: str) -> bool:
        w, h = parse_size(size)
        return (policy.max_width is None or w <= policy.max_width) and (
            policy.max_height is None or h <= policy.max_height)

    theirs = f"{mine.width}x{mine.height}"
    if mine.width and theirs in gen.sizes and fits(theirs):
        return theirs
    default = f"{gen.default_width}x{gen.default_height}"
    if fits(default):
        return None  # generation_fields uses the configured default
    fitting = [s for s in gen.sizes if fits(s)]
    return max(fitting, key=lambda s: parse_size(s)[0] * parse_size(s)[1]) if fitting else None


async def check_job_fields(interaction: discord.Interaction, fields: dict[str, Any]) -> dict[str, Any]:
    """The server's policy and the pending limit for a job made by a button or the Edit modal
    (reroll, vary, upscale, edit); returns ``fields`` unchanged or raises BadInput."""
    bot, asker = interaction.client, Asker.of(interaction)

    async def check() -> None:
        gate(bot, asker, await admission(bot, asker), prompt=fields["prompt"], steps=fields["steps"],
             width=fields["width"], height=fields["height"], count=fields["count"])

    await within_deadline(bot, interaction, check())
    return fields


async def check_reaction_job(bot: Any, payload: discord.RawReactionActionEvent, fields: dict[str, Any]) -> None:
    """The server's policy and the pending limit for a 🔁 reaction reroll; raises BadInput like
    the others."""
    asker = Asker(payload.guild_id, payload.user_id, payload.channel_id, bot.get_channel(payload.channel_id))
    gate(bot, asker, await admission(bot, asker), prompt=fields["prompt"], steps=fields["steps"],
         width=fields["width"], height=fields["height"], count=fields["count"])


# -- rendering ------------------------------------------------------------------------------------

def member_settings_text(mine: MemberDefaults, gen: GenerationSettings) -> str:
    def shown(value: Any, default: str) -> str:
        return f"**{value}**" if value not in (None, "") else f"{default} *(bot default)*"

    size = f"{mine.width}x{mine.height}" if mine.width else None
    return "\n".join([
        "**Your defaults** (used when you leave an option out)",
        f"negative: {shown(render.escape(mine.negative_prompt or ''), repr(gen.default_negative_prompt or 'none'))}",
        f"steps: {shown(mine.steps, str(gen.default_steps))}",
        f"size: {shown(size, f'{gen.default_width}x{gen.default_height}')}",
        f"sampler: {shown(SAMPLER_NAMES.get(mine.sampler or '', mine.sampler), SAMPLER_NAMES[gen.default_sampler])}",
        f"guidance: {shown(mine.guidance, f'{gen.default_guidance:g}')}",
        f"private results: **{'yes' if mine.private_results else 'no'}**",
    ])


def server_settings_text(policy: ServerPolicy, barred: list[int], bot: Any) -> str:
    gen, queue = bot.config.generation, bot.config.queue

    def limit(value: Any, configured: Any) -> str:
        return f"**{value}**" if value is not None else f"{configured} *(bot limit)*"

    size = f"{policy.max_width}x{policy.max_height}" if policy.max_width else None
    channels = ", ".join(f"<#{c}>" for c in policy.allowed_channel_ids) or "every channel"
    lines = [
        f"**Server settings**{' — ⏸️ queue paused' if policy.paused else ''}",
        f"channels: {channels}",
        f"max steps: {limit(policy.max_steps, gen.max_steps)}; max size: "
        f"{limit(size, f'{gen.max_width}x{gen.max_height}')}; max count: {limit(policy.max_count, gen.max_count)}",
        f"jobs waiting per member: {limit(policy.pending_limit, queue.pending_limit)}; "
        f"per 24 hours: {limit(policy.daily_limit, 'no limit')}; "
        f"cooldown: **{policy.cooldown_seconds} s**",
        f"NSFW words (only in age-restricted channels): "
        f"{render.escape(', '.join(policy.nsfw_words)) or 'none'}",
        f"default model: {limit(policy.default_model, bot.model_name)}",
        f"barred members: {', '.join(f'<@{u}>' for u in barred) or 'none'}",
    ]
    return "\n".join(lines)


def stats_text(stats: ServerStats, member_name: Any) -> str:
    def seconds(value: float | None) -> str:
        return "no finished jobs yet" if value is None else f"{value:.1f} s"

    status = ", ".join(f"{n} {name}" for name, n in sorted(stats.week_by_status.items()))
    top = "\n".join(f"{i}. {member_name(user_id)}: {n}" for i, (user_id, n) in enumerate(stats.top_members, 1))
    return "\n".join([
        f"**Jobs today:** {stats.jobs_today} · **this week:** {stats.jobs_week}"
        + (f" ({status})" if status else ""),
        f"**Average wait:** {seconds(stats.avg_wait_seconds)} · "
        f"**average generation:** {seconds(stats.avg_generation_seconds)}",
        f"**Queue now:** {stats.queued_here} waiting and {stats.running_here} running here; "
        f"{stats.queued_everywhere} waiting on all servers",
        "**Top members this week:**",
        top or "nobody yet",
        "*Days and weeks are in UTC; weeks start on Monday.*",
    ])


def audit_text(entries: list[Any]) -> str:
    if not entries:
        return "No changes have been made yet."
    lines = []
    for e in entries:
        ts = int(e.created_at.timestamp())
        target = f" <@{e.target_id}>" if e.target_id else ""
        change = f"{render.escape(e.old_value or '—')} → {render.escape(e.new_value or '—')}"
        lines.append(f"<t:{ts}:f> <@{e.actor_id}> **{e.action}**{target}: {render.excerpt(change, 120)}")
    return render.clip("\n".join(lines), 1900)


# -- the commands ----------------------------------------------------------------------------------

def iter_commands(commands: list[Any]) -> Iterator[app_commands.Command]:
    """Every command, with groups opened into their subcommands (for /help)."""
    for command in commands:
        if isinstance(command, app_commands.Group):
            yield from iter_commands(command.commands)
        else:
            yield command


def build_commands(bot: "SDBot") -> list[app_commands.Command | app_commands.Group]:
    from bot.commands import Bounded, OneOf, Text, size_choices  # not at import: commands imports us

    gen, queue_settings = bot.config.generation, bot.config.queue
    community = store(bot)
    Steps = Bounded("steps", int, 1, gen.max_steps)
    Guidance = Bounded("guidance", float, 0, gen.max_guidance)
    Size = OneOf("size", size_choices(gen))
    Sampler = OneOf("sampler", {s: SAMPLER_NAMES[s] for s in gen.samplers})
    Negative = Text("negative", bot.config.discord.max_prompt_chars, False)
    Setting = OneOf("setting", {"all": "all", **{o: o for o in MEMBER_OPTIONS}})

    async def reply(interaction: discord.Interaction, text: str) -> None:
        await interaction.response.send_message(text, ephemeral=True,
                                                allowed_mentions=discord.AllowedMentions.none())

    # /settings: a member's own defaults -----------------------------------------------------------
    settings = app_commands.Group(name="settings", description="Your defaults for /imagine and /img2img")

    @settings.command(name="show", description="Show your defaults")
    async def settings_show(interaction: discord.Interaction) -> None:
        mine = await asyncio.to_thread(community.member_defaults, interaction.user.id)
        await reply(interaction, member_settings_text(mine, gen))

    @settings.command(name="set", description="Set defaults used when you leave an option out")
    @app_commands.describe(negative="Your default negative prompt", steps=f"Steps (1 to {gen.max_steps})",
                           size="Width x height", sampler="Sampler",
                           guidance=f"Guidance (0 to {gen.max_guidance:g})",
                           private="Whether your results should be private")
    async def settings_set(interaction: discord.Interaction, negative: Transform[str, Negative] = None,
                           steps: Transform[int, Steps] = None, size: Transform[str, Size] = None,
                           sampler: Transform[str, Sampler] = None, guidance: Transform[float, Guidance] = None,
                           private: bool = None) -> None:
        changes: dict[str, Any] = {}
        if negative:
            changes["negative_prompt"] = negative
        if size is not None:
            changes["width"], changes["height"] = parse_size(size)
        for name, value in (("steps", steps), ("sampler", sampler), ("guidance", guidance),
                            ("private_results", private)):
            if value is not None:
                changes[name] = value
        if not changes:
            raise BadInput("Give at least one option to set, e.g. `/settings set steps:30`. "
                           "`/settings show` lists your defaults.")
        mine = await asyncio.to_thread(community.set_member_defaults, interaction.user.id, **changes)
        await reply(interaction, "Saved.\n" + member_settings_text(mine, gen))

    @settings.command(name="reset", description="Go back to the bot's defaults (all, or one setting)")
    @app_commands.describe(setting="Which default to forget (all when left out)")
    async def settings_reset(interaction: discord.Interaction, setting: Transform[str, Setting] = "all") -> None:
        user_id = interaction.user.id
        if setting == "all":
            await asyncio.to_thread(community.reset_member_defaults, user_id)
            mine = MemberDefaults()
        else:
            columns = {"negative": ["negative_prompt"], "size": ["width", "height"],
                       "private": ["private_results"]}.get(setting, [setting])
            cleared = {c: (False if c == "private_results" else None) for c in columns}
            mine = await asyncio.to_thread(community.set_member_defaults, user_id, **cleared)
        await reply(interaction, "Reset.\n" + member_settings_text(mine, gen))

    # /server: the managers' policy and moderation ----------------------------------------------
    server = app_commands.Group(name="server", description="Server settings and moderation (Manage Server)",
                                default_permissions=MANAGE, guild_only=True)

    async def change(interaction: discord.Interaction, **changes: Any) -> ServerPolicy:
        require_manage_server(interaction)
        return await asyncio.to_thread(community.update_server, interaction.guild_id, interaction.user.id,
                                       **changes)

    async def show_server(interaction: discord.Interaction, policy: ServerPolicy, note: str = "") -> None:
        barred = await asyncio.to_thread(community.barred, interaction.guild_id)
        await reply(interaction, render.clip(note + server_settings_text(policy, barred, bot), 2000))

    @server.command(name="show", description="This server's settings")
    async def server_show(interaction: discord.Interaction) -> None:
        require_manage_server(interaction)
        policy = await asyncio.to_thread(community.server_policy, interaction.guild_id)
        await show_server(interaction, policy)

    @server.command(name="channels", description="Channels the bot answers in (all when none are set)")
    @app_commands.describe(action="add or remove a channel, or clear the list (every channel)",
                           channel="The channel to add or remove")
    async def server_channels(interaction: discord.Interaction, action: Literal["add", "remove", "clear"],
                              channel: discord.TextChannel = None) -> None:
        require_manage_server(interaction)
        current = (await asyncio.to_thread(community.server_policy, interaction.guild_id)).allowed_channel_ids
        if action == "clear":
            channels: tuple[int, ...] = ()
        elif channel is None:
            raise BadInput(f"Name the channel to {action}, e.g. `/server channels {action} #art`.")
        elif action == "add":
            channels = tuple(dict.fromkeys((*current, channel.id)))
        else:
            channels = tuple(c for c in current if c != channel.id)
        policy = await change(interaction, allowed_channel_ids=list(channels))
        await show_server(interaction, policy, "Saved.\n")

    @server.command(name="limits", description="Limits narrower than the bot's (0 or 'any': the bot's own)")
    @app_commands.describe(
        max_steps=f"Most steps per job (0: the bot's {gen.max_steps})",
        max_size="Largest size allowed", max_count=f"Most images per job (0: the bot's {gen.max_count})",
        pending_limit=f"Jobs a member may have waiting (0: the bot's {queue_settings.pending_limit})",
        daily_limit="Jobs a member may make in 24 hours (0: no limit)",
        cooldown="Seconds between a member's jobs (0: none)")
    async def server_limits(
            interaction: discord.Interaction,
            max_steps: Transform[int, Bounded("max_steps", int, 0, gen.max_steps)] = None,
            max_size: Transform[str, OneOf("max_size", {"any": "any", **size_choices(gen)})] = None,
            max_count: Transform[int, Bounded("max_count", int, 0, gen.max_count)] = None,
            pending_limit: Transform[int, Bounded("pending_limit", int, 0, queue_settings.pending_limit)] = None,
            daily_limit: Transform[int, Bounded("daily_limit", int, 0, 100_000)] = None,
            cooldown: Transform[int, Bounded("cooldown", int, 0, 86_400)] = None) -> None:
        require_manage_server(interaction)
        changes: dict[str, Any] = {}
        for name, value in (("max_steps", max_steps), ("max_count", max_count),
                            ("pending_limit", pending_limit), ("daily_limit", daily_limit)):
            if value is not None:
                changes[name] = value or None
        if max_size is not None:
            changes["max_width"], changes["max_height"] = (None, None) if max_size == "any" else parse_size(max_size)
        if cooldown is not None:
            changes["cooldown_seconds"] = cooldown
        if not changes:
            raise BadInput("Give at least one limit, e.g. `/server limits max_steps:30 cooldown:20`.")
        await show_server(interaction, await change(interaction, **changes), "Saved.\n")

    @server.command(name="nsfw", description="Words allowed only in age-restricted channels")
    @app_commands.describe(action="add or remove words, or clear the list",
                           words="Words or phrases, separated by commas")
    async def server_nsfw(interaction: discord.Interaction, action: Literal["add", "remove", "clear"],
                          words: app_commands.Range[str, 1, 1000] = None) -> None:
        require_manage_server(interaction)
        given = [w.strip().lower() for w in (words or "").split(",") if w.strip()]
        if action != "clear" and not given:
            raise BadInput(f"Give the words to {action}, separated by commas.")
        current = (await asyncio.to_thread(community.server_policy, interaction.guild_id)).nsfw_words
        if action == "clear":
            new: tuple[str, ...] = ()
        elif action == "add":
            new = tuple(dict.fromkeys((*current, *given)))
        else:
            new = tuple(w for w in current if w not in given)
        if len(new) > 500:
            raise BadInput("The NSFW list can hold up to 500 words or phrases.")
        await show_server(interaction, await change(interaction, nsfw_words=list(new)), "Saved.\n")

    def model_names() -> list[str]:
        return list(bot.config.model_names)

    @server.command(name="model", description="The model used when a member does not choose one")
    @app_commands.describe(name="A model name from the bot's configuration (left out: the bot's default)")
    async def server_model(interaction: discord.Interaction, name: app_commands.Range[str, 1, 200] = None) -> None:
        require_manage_server(interaction)
        if name is not None and name not in model_names():
            raise BadInput(f"There is no model called `{render.escape(name)}`; "
                           f"models: {', '.join(model_names())}.")
        await show_server(interaction, await change(interaction, default_model=name), "Saved.\n")

    @server_model.autocomplete("name")
    async def _model_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=n, value=n) for n in model_names() if current.lower() in n.lower()][:25]

    @server.command(name="pause", description="Stop taking and starting new jobs on this server")
    async def server_pause(interaction: discord.Interaction) -> None:
        await change(interaction, paused=True)
        await reply(interaction, "⏸️ The queue is paused: new jobs are refused and waiting ones wait. "
                                 "`/server resume` starts it again.")

    @server.command(name="resume", description="Take and start jobs again")
    async def server_resume(interaction: discord.Interaction) -> None:
        await change(interaction, paused=False)
        await asyncio.to_thread(bot.queue.notify_new_job)  # wake the workers for the waiting jobs
        if bot.runner is not None:
            bot.runner.wake()
        await reply(interaction, "▶️ The queue is running again.")

    @server.command(name="purge", description="Cancel every waiting or running job of a member")
    @app_commands.describe(member="Whose jobs to cancel")
    async def server_purge(interaction: discord.Interaction, member: discord.Member) -> None:
        require_manage_server(interaction)
        ids = await asyncio.to_thread(community.purge, interaction.guild_id, member.id, interaction.user.id)
        for job_id in ids:
            if bot.runner is not None:
                bot.runner.cancel(job_id)
            bot.delivery.on_finished(job_id)
        await reply(interaction, f"Cancelled {len(ids)} job(s) of {member.mention}."
                    + (f" ({', '.join(f'#{i}' for i in ids)})" if ids else ""))

    @server.command(name="bar", description="Bar a member from using the bot on this server")
    @app_commands.describe(member="The member to bar")
    async def server_bar(interaction: discord.Interaction, member: discord.Member) -> None:
        require_manage_server(interaction)
        added = await asyncio.to_thread(community.bar, interaction.guild_id, member.id, interaction.user.id)
        await reply(interaction, f"{member.mention} is {'now' if added else 'already'} barred. "
                                 "Their waiting jobs stay; `/server purge` cancels them.")

    @server.command(name="unbar", description="Let a barred member use the bot again")
    @app_commands.describe(member="The member to let back in")
    async def server_unbar(interaction: discord.Interaction, member: discord.Member) -> None:
        require_manage_server(interaction)
        removed = await asyncio.to_thread(community.unbar, interaction.guild_id, member.id, interaction.user.id)
        await reply(interaction, f"{member.mention} {'may use the bot again' if removed else 'was not barred'}.")

    @server.command(name="log", description="Who changed which setting, and when")
    async def server_log(interaction: discord.Interaction) -> None:
        require_manage_server(interaction)
        entries = await asyncio.to_thread(community.audit_log, interaction.guild_id, 20)
        await reply(interaction, audit_text(entries))

    # /stats ------------------------------------------------------------------------------------
    @app_commands.command(name="stats", description="Jobs, top members, waits and the queue (Manage Server)")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def stats(interaction: discord.Interaction) -> None:
        require_manage_server(interaction)
        numbers = await asyncio.to_thread(community.stats, interaction.guild_id)
        guild = interaction.guild

        def name(user_id: int) -> str:
            member = guild.get_member(user_id) if guild is not None else None
            return render.escape(member.display_name) if member is not None else f"<@{user_id}>"

        await reply(interaction, render.clip(stats_text(numbers, name), 2000))

    return [settings, server, stats]


__all__ = ["attach", "check_job_fields", "check_new_job", "commands_of", "fill_defaults", "iter_commands",
           "nsfw_match"]
