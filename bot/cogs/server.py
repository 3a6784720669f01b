"""/server: the managers' policy and moderation (Manage Server). (Annotations stay objects.)

Manage Server is checked in code on every use (:func:`~bot.checks.require_manage_server`): the
command's ``default_permissions`` only hides it in the menu, and a server can override that.
Every change is written to the audit log by :class:`~db.community.Community`.
"""

import asyncio
from typing import Any, Literal

import discord
from discord import app_commands
from discord.app_commands import Transform
from discord.ext import commands

from bot import render
from bot.checks import require_manage_server
from bot.cogs.wildcards import wildcards_group
from bot.inputs import BadInput, check_attachment_meta
from bot.references import REFERENCE_MODES
from bot.safety.moderation import Moderation
from bot.service import JobService
from bot.texts import audit_text, server_settings_text
from bot.transformers import Bounded, ModelName, OneOf, Options, Text
from db.community import ServerPolicy
from db.styles import StyleError, StyleText, parse_styles_csv

#: The largest styles.csv accepted (A1111 users' files are a few KiB to a few hundred).
MAX_CSV_BYTES = 1024 * 1024


def server_cog(service: JobService, o: Options, moderation: Moderation) -> commands.Cog:
    config = service.config
    gen, queue_settings = config.generation, config.queue
    MaxSize = OneOf("max_size", {"any": "any", **{size: size for size in gen.sizes}})
    Model = ModelName(config.model_names, option="name")
    StylePrompt = Text("prompt", config.discord.max_prompt_chars, True, label="style's prompt")
    StyleNegative = Text("negative", config.discord.max_prompt_chars, False, label="style's negative prompt")

    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    class Server(
        commands.GroupCog, group_name="server", group_description="Server settings and moderation (Manage Server)"
    ):
        def __init__(self, service: JobService) -> None:
            self.service = service
            self.community = service.community
            super().__init__()

        async def interaction_check(self, interaction: discord.Interaction) -> bool:
            return require_manage_server(interaction)

        async def _change(self, interaction: discord.Interaction, **changes: Any) -> ServerPolicy:
            return await asyncio.to_thread(
                self.community.update_server, interaction.guild_id, interaction.user.id, **changes
            )

        async def _show(self, interaction: discord.Interaction, policy: ServerPolicy, note: str = "") -> None:
            barred = await self.service.run_check(self.community.barred, interaction.guild_id)
            await self.service.reply(
                interaction, render.clip(note + server_settings_text(policy, barred, config), 2000)
            )

        async def _saved(self, interaction: discord.Interaction, **changes: Any) -> None:
            await self._show(interaction, await self._change(interaction, **changes), "Saved.\n")

        async def _policy(self, interaction: discord.Interaction) -> ServerPolicy:
            return await self.service.run_check(self.community.server_policy, interaction.guild_id)

        @app_commands.command(name="show", description="This server's settings")
        async def show(self, interaction: discord.Interaction) -> None:
            await self._show(interaction, await self._policy(interaction))

        @app_commands.command(name="channels", description="Channels the bot answers in (all when none are set)")
        @app_commands.describe(
            action="add or remove a channel, or clear the list (every channel)", channel="The channel to add or remove"
        )
        async def channels(
            self,
            interaction: discord.Interaction,
            action: Literal["add", "remove", "clear"],
            channel: discord.TextChannel = None,
        ) -> None:
            current = (await self._policy(interaction)).allowed_channel_ids
            if action == "clear":
                chosen: tuple[int, ...] = ()
            elif channel is None:
                raise BadInput(f"Name the channel to {action}, e.g. `/server channels {action} #art`.")
            elif action == "add":
                chosen = tuple(dict.fromkeys((*current, channel.id)))
            else:
                chosen = tuple(c for c in current if c != channel.id)
            await self._saved(interaction, allowed_channel_ids=list(chosen))

        @app_commands.command(name="limits", description="Limits narrower than the bot's (0 or 'any': the bot's own)")
        @app_commands.describe(
            max_steps=f"Most steps per job (0: the bot's {gen.max_steps})",
            max_size="Largest size allowed",
            max_count=f"Most images per job (0: the bot's {gen.max_count})",
            pending_limit=f"Jobs a member may have waiting (0: the bot's {queue_settings.pending_limit})",
            daily_limit="Jobs a member may make in 24 hours (0: no limit)",
            cooldown="Seconds between a member's jobs (0: none)",
        )
        async def limits(
            self,
            interaction: discord.Interaction,
            max_steps: Transform[int, Bounded("max_steps", int, 0, gen.max_steps)] = None,
            max_size: Transform[str, MaxSize] = None,
            max_count: Transform[int, Bounded("max_count", int, 0, gen.max_count)] = None,
            pending_limit: Transform[int, Bounded("pending_limit", int, 0, queue_settings.pending_limit)] = None,
            daily_limit: Transform[int, Bounded("daily_limit", int, 0, 100_000)] = None,
            cooldown: Transform[int, Bounded("cooldown", int, 0, 86_400)] = None,
        ) -> None:
            changes: dict[str, Any] = {}
            for name, value in (
                ("max_steps", max_steps),
                ("max_count", max_count),
                ("pending_limit", pending_limit),
                ("daily_limit", daily_limit),
            ):
                if value is not None:
                    changes[name] = value or None
            if max_size is not None:
                width, height = (None, None) if max_size == "any" else gen.size_pairs[gen.sizes.index(max_size)]
                changes["max_width"], changes["max_height"] = width, height
            if cooldown is not None:
                changes["cooldown_seconds"] = cooldown
            if not changes:
                raise BadInput("Give at least one limit, e.g. `/server limits max_steps:30 cooldown:20`.")
            await self._saved(interaction, **changes)

        @app_commands.command(name="nsfw", description="Words allowed only in age-restricted channels")
        @app_commands.describe(
            action="add or remove words, or clear the list", words="Words or phrases, separated by commas"
        )
        async def nsfw(
            self,
            interaction: discord.Interaction,
            action: Literal["add", "remove", "clear"],
            words: app_commands.Range[str, 1, 1000] = None,
        ) -> None:
            given = [w.strip().lower() for w in (words or "").split(",") if w.strip()]
            if action != "clear" and not given:
                raise BadInput(f"Give the words to {action}, separated by commas.")
            current = (await self._policy(interaction)).nsfw_words
            if action == "clear":
                new: tuple[str, ...] = ()
            elif action == "add":
                new = tuple(dict.fromkeys((*current, *given)))
            else:
                new = tuple(w for w in current if w not in given)
            if len(new) > 500:
                raise BadInput("The NSFW list can hold up to 500 words or phrases.")
            await self._saved(interaction, nsfw_words=list(new))

        @app_commands.command(name="references", description="Turn a reference mode on or off")
        @app_commands.describe(
            mode="edges, tile, blur, depth, pose, lineart, softedge, style or subject", on="True: on, False: off"
        )
        async def references(
            self,
            interaction: discord.Interaction,
            mode: Transform[str, OneOf("mode", {m: m for m in REFERENCE_MODES})],
            on: bool,
        ) -> None:
            current = (await self._policy(interaction)).reference_modes_off
            new = tuple(m for m in current if m != mode) if on else tuple(dict.fromkeys((*current, mode)))
            await self._saved(interaction, reference_modes_off=list(new))

        @app_commands.command(name="model", description="The model used when a member does not choose one")
        @app_commands.describe(name="A model name from the bot's configuration (left out: the bot's default)")
        async def model(self, interaction: discord.Interaction, name: Transform[str, Model] = None) -> None:
            await self._saved(interaction, default_model=name)

        @app_commands.command(name="clip_skip", description="The CLIP skip used when a member does not choose one")
        @app_commands.describe(value="1 to 12 (2 suits many anime models); left out: each model's own default")
        async def clip_skip(
            self, interaction: discord.Interaction, value: Transform[int, Bounded("value", int, 1, 12)] = None
        ) -> None:
            await self._saved(interaction, clip_skip=value)

        @app_commands.command(name="pause", description="Stop taking and starting new jobs on this server")
        async def pause(self, interaction: discord.Interaction) -> None:
            await self._change(interaction, paused=True)
            await self.service.reply(
                interaction,
                "⏸️ The queue is paused: new jobs are refused and waiting ones wait. `/server resume` starts it again.",
            )

        @app_commands.command(name="resume", description="Take and start jobs again")
        async def resume(self, interaction: discord.Interaction) -> None:
            await self._change(interaction, paused=False)
            await asyncio.to_thread(self.service.wake_workers)  # for the waiting jobs
            await self.service.reply(interaction, "▶️ The queue is running again.")

        @app_commands.command(name="purge", description="Cancel every waiting or running job of a member")
        @app_commands.describe(member="Whose jobs to cancel")
        async def purge(self, interaction: discord.Interaction, member: discord.Member) -> None:
            ids = await asyncio.to_thread(self.community.purge, interaction.guild_id, member.id, interaction.user.id)
            self.service.stopped(ids)
            await self.service.reply(
                interaction,
                f"Cancelled {len(ids)} job(s) of {member.mention}."
                + (f" ({', '.join(f'#{i}' for i in ids)})" if ids else ""),
            )

        @app_commands.command(name="bar", description="Bar a member from using the bot on this server")
        @app_commands.describe(member="The member to bar")
        async def bar(self, interaction: discord.Interaction, member: discord.Member) -> None:
            added = await asyncio.to_thread(self.community.bar, interaction.guild_id, member.id, interaction.user.id)
            await self.service.reply(
                interaction,
                f"{member.mention} is {'now' if added else 'already'} barred. "
                "Their waiting jobs stay; `/server purge` cancels them.",
            )

        @app_commands.command(name="unbar", description="Let a barred member use the bot again")
        @app_commands.describe(member="The member to let back in")
        async def unbar(self, interaction: discord.Interaction, member: discord.Member) -> None:
            removed = await asyncio.to_thread(
                self.community.unbar, interaction.guild_id, member.id, interaction.user.id
            )
            await self.service.reply(
                interaction, f"{member.mention} {'may use the bot again' if removed else 'was not barred'}."
            )

        wildcards = wildcards_group(service)  # /server wildcards add|import|remove|list

        style = app_commands.Group(name="style", description="Named prompt templates members pick with `style`")

        @style.command(name="add", description="Add or replace a style ({prompt} marks where the member's prompt goes)")
        @app_commands.describe(
            name="The style's name",
            prompt="Its prompt, e.g. `{prompt}, watercolor, soft light`",
            negative="Its negative prompt (added to the member's)",
        )
        async def style_add(
            self,
            interaction: discord.Interaction,
            name: app_commands.Range[str, 1, 100],
            prompt: Transform[str, StylePrompt],
            negative: Transform[str, StyleNegative] = None,
        ) -> None:
            try:
                count = await asyncio.to_thread(
                    self.service.styles.put,
                    interaction.guild_id,
                    interaction.user.id,
                    [StyleText(name.strip(), prompt, negative or "")],
                )
            except StyleError as e:
                raise BadInput(str(e)) from None
            await self.service.reply(
                interaction, f"Saved style **{render.escape(name.strip())}** ({count} style(s) on this server)."
            )

        @style.command(name="remove", description="Remove a style")
        @app_commands.describe(name="The style to remove")
        async def style_remove(self, interaction: discord.Interaction, name: Transform[str, o.style]) -> None:
            removed = await asyncio.to_thread(
                self.service.styles.remove, interaction.guild_id, interaction.user.id, name
            )
            if not removed:
                raise BadInput(f"There is no style called `{render.escape(name)}`.")
            await self.service.reply(interaction, f"Removed style **{render.escape(name)}**.")

        @style.command(name="list", description="This server's styles")
        async def style_list(self, interaction: discord.Interaction) -> None:
            styles = await self.service.run_check(self.service.styles.all, interaction.guild_id)
            lines = [
                f"**{render.escape(s.name)}**: {render.excerpt(s.prompt, 80)}"
                + (f" · negative: {render.excerpt(s.negative_prompt, 40)}" if s.negative_prompt else "")
                for s in styles
            ]
            await self.service.reply(
                interaction,
                render.clip("\n".join(lines) or "No styles yet: `/server style add` or `/server style import`.", 2000),
            )

        @style.command(name="import", description="Import an AUTOMATIC1111 styles.csv (name, prompt, negative_prompt)")
        @app_commands.describe(file="styles.csv from AUTOMATIC1111 or Forge")
        async def style_import(self, interaction: discord.Interaction, file: discord.Attachment) -> None:
            kind = (file.content_type or "").split(";")[0]
            if not file.filename.lower().endswith(".csv") and kind not in ("text/csv", "text/plain"):
                raise BadInput("Send the styles.csv file (CSV text with the columns name, prompt, negative_prompt).")
            check_attachment_meta(
                filename=file.filename,
                content_type="text/csv",
                size=file.size,
                url=file.url,
                allowed_types=("text/csv",),
                max_bytes=MAX_CSV_BYTES,
                allowed_hosts=self.service.allowed_hosts,
            )
            data = await self.service.download(file.url, MAX_CSV_BYTES)
            try:
                styles = parse_styles_csv(data)
                count = await asyncio.to_thread(
                    self.service.styles.put, interaction.guild_id, interaction.user.id, styles
                )
            except StyleError as e:
                raise BadInput(str(e)) from None
            await self.service.reply(interaction, f"Imported {len(styles)} style(s); this server has {count}.")

        @app_commands.command(name="safety", description="What a flagged image becomes outside age-restricted channels")
        @app_commands.describe(
            mode="off: posted as is · spoiler · blur (with Reveal) · withhold (kept for moderators)",
            labels="The classifier's labels that count, separated by commas ('default': the bot's)",
            threshold="The score at which they count, 0.01 to 1",
            reveal_in_dm="Whether Reveal may send the original to its requester by DM",
            reports_to_hide="Members' reports that hide a result until a moderator decides",
            strikes="Withheld results after which a member is barred (0: no strikes)",
        )
        async def safety(
            self,
            interaction: discord.Interaction,
            mode: Literal["off", "spoiler", "blur", "withhold"] = None,
            labels: app_commands.Range[str, 1, 500] = None,
            threshold: Transform[float, Bounded("threshold", float, 0.01, 1.0)] = None,
            reveal_in_dm: bool = None,
            reports_to_hide: Transform[int, Bounded("reports_to_hide", int, 1, 100)] = None,
            strikes: Transform[int, Bounded("strikes", int, 0, 100)] = None,
        ) -> None:
            changes = moderation.policy_changes(mode, labels, threshold)
            for name, value in (("reveal_in_dm", reveal_in_dm), ("reports_to_hide", reports_to_hide)):
                if value is not None:
                    changes[name] = value
            if strikes is not None:
                changes["strikes"] = strikes or None
            if changes:
                await self._saved(interaction, **changes)
            else:
                await self._show(interaction, await self._policy(interaction))

        @app_commands.command(name="review", description="Flagged and reported results: show, restore, delete, bar")
        @app_commands.describe(job="A job from the list (left out: the list)", action="What to do with it")
        async def review(
            self,
            interaction: discord.Interaction,
            job: Transform[int, Bounded("job", int, 1, 2**53 - 1)] = None,
            action: Literal["show", "restore", "delete", "bar"] = "show",
        ) -> None:
            if job is None:
                await self.service.reply(interaction, await moderation.review_list(interaction.guild_id))
                return
            await moderation.review(interaction, job, action)

        @app_commands.command(name="log", description="Who changed which setting, and when")
        async def log(self, interaction: discord.Interaction) -> None:
            entries = await self.service.run_check(self.community.audit_log, interaction.guild_id, 20)
            await self.service.reply(interaction, audit_text(entries))

    return Server(service)
